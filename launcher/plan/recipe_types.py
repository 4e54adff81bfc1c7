"""The value types of recipe fields: TOML's own integers, floats, booleans and paths, held to what TOML wrote
(pydantic's lax mode would read `rank = 1e3`, `gpus = true` or `lr = "1e-3"` as numbers)."""

from __future__ import annotations

import datetime
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError


def _not_a_bool(value: Any) -> Any:
    # pydantic takes true as 1 for numbers; `gpus = true` or `lr = true` is a mistake, not 1.
    if isinstance(value, bool):
        raise PydanticCustomError("bool_for_number", "input should be a number, not true or false")
    return value


# A decimal number as someone would type it in quotes by mistake ("8", "1e-3"); not "nan" or "inf", which are
# words that happen to parse.
_NUMERAL = re.compile(r"\s*[+-]?(\d[\d_]*\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")


def _is_numeral(text: str) -> bool:
    return _NUMERAL.fullmatch(text) is not None


def toml_integer(value: Any) -> Any:
    # TOML has integers and floats of their own; pydantic's lax mode would also take 1e3 (a float) and "8"
    # (a string) for an integer, so a typo such as `rank = 1e3` silently became rank 1000.
    _not_a_bool(value)
    if isinstance(value, float):
        hint = f" (write {int(value)})" if value.is_integer() and abs(value) < 1e18 else ""  # no 300-digit hint
        raise PydanticCustomError("int_from_float", "input should be an integer, not a float{hint}", {"hint": hint})
    if isinstance(value, str) and _is_numeral(value):
        raise PydanticCustomError(
            "number_in_quotes", "input should be an integer, not a string (write it without quotes)"
        )
    return value  # other strings: pydantic's own 'unable to parse' message


def _toml_number(value: Any) -> Any:
    _not_a_bool(value)
    if isinstance(value, str) and _is_numeral(value):
        raise PydanticCustomError(
            "number_in_quotes", "input should be a number, not a string (write it without quotes)"
        )
    return value


def _toml_bool(value: Any) -> Any:
    # pydantic's lax mode reads 1, "yes" or "on" as true: `trust_remote_code = 1` must not switch code on.
    if not isinstance(value, bool):
        raise PydanticCustomError("bool_type", "input should be true or false")
    return value


def _not_blank(text: str) -> str:
    # '' would resolve to the recipe's own directory (or the current one) and be reported as a model there.
    if not text.strip():
        raise PydanticCustomError("empty_path", "input should be a path, not an empty string")
    return text


Int = Annotated[int, BeforeValidator(toml_integer)]

Float = Annotated[float, BeforeValidator(_toml_number)]

Bool = Annotated[bool, BeforeValidator(_toml_bool)]

PathText = Annotated[str, AfterValidator(_not_blank)]

# Adam's moment decay rates: 1 would never forget, and a rate outside [0, 1) diverges.
Beta = Annotated[Float, Field(ge=0.0, lt=1.0)]


class Section(BaseModel):
    # allow_inf_nan=False: inf/nan (TOML's inf, nan, and 1e400, which overflows to inf) in any float field
    # would train to NaN or crash the ranks; they are refused where the recipe is validated.
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True, allow_inf_nan=False)


def short_value(value: Any, limit: int = 80) -> str:
    """repr of a recipe value (booleans, dates and times as TOML writes them), cut to fit a one-line message."""
    if isinstance(value, bool):
        shown = "true" if value else "false"
    elif isinstance(value, datetime.date | datetime.time):
        shown = value.isoformat()  # `lr = 1979-05-27` is a TOML date; datetime.date(1979, 5, 27) is Python's
    else:
        shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
