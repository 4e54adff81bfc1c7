"""The recipes and tiny assets shipped inside the package (launcher/bundled/): finding one by name, what
each is for, and the text of a copy to edit that works from any directory."""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Package data, so a wheel install has them too; the recipes name their assets as ../assets/..., relative to
# the recipe file as every recipe path is.
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "bundled"
RECIPES_DIR = BUNDLED_DIR / "recipes"
ASSETS_DIR = BUNDLED_DIR / "assets"


def bundled_recipes() -> list[Path]:
    return sorted(RECIPES_DIR.glob("*.toml")) if RECIPES_DIR.is_dir() else []


def bundled_names() -> list[str]:
    return [p.stem for p in bundled_recipes()]


def bundled_recipe(name: str) -> Path | None:
    """The bundled recipe a bare name stands for ('tiny-cpu' or 'tiny-cpu.toml'); None for anything else,
    a path with a directory in it included."""
    stem = name.removesuffix(".toml")
    return next((p for p in bundled_recipes() if p.stem == stem and "/" not in name), None)


def names_hint(name: str) -> str:
    """' (did you mean tiny-cpu?); bundled: ...' for a name that is no bundled recipe."""
    names = bundled_names()
    close = difflib.get_close_matches(Path(name).name.removesuffix(".toml"), names, n=1)
    return (f" (did you mean {close[0]}?)" if close else "") + f"; bundled: {', '.join(names)}"


def recipe_path(arg: str | Path) -> Path:
    """The file a recipe argument names: an existing file as it is (one in the current directory wins over
    a bundled recipe of the same name; a directory never does: `recipes cp tiny-cpu tiny-cpu` makes one),
    else the bundled recipe of that name, else the path as given (reading it then says what is wrong)."""
    path = Path(arg)
    if path.exists() and not path.is_dir():
        return path
    return bundled_recipe(str(arg)) or path


@dataclass(frozen=True)
class RecipeSummary:
    """One row of `qlaunch recipes`."""

    name: str  # what `qlaunch run NAME` takes
    model: str  # shown_model
    gpus: str  # launch.gpus, with the node count when there is more than one
    purpose: str  # the recipe's first comment line


def purpose(text: str) -> str:
    """The first comment line of a recipe: bundled recipes open with one sentence saying what they are for."""
    for line in text.splitlines():
        if line.strip():
            return line.strip().removeprefix("#").strip() if line.lstrip().startswith("#") else ""
    return ""


def shown_model(data: dict[str, Any], recipe_dir: Path) -> str:
    """A bundled asset by its name (tiny-llama), else the path or hub id as written; '(random)' when the
    weights are generated (model.init = "random": only the config's shapes are real)."""
    model = data.get("model", {})
    path = str(model.get("path", "?"))
    local = (recipe_dir / path).resolve()
    shown = local.name if local.is_relative_to(ASSETS_DIR) else path
    return f"{shown} (random)" if model.get("init") == "random" else shown


def summary(path: Path) -> RecipeSummary:
    """A bundled recipe's row (the file is the package's own, so it is parsed as it is)."""
    text = path.read_text(encoding="utf-8")
    data = tomllib.loads(text)
    launch = data.get("launch", {})
    nodes = launch.get("nnodes", 1)
    gpus = str(launch.get("gpus", 1)) + (f" x {nodes} nodes" if nodes != 1 else "")
    return RecipeSummary(path.stem, shown_model(data, path.parent), gpus, purpose(text))


def relative_local_paths(data: dict[str, Any], recipe_dir: Path) -> list[str]:
    """The path values written relative to the recipe that exist beside it (model, tokenizer, datasets,
    validation set): the ones a copy elsewhere would lose."""
    model, section = data.get("model", {}), data.get("data", {})
    values = [model.get("path"), model.get("tokenizer"), section.get("val_path")]
    values += [d.get("path") for d in section.get("datasets", []) if isinstance(d, dict)]
    return [
        v
        for v in dict.fromkeys(values)
        if isinstance(v, str) and v and not Path(v).expanduser().is_absolute() and (recipe_dir / v).exists()
    ]


def portable_text(text: str, recipe_dir: Path) -> str:
    """The recipe's text with each relative local path made absolute where it is a value (`key = "PATH"`,
    outside comment lines), so the copy finds the same model and data from anywhere; comments and layout
    stay as they are."""
    values = relative_local_paths(tomllib.loads(text), recipe_dir)
    if not values:
        return text
    quoted = "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))
    value = re.compile(rf"""(=[ \t]*)(["'])({quoted})\2""")

    def absolute(m: re.Match[str]) -> str:
        return m.group(1) + json.dumps(str((recipe_dir / m.group(3)).resolve()))

    lines = text.splitlines(keepends=True)
    return "".join(line if line.lstrip().startswith("#") else value.sub(absolute, line) for line in lines)
