"""DoRA (weight-decomposed LoRA, lora.use_dora) on qlaunch's meta-built, sharded, 4-bit/8-bit/dense layers.

DoRA scales each output row of W + s·B·A to a trained magnitude m: y = m / ||W + s·B·A||_row · (W + s·B·A) x,
the norm detached (DoRA §4.3). peft needs the base weight W at two points, and neither works as peft does it
on this model:
  - init: `get_peft_model` sets m to ||W||_row at once. Here W is still on meta (4-bit: no quant state
    yet), so the magnitudes are created empty instead (`magnitudes_on_meta`) and each rank fills its rows
    at load (`magnitude_rows`) from the weight the forward will see.
  - forward: peft dequantizes W with `dequantize_module_weight`, which knows bitsandbytes weights only as
    Params4bit/Int8Params. Under FSDP2 the gathered 4-bit weight is a plain tensor of packed bytes (the quant
    state lives on the module), so peft would take the bytes for the weight. `install_dequantize` makes
    peft's DoRA dequantize bitsandbytes layers from the module's own quant state.

A row's norm needs only that row, so every world size computes the same magnitude and the same forward.
Cost: each DoRA layer dequantizes its whole weight and takes its row norms in every forward (and again in
an activation-checkpoint recompute), as peft's DoRA does on any base.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from launcher.plan.recipe import Recipe
from launcher.rank.model.skeleton import DTYPES
from launcher.rank.model.sources import PACKED_SUFFIX

MAGNITUDE = "lora_magnitude_vector"


@contextlib.contextmanager
def magnitudes_on_meta() -> Iterator[None]:
    """While active, peft's DoRA init makes an empty [out_features] fp32 magnitude on meta instead of
    dequantizing the (meta) base weight; `magnitude_rows` fills it at load."""
    from peft.tuners.lora.dora import DoraLinearLayer

    own = DoraLinearLayer.update_layer

    def update_layer(self, *, base_layer, lora_A, lora_B, scaling, place_on_cpu=False) -> None:  # noqa: N803
        self.weight = nn.Parameter(torch.empty(base_layer.out_features, device="meta"), requires_grad=True)

    DoraLinearLayer.update_layer = update_layer
    try:
        yield
    finally:
        DoraLinearLayer.update_layer = own


def forward_weight(layer: nn.Module) -> torch.Tensor:
    """The base weight as DoRA's norm uses it: 4-bit dequantized in the quant state's dtype, int8 as
    peft dequantizes it (fp32), a dense weight as it is."""
    import bitsandbytes as bnb

    if isinstance(layer, bnb.nn.Linear4bit):
        qs = getattr(layer.weight, "quant_state", None) or layer.quant_state
        packed = layer.weight.detach().view(torch.uint8).reshape(-1, 1)
        return bnb.functional.dequantize_4bit(packed, qs)
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return bnb.functional.int8_vectorwise_dequant(layer.weight.detach(), int8_scales(layer))
    return layer.weight


def int8_scales(layer: nn.Module) -> torch.Tensor:
    # The row scales sit on the weight until the first forward, then in the layer's matmul state.
    return layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB


def install_dequantize() -> None:
    """Route peft's DoRA dequantization of bitsandbytes layers through `forward_weight` (idempotent).

    peft's DoRA module calls its own `dequantize_module_weight` by module-global name; other bases (HQQ,
    torchao, dense) keep peft's own handling."""
    import bitsandbytes as bnb
    from peft.tuners.lora import dora

    if getattr(dora.dequantize_module_weight, "qlaunch", False):
        return
    peft_own = dora.dequantize_module_weight

    def dequantize_module_weight(module: nn.Module) -> torch.Tensor:
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            return forward_weight(module)
        return peft_own(module)

    dequantize_module_weight.qlaunch = True
    dora.dequantize_module_weight = dequantize_module_weight


def forward_dtype(recipe: Recipe) -> torch.dtype:
    """The dtype DoRA's norm is taken in: peft casts the input to the LoRA weights' dtype, which is their
    fp32 master on one unsharded device and the compute dtype where the backend casts them (FSDP2's
    mixed precision, DeepSpeed's bf16/fp16)."""
    return torch.float32 if recipe.parallel.backend == "none" else DTYPES[recipe.quant.compute_dtype]


def magnitude_bases(root: nn.Module) -> dict[nn.Module, nn.Module]:
    """{peft DoraLinearLayer (owner of a magnitude): the base layer whose rows it scales}."""
    from peft.tuners.lora import LoraLayer

    out: dict[nn.Module, nn.Module] = {}
    for m in root.modules():
        if isinstance(m, LoraLayer):
            for dora_layer in getattr(m, MAGNITUDE, {}).values():
                out[dora_layer] = m.get_base_layer()
    return out


def magnitude_rows(
    base: nn.Module, hf_name: str, r0: int, r1: int, source, recipe: Recipe, device, prequant: str | None
):
    """m0 rows [r0, r1) = ||W[r0:r1]||_row (fp32) of the weight the forward dequantizes, B being zero.

    The rows are read from the source, not from the layer: a rank's packed 4-bit shard does not cover
    its magnitude rows, and ZeRO-3 may have partitioned the layer already. 4-bit rows are quantized (or
    read pre-quantized) on block boundaries and dequantized with the layer's full quant state, which gives
    the very values of dequantizing the whole weight (blocks are independent). 8-bit layers are whole on
    every rank (the recipe allows no sharded int8)."""
    import bitsandbytes as bnb

    in_f = base.in_features
    if isinstance(base, bnb.nn.Linear4bit):
        rows = _rows_4bit(base, hf_name, r0, r1, source, recipe, device, prequant)
    elif isinstance(base, bnb.nn.Linear8bitLt):
        rows = forward_weight(base)[r0:r1]
    else:
        dtype = base.weight.dtype
        rows = source.read_flat(hf_name, r0 * in_f, r1 * in_f, device).to(device=device, dtype=dtype)
    rows = rows.reshape(r1 - r0, in_f).to(forward_dtype(recipe))
    return torch.linalg.norm(rows.float(), dim=1)


def _rows_4bit(base: nn.Module, hf_name: str, r0: int, r1: int, source, recipe: Recipe, device, prequant: str | None):
    """Rows [r0, r1) of a 4-bit weight, dequantized (dtype of its quant state) as the whole weight is.

    The span read is widened to whole rows that start and end on block boundaries, and dequantized with
    its rows' shape: bitsandbytes' CPU kernel reads the blocks by the shape it is given (the CUDA kernel
    by flat position), so a span of whole rows dequantizes exactly like those rows of the whole weight."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState, dequantize_blockwise

    from launcher.rank.model.quant import quantize_blocks

    qs = base.quant_state
    bs, in_f, out_f = qs.blocksize, base.in_features, base.out_features
    step = math.lcm(bs, in_f) // in_f  # rows per run of whole blocks
    s0, s1 = r0 // step * step, min(-(-r1 // step) * step, out_f)
    e0, e1 = s0 * in_f, s1 * in_f
    if prequant == "bnb":  # a bitsandbytes hub checkpoint: its packed bytes of these elements
        from launcher.rank.model.quant import read_hub_shard

        packed, _ = read_hub_shard(source, hf_name, recipe.quant, e0, e1, device)
    elif prequant == "qlaunch":
        packed = source.read_raw(hf_name + PACKED_SUFFIX, e0 // 2, e1 // 2, device).to(device)
    else:
        packed, _ = quantize_blocks(source.read_flat(hf_name, e0, e1, device).to(device), recipe.quant)
    # The scales as bitsandbytes' dequantize_4bit uses them (double quantization undone the same way).
    absmax = qs.absmax
    if qs.nested:
        absmax = (dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).float()
    part = QuantState(
        absmax=absmax[e0 // bs : -(-e1 // bs)].contiguous(),
        shape=torch.Size((s1 - s0, in_f)),
        dtype=qs.dtype,
        blocksize=bs,
        code=qs.code,
        quant_type=qs.quant_type,
    )
    return bnb.functional.dequantize_4bit(packed.reshape(-1, 1), part)[r0 - s0 : r1 - s0]
