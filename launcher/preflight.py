"""Checks that run in the launching process before any run directory is written or rank is spawned."""

from __future__ import annotations

from launcher.recipe import Recipe


def check(recipe: Recipe) -> None:
    """Raise UserError for anything a rank would otherwise discover minutes later."""
    from launcher.loading import (
        build_skeleton,
        checkpoint_shapes,
        load_config,
        lora_targets,
        open_source,
        resolve_model_dir,
    )

    model_dir = resolve_model_dir(recipe)
    config = load_config(recipe, model_dir)
    skeleton = build_skeleton(recipe, config)
    lora_targets(recipe, skeleton)
    # Headers only: missing shards, corrupt files, wrong dtypes or shapes are found before any rank starts.
    open_source(recipe, model_dir, config, checkpoint_shapes(skeleton), "cpu")
    from launcher import data

    check_data = getattr(data, "check", None)
    if check_data is not None:
        check_data(recipe)
