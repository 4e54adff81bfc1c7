"""Checks that run in the launching process before any run directory is written or rank is spawned."""

from __future__ import annotations

import sys

from launcher.errors import UserError
from launcher.plan.recipe import Recipe


def check(recipe: Recipe) -> None:
    """Raise UserError for anything a rank would otherwise discover minutes later."""
    from launcher.data.check import check as check_data
    from launcher.plan.model_info import load_config, max_positions, resolve_model_dir
    from launcher.rank.model.fill import open_source, quant_config
    from launcher.rank.model.logits import logit_probe_problem
    from launcher.rank.model.moe import moe_problem, source_shapes
    from launcher.rank.model.skeleton import checkpoint_shapes, lora_targets, structure_problem

    model_dir = resolve_model_dir(recipe)
    config = load_config(recipe, model_dir)
    warning = seq_len_warning(recipe.data.seq_len, max_positions(config))
    if warning:
        print(warning, file=sys.stderr)
    problem = attention_problem(config, recipe.model.attn_implementation)
    if problem:
        raise UserError(problem)
    skeleton = _skeleton(recipe, config, model_dir)
    problem = structure_problem(skeleton) or logit_probe_problem(config, recipe.model.attn_implementation)
    if problem:
        raise UserError(f"{model_dir / 'config.json'}: {problem}")
    lora_targets(recipe, skeleton)
    # Headers only: missing shards, corrupt files, wrong dtypes or shapes are found before any rank starts.
    shapes, _ = source_shapes(skeleton, checkpoint_shapes(skeleton))
    source, prequantized = open_source(recipe, model_dir, config, shapes, "cpu")
    problem = moe_problem(recipe, skeleton, prequantized)
    if problem:
        raise UserError(f"{model_dir / 'config.json'}: {problem}")
    if prequantized == "bnb":
        hub_layers_check(recipe, skeleton, source, model_dir)
        recipe = recipe.model_copy(update={"quant": quant_config(recipe, skeleton, source, prequantized)})
    getattr(source, "close", lambda: None)()
    if prequantized == "qlaunch":
        _check_quantized_layers(recipe, skeleton, model_dir)
    problem = tied_head_problem(recipe, skeleton)
    if problem:
        raise UserError(problem)

    check_data(recipe)


def tied_head_problem(recipe: Recipe, skeleton) -> str | None:
    """A tied head must stay a dense linear: quantizing it would give the head packed bytes of its own
    while the embedding keeps the dense weight, i.e. untie the pair."""
    from launcher.rank.model.skeleton import is_tied, name_matches, output_head

    if not is_tied(skeleton) or recipe.quant.bits == "none":
        return None
    head = output_head(skeleton)
    name = next(n for n, m in skeleton.named_modules() if m is head)
    if name_matches(name, recipe.quant.skip_modules):
        return None
    return (
        f"quant.skip_modules = {recipe.quant.skip_modules}: {name} shares its weight with the input embedding "
        f"(tie_word_embeddings = true) and cannot be quantized; add {name!r} to quant.skip_modules"
    )


def attention_problem(config, attn_implementation: str) -> str | None:
    """Gemma 2's attention soft-capping (attn_logit_softcapping) exists only in transformers' eager attention:
    SDPA has no soft-cap, and some transformers versions drop it there without a word (a different model
    trains). Flash attention 2 applies it."""
    cap = getattr(config, "attn_logit_softcapping", None)
    if cap and attn_implementation == "sdpa":
        return (
            f"model.attn_implementation = 'sdpa' cannot apply this model's attention soft-capping "
            f'(attn_logit_softcapping = {cap:g} in config.json); set model.attn_implementation = "eager" '
            '(or "flash_attention_2")'
        )
    return None


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


def hub_layers_check(recipe: Recipe, skeleton, source, model_dir) -> None:
    """A bitsandbytes 4-bit checkpoint decides which linears are 4-bit. A linear the recipe's
    quant.skip_modules keeps dense but the checkpoint stores only in 4-bit is refused (its dense weight is
    not there); linears the checkpoint keeps dense stay dense, said in one line on stderr."""
    from launcher.rank.model.bnb_hub import stored_4bit
    from launcher.rank.model.skeleton import linear_names, name_matches

    skip = recipe.quant.skip_modules
    stored = stored_4bit(source)
    linears = linear_names(skeleton)
    for name in linears:
        if name_matches(name, skip) and name + ".weight" in stored:
            raise UserError(
                f"{model_dir}: quant.skip_modules = {skip} keeps {name} dense, but this bitsandbytes checkpoint "
                "stores it only in 4-bit; remove it from quant.skip_modules (the checkpoint decides which "
                "layers are 4-bit), or set model.path to the unquantized model"
            )
    kept = [n for n in linears if n + ".weight" not in stored and not name_matches(n, skip)]
    if kept:
        print(
            f"note: {model_dir} (bitsandbytes 4-bit) keeps {len(kept)} linear layer(s) dense that "
            f"quant.skip_modules would quantize ({', '.join(kept[:3])}{', ...' if len(kept) > 3 else ''}); "
            "they are trained dense, as stored",
            file=sys.stderr,
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
