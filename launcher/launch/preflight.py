"""Checks that run in the launching process before any run directory is written or rank is spawned."""

from __future__ import annotations

import sys

from launcher.errors import UserError
from launcher.plan.recipe import Recipe


def check(recipe: Recipe) -> None:
    """Raise UserError for anything a rank would otherwise discover minutes later."""
    from launcher.data.check import check as check_data
    from launcher.plan.model_info import load_config, max_positions, resolve_model_dir
    from launcher.rank.model.fill import open_source
    from launcher.rank.model.skeleton import checkpoint_shapes, lora_targets

    model_dir = resolve_model_dir(recipe)
    config = load_config(recipe, model_dir)
    warning = seq_len_warning(recipe.data.seq_len, max_positions(config))
    if warning:
        print(warning, file=sys.stderr)
    skeleton = _skeleton(recipe, config, model_dir)
    lora_targets(recipe, skeleton)
    # Headers only: missing shards, corrupt files, wrong dtypes or shapes are found before any rank starts.
    source, prequantized = open_source(recipe, model_dir, config, checkpoint_shapes(skeleton), "cpu")
    getattr(source, "close", lambda: None)()
    if prequantized:
        _check_quantized_layers(recipe, skeleton, model_dir)

    check_data(recipe)


def _skeleton(recipe: Recipe, config, model_dir):
    """The meta-device model, or one line: a config transformers loads may still not build (an unknown
    activation or rope type)."""
    from launcher.plan.model_info import quiet_transformers, transformers_refusal
    from launcher.rank.model.skeleton import build_skeleton

    try:
        with quiet_transformers():
            return build_skeleton(recipe, config)
    except UserError:
        raise
    except Exception as err:
        if isinstance(err, ImportError) and recipe.model.attn_implementation == "flash_attention_2":
            first = str(err).strip().splitlines()[0] if str(err).strip() else "the flash-attn package is missing"
            raise UserError(f"model.attn_implementation = 'flash_attention_2': {first}; or use 'sdpa'") from None
        raise UserError(
            f"{model_dir / 'config.json'}: transformers cannot build {config.architectures[0]} from this config "
            f"({transformers_refusal(err)})"
        ) from None


def _check_quantized_layers(recipe: Recipe, skeleton, model_dir) -> None:
    """A `qlaunch quantize` checkpoint holds packed bytes for the layers it quantized and dense weights
    for the rest: the recipe must quantize exactly those (quant.skip_modules against quantize's --skip),
    or a rank would look for tensors that are not there."""
    from launcher.rank.model.skeleton import linear_names
    from launcher.rank.model.sources import read_quant_meta

    skip = recipe.quant.skip_modules
    wanted = {f"{n}.weight" for n in linear_names(skeleton) if not any(n == s or n.endswith("." + s) for s in skip)}
    stored = set(read_quant_meta(model_dir)["quantized"])
    for name in sorted(wanted ^ stored):
        how = "quantizes" if name in wanted else "keeps dense"
        raise UserError(
            f"{model_dir}: the recipe (quant.skip_modules = {skip}) {how} {name}, which this `qlaunch quantize` "
            f"checkpoint {'keeps dense' if name in wanted else 'stores quantized'}; set quant.skip_modules to "
            "the --skip it was quantized with, or quantize again"
        )


def seq_len_warning(seq_len: int, max_positions: int | None) -> str | None:
    """A warning when data.seq_len exceeds the positions the model was made for (not an error: rope
    scaling can extend them)."""
    if max_positions is None or seq_len <= max_positions:
        return None
    return (
        f"warning: data.seq_len = {seq_len} exceeds the model's max_position_embeddings = {max_positions} "
        "(config.json); positions past it are untrained unless the model's rope scaling extends them"
    )
