"""`qlaunch recipes`: the bundled recipes as a table, and a copy of one to edit (`qlaunch recipes cp`)."""

from __future__ import annotations

from pathlib import Path

from launcher.atomic import atomic_write
from launcher.errors import UserError
from launcher.plan.bundled import bundled_recipe, bundled_recipes, names_hint, portable_text, summary


def recipes_table():
    """A rich Table: name, model, GPUs and what each bundled recipe is for."""
    from rich.table import Table

    table = Table(show_edge=False, header_style="bold")
    for column in ("name", "model", "GPUs", "for"):
        table.add_column(column, no_wrap=column != "for")
    for path in bundled_recipes():
        row = summary(path)
        table.add_row(row.name, row.model, row.gpus, row.purpose)
    return table


def copy_target(source: Path, dest: str) -> Path:
    """DEST itself when it names a .toml file, else NAME.toml inside the directory DEST."""
    target = Path(dest)
    return target if target.suffix == ".toml" and not target.is_dir() else target / source.name


def copy_recipe(name: str, dest: str = ".", force: bool = False) -> Path:
    """Write the bundled recipe NAME into DEST with its asset paths made absolute (it then runs from any
    directory); an existing file is kept unless FORCE. Returns the written path."""
    source = bundled_recipe(name)
    if source is None:
        raise UserError(f"{name}: no bundled recipe of that name{names_hint(name)}")
    target = copy_target(source, dest)
    if target.exists() and target.resolve() == source.resolve():
        raise UserError(f"{target}: is the bundled recipe itself; copy it somewhere else")
    text = portable_text(source.read_text(encoding="utf-8"), source.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    if force:
        atomic_write(target, text)
        return target
    try:
        with open(target, "x", encoding="utf-8") as f:  # "x": never over a file that appeared meanwhile
            f.write(text)
    except FileExistsError:
        raise UserError(f"{target}: already exists; edit it, or pass --force to overwrite it") from None
    return target
