"""Mixture-of-experts layouts: the fused expert parameters transformers builds (one [experts, out, in] tensor per
projection), their per-expert checkpoint tensors, and a source that reads the fused tensors from those.

transformers runs every expert of a layer from one fused parameter per projection (`gate_up_proj` [E, 2I, H],
`down_proj` [E, H, I]), which bitsandbytes' Linear4bit swap never reaches, while the checkpoints store each
expert's matrices apart (`experts.3.gate_proj.weight` [I, H]; Mixtral: `block_sparse_moe.experts.3.w1.weight`)
and transformers converts them at load. Here the fused tensor is a name a source can read (`ExpertsSource`
concatenates the per-expert slices in the fused layout), so each rank reads only the elements of its own shard,
and `NF4Experts` holds every expert's NF4 bytes of a projection in one storage parameter that FSDP2 shards like
a Linear4bit's, with a quant state per expert (double quant as elsewhere) so an expert's weight is dequantized
alone, only when a micro-batch routes a token to it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from launcher.errors import UserError

FUSED = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class ExpertLayout:
    """How a family's checkpoints store the fused expert parameters: the per-expert leaves concatenated (along
    the output dimension) into each fused projection, and a module-name rename (Mixtral's `block_sparse_moe`,
    which transformers calls `mlp`)."""

    leaves: dict[str, tuple[str, ...]]
    rename: tuple[str, str] | None = None


# model_type -> layout; every other MoE architecture is refused (skeleton.structure_problem).
LAYOUTS = {
    "qwen3_moe": ExpertLayout({"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}),
    "mixtral": ExpertLayout(
        {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}, rename=(".mlp.", ".block_sparse_moe.")
    ),
}


def expert_layout(causal_lm: nn.Module) -> ExpertLayout | None:
    return LAYOUTS.get(getattr(causal_lm.config, "model_type", None))


def is_experts(module: nn.Module) -> bool:
    """A fused experts module (transformers' or ours): every FUSED projection a parameter of its own."""
    return all(isinstance(module._parameters.get(p), torch.Tensor) for p in FUSED)


def is_router(module: nn.Module) -> bool:
    """The top-k router beside the experts: a 2-D `weight` [experts, hidden], no nn.Linear."""
    return type(module).__name__.endswith("TopKRouter")


def experts_modules(causal_lm: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in causal_lm.named_modules() if is_experts(m)]


def checkpoint_name(module_name: str, layout: ExpertLayout | None) -> str:
    """The checkpoint prefix of a module (Mixtral: `layers.0.mlp.gate` is stored as `layers.0.block_sparse_moe.gate`)."""
    if layout is None or layout.rename is None:
        return module_name
    old, new = layout.rename
    return (module_name + ".").replace(old, new)[:-1]


def tensor_name(name: str, layout: ExpertLayout | None) -> str:
    """The checkpoint name of a parameter named by its module path."""
    module, _, pname = name.rpartition(".")
    return f"{checkpoint_name(module, layout)}.{pname}" if module else name


def expert_pieces(fused_name: str, shape: tuple[int, ...], layout: ExpertLayout) -> list[tuple[str, tuple[int, int]]]:
    """(checkpoint tensor, shape) of every expert's part of a fused parameter, in the fused tensor's flat order."""
    prefix, _, proj = fused_name.rpartition(".")
    n_experts, out_f, in_f = shape
    leaves = layout.leaves[proj]
    if out_f % len(leaves):
        raise UserError(f"{fused_name}: {out_f} output rows do not split into {'/'.join(leaves)}")
    rows = out_f // len(leaves)
    return [(f"{prefix}.{e}.{leaf}.weight", (rows, in_f)) for e in range(n_experts) for leaf in leaves]


def split_fused(shapes: dict[str, tuple[int, ...]], layout: ExpertLayout | None):
    """(checkpoint name -> shape with every fused parameter split into its per-expert tensors, fused checkpoint
    name -> its pieces). SHAPES are by module name; the result by checkpoint name."""
    out: dict[str, tuple[int, ...]] = {}
    fused: dict[str, list[tuple[str, tuple[int, int]]]] = {}
    for name, shape in shapes.items():
        ckpt, pname = tensor_name(name, layout), name.rpartition(".")[2]
        if layout is not None and pname in layout.leaves and len(shape) == 3:
            fused[ckpt] = expert_pieces(ckpt, shape, layout)
            out.update(fused[ckpt])
        else:
            out[ckpt] = shape
    return out, fused


class ExpertsSource:
    """A weight source that also answers for the fused expert tensors, by reading elements [start, end) of the
    fused layout from the per-expert tensors they span (only those elements: a rank's shard)."""

    def __init__(self, inner, fused: dict[str, list[tuple[str, tuple[int, int]]]]):
        self.inner = inner
        self.fused = fused

    def __getattr__(self, name: str):  # dir, shape, read_raw, ... of the wrapped source
        return getattr(self.inner, name)

    def __contains__(self, name: str) -> bool:
        return name in self.fused or name in self.inner

    def read_flat(self, name: str, start: int, end: int, device=None) -> torch.Tensor:
        if name not in self.fused:
            return self.inner.read_flat(name, start, end, device)
        parts, at = [], 0
        for piece, (rows, cols) in self.fused[name]:
            lo, hi = max(start - at, 0), min(end - at, rows * cols)
            if hi > lo:
                parts.append(self.inner.read_flat(piece, lo, hi, device).to(device))
            at += rows * cols
        return torch.cat(parts) if parts else torch.empty(0, device=device)


def source_shapes(causal_lm: nn.Module, module_shapes: dict[str, tuple[int, ...]]):
    """(checkpoint name -> shape, fused checkpoint name -> its per-expert pieces) of a skeleton whose
    MODULE_SHAPES are skeleton.checkpoint_shapes: what a source is opened and checked with."""
    return split_fused(module_shapes, expert_layout(causal_lm))


def moe_problem(recipe, causal_lm: nn.Module, prequantized: str | None) -> str | None:
    """What of a recipe qlaunch cannot do yet with a mixture-of-experts model; None for a dense model."""
    if not experts_modules(causal_lm):
        return None
    if recipe.lora.train_router:
        return "lora.train_router = true: training the MoE router is not yet supported; set it to false"
    if recipe.quant.bits == 8:
        return "quant.bits = 8 with a mixture-of-experts model: 8-bit experts are not yet supported; use 4 or none"
    if recipe.train.objective != "sft" and getattr(causal_lm.config, "output_router_logits", False):
        return "output_router_logits = true with a preference objective: its load-balancing loss is not yet supported"
    if prequantized is not None:
        return f"a pre-quantized ({prequantized}) mixture-of-experts checkpoint is not yet supported; use the original"
    return None


@dataclass(frozen=True)
class RouterAux:
    """The router's load-balancing loss as the model's own forward adds it: transformers computes it (its
    `load_balancing_loss_func` over every layer's router logits of the batch) and adds `coef` times it to the
    loss only when the config's `output_router_logits` is true (Qwen3-MoE's and Mixtral's default: false)."""

    coef: float
    num_experts: int
    top_k: int
    loss_fn: object  # the model module's load_balancing_loss_func(router_logits, num_experts, top_k, mask)

    def __call__(self, router_logits) -> torch.Tensor:
        return self.loss_fn(tuple(router_logits), self.num_experts, self.top_k, None).float()


def router_aux(causal_lm: nn.Module) -> RouterAux | None:
    """The model's load-balancing term, or None where its forward adds none (a dense model, or a config whose
    output_router_logits is false)."""
    import importlib

    config = causal_lm.config
    if expert_layout(causal_lm) is None or not getattr(config, "output_router_logits", False):
        return None
    module = importlib.import_module(type(causal_lm).__module__)
    experts = getattr(config, "num_experts", None) or config.num_local_experts
    return RouterAux(
        float(config.router_aux_loss_coef), experts, config.num_experts_per_tok, module.load_balancing_loss_func
    )
