"""The recipes and tiny assets shipped inside the package (launcher/bundled/): finding one by name."""

from __future__ import annotations

import difflib
from pathlib import Path

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
