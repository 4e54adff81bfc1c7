"""Checks that run in the launching process before any run directory is written or rank is spawned."""

from __future__ import annotations

from launcher.recipe import Recipe


def check(recipe: Recipe) -> None:
    """Raise UserError for anything a rank would otherwise discover minutes later."""
    from launcher.loading import build_skeleton, load_config, lora_targets, resolve_model_dir

    model_dir = resolve_model_dir(recipe)
    config = load_config(recipe, model_dir)
    lora_targets(recipe, build_skeleton(recipe, config))
    from launcher import data

    check_data = getattr(data, "check", None)
    if check_data is not None:
        check_data(recipe)
