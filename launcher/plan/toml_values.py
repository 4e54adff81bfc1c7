"""TOML values as a recipe's keys take them: integers, numbers and booleans written as TOML writes them, not
whatever pydantic's lax mode would coerce (a float for an integer, a quoted numeral, 1 for true)."""

from __future__ import annotations

import re
from typing import Any

from pydantic_core import PydanticCustomError


def not_a_bool(value: Any) -> Any:
    # pydantic takes true as 1 for numbers; `gpus = true` or `lr = true` is a mistake, not 1.
    if isinstance(value, bool):
        raise PydanticCustomError("bool_for_number", "input should be a number, not true or false")
    return value


# A decimal number as someone would type it in quotes by mistake ("8", "1e-3"); not "nan" or "inf", which are
# words that happen to parse.
NUMERAL = re.compile(r"\s*[+-]?(\d[\d_]*\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")


def is_numeral(text: str) -> bool:
    return NUMERAL.fullmatch(text) is not None


def toml_integer(value: Any) -> Any:
    # TOML has integers and floats of their own; pydantic's lax mode would also take 1e3 (a float) and "8"
    # (a string) for an integer, so a typo such as `rank = 1e3` silently became rank 1000.
    not_a_bool(value)
    if isinstance(value, float):
        hint = f" (write {int(value)})" if value.is_integer() and abs(value) < 1e18 else ""  # no 300-digit hint
        raise PydanticCustomError("int_from_float", "input should be an integer, not a float{hint}", {"hint": hint})
    if isinstance(value, str) and is_numeral(value):
        raise PydanticCustomError(
            "number_in_quotes", "input should be an integer, not a string (write it without quotes)"
        )
    return value  # other strings: pydantic's own 'unable to parse' message


def toml_number(value: Any) -> Any:
    not_a_bool(value)
    if isinstance(value, str) and is_numeral(value):
        raise PydanticCustomError(
            "number_in_quotes", "input should be a number, not a string (write it without quotes)"
        )
    return value


def toml_bool(value: Any) -> Any:
    # pydantic's lax mode reads 1, "yes" or "on" as true: `trust_remote_code = 1` must not switch code on.
    if not isinstance(value, bool):
        raise PydanticCustomError("bool_type", "input should be true or false")
    return value
