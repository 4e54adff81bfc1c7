"""`qlaunch explain KEY`: a recipe section or key described from the schema (type, default, range, help)."""

from __future__ import annotations

import json
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
)

from launcher.errors import RecipeError
from launcher.plan.recipe import SCHEMA_KEYS
from launcher.plan.recipe_file import section_of, suggest


def explain(key: str) -> str:
    """Documentation of one dotted key (or a whole section, or the entries of a list of tables such as
    data.datasets, whose keys are found as data.datasets.path)."""
    info = field_at(key)
    if info is None and key:
        raise RecipeError(f"unknown key '{key}'{suggest(key)}")
    section = section_of(key, through_lists=True)
    if section is not None:
        listed = key and section_of(key) is None  # a list of tables: [[key]] entries
        rows = [(f"[[{key}]] (each entry)" if listed else f"[{key}]") if key else "recipe"]
        if listed:
            rows.insert(0, f"{key}: {_describe(info)}")
        for name, field in section.model_fields.items():
            rows.append(f"  {name}: {_describe(field)}")
        return "\n".join(rows)
    return f"{key}: {_describe(info)}"


def field_at(key: str) -> Any:
    """The schema field at a dotted key, through lists of tables (data.datasets.path); None if none."""
    if key in SCHEMA_KEYS:
        return SCHEMA_KEYS[key]
    parent, _, leaf = key.rpartition(".")
    section = section_of(parent, through_lists=True) if parent else None
    return section.model_fields.get(leaf) if section is not None else None


def _bounds(info: Any) -> str:
    """'0 <= x < 2147483648' from a field's ge/gt/le/lt constraints ('' if it has none)."""
    low = high = ""
    for c in info.metadata:
        if getattr(c, "ge", None) is not None:
            low = f"{c.ge} <= "
        elif getattr(c, "gt", None) is not None:
            low = f"{c.gt} < "
        elif getattr(c, "le", None) is not None:
            high = f" <= {c.le}"
        elif getattr(c, "lt", None) is not None:
            high = f" < {c.lt}"
    return f"{low}x{high}" if low or high else ""


def _type_name(ann: Any) -> str:
    """'int | None', '"cosine" | "linear" | "constant"', 'tuple' for a field's annotation (a choice's values;
    validators and constraints left out)."""
    origin, args = get_origin(ann), get_args(ann)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:  # the allowed values, as a recipe writes them
        return " | ".join(json.dumps(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if ann is type(None):
        return "None"
    return getattr(origin or ann, "__name__", None) or str(origin or ann).replace("typing.", "")


def _describe(info: Any) -> str:
    ann = _type_name(info.annotation)
    default = "required" if info.is_required() else f"default {info.get_default(call_default_factory=True)!r}"
    if isinstance(info.get_default(call_default_factory=True), BaseModel):
        default = "table"
    bounds = _bounds(info)
    return f"{info.description or ''} [{ann}; {default}{'; ' + bounds if bounds else ''}]"
