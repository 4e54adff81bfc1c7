"""The meta-device model: built from the config, its checkpoint shapes, decoder layers, linear layers and the
LoRA targets a recipe names."""

from __future__ import annotations

import torch
from torch import nn

from launcher.errors import UserError
from launcher.plan.recipe import Recipe

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_skeleton(recipe: Recipe, config) -> nn.Module:
    """The architecture with parameters on meta; buffers (rotary tables) stay real on CPU."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config,
            dtype=DTYPES[recipe.model.dtype],
            attn_implementation=recipe.model.attn_implementation,
            trust_remote_code=recipe.model.trust_remote_code,
        )
    return model


def checkpoint_shapes(causal_lm: nn.Module) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape the architecture expects (tied weights appear once)."""
    out: dict[str, tuple[int, ...]] = {}
    seen: set[int] = set()
    for n, m in causal_lm.named_modules():
        for pn, p in m.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                out[f"{n}.{pn}" if n else pn] = tuple(p.shape)
    return out


def decoder_layers(causal_lm: nn.Module) -> nn.ModuleList:
    return causal_lm.model.layers


def linear_names(causal_lm: nn.Module) -> list[str]:
    return [n for n, m in causal_lm.named_modules() if isinstance(m, nn.Linear)]


def name_matches(name: str, suffixes: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def lora_targets(recipe: Recipe, causal_lm: nn.Module) -> list[str]:
    """Module-name suffixes LoRA wraps; validated against the architecture before any weight is read."""
    names = linear_names(causal_lm)
    if recipe.lora.target_modules == "all-linear":
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names if ".layers." in n})
        return leaves
    for t in recipe.lora.target_modules:
        if not any(name_matches(n, [t]) for n in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise UserError(f"lora.target_modules: {t!r} matches no linear layer; this model has {', '.join(leaves)}")
    return list(recipe.lora.target_modules)
