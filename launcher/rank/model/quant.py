"""4-bit (NF4/FP4) and 8-bit layers: the nn.Linear swap on the skeleton and the quantization of each rank's own
blocks of a weight, in a storage dtype FSDP can shard."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from launcher.errors import UserError
from launcher.plan.recipe import QuantConfig
from launcher.rank.model.shard import local_view, shard_group, shard_spans
from launcher.rank.model.skeleton import DTYPES, linear_names, name_matches
from launcher.rank.model.sources import ABSMAX_SUFFIX, PACKED_SUFFIX


def _swap_linears(causal_lm: nn.Module, q: QuantConfig, build: Callable[[str, nn.Linear], nn.Module]):
    """Replace every non-skipped linear by build(name, linear) (a quantized layer on meta); {name: layer}."""
    out: dict[str, nn.Module] = {}
    for name in linear_names(causal_lm):
        if name_matches(name, q.skip_modules):
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = causal_lm.get_submodule(parent_name)
        lin: nn.Linear = getattr(parent, leaf)
        layer = build(name, lin)
        if lin.bias is not None:
            layer.bias = nn.Parameter(torch.empty_like(lin.bias, device="meta"), requires_grad=False)
        setattr(parent, leaf, layer)
        out[name] = layer
    return out


@functools.cache
def linear4bit_class() -> type:
    """bitsandbytes' Linear4bit with a forward that takes the quant state from the module.

    Under FSDP the gathered weight is a plain Parameter, so bitsandbytes' own forward wraps it in a new
    Params4bit and re-registers it on the module in every call (host time in each of the 7 linears of
    every layer, three times a step with checkpointing), and torch.compile cannot trace that at all. The
    packed bytes and the module's quant state are all the matmul needs. isinstance checks (peft's 4-bit
    LoRA dispatch, merging) still see a Linear4bit.
    """
    import bitsandbytes as bnb

    class QLinear4bit(bnb.nn.Linear4bit):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.compute_type_is_set:  # as bitsandbytes does: fp32/bf16 inputs set the compute dtype
                self.set_compute_type(x)
                self.compute_type_is_set = True
            dtype = x.dtype
            x = x.to(self.compute_dtype)
            bias = None if self.bias is None else self.bias.to(self.compute_dtype)
            return bnb.matmul_4bit(x, self.weight, bias=bias, quant_state=self.quant_state).to(dtype)

    return QLinear4bit


def replace_with_4bit(causal_lm: nn.Module, q: QuantConfig) -> dict[str, nn.Module]:
    """Swap every non-skipped linear for a bitsandbytes Linear4bit on meta; returns {name: layer}."""
    from bitsandbytes.nn import Params4bit

    storage = DTYPES[q.storage_dtype]

    def build(name: str, lin: nn.Linear) -> nn.Module:
        layer = linear4bit_class()(
            lin.in_features,
            lin.out_features,
            bias=lin.bias is not None,
            compute_dtype=DTYPES[q.compute_dtype],
            compress_statistics=q.double_quant,
            quant_type=q.type,
            quant_storage=storage,
            device="meta",
        )
        # bitsandbytes' CPU inference path repacks the weight and rewrites the shared quant state in place
        # on the first no-grad forward. A sharded backend re-gathers the original bytes every step, so
        # the rewritten state would no longer match them (the loss drifts with lr=0). Never repack.
        layer.support_avx512bf16_for_cpu = False
        n = lin.in_features * lin.out_features
        if n % 2:
            raise UserError(f"{name}: {n} weights cannot be packed two per byte")
        rows = n // 2 // storage.itemsize if n // 2 % storage.itemsize == 0 else None
        if rows is None:
            raise UserError(f"{name}: {n} 4-bit weights do not fill whole {q.storage_dtype} storage elements")
        layer.weight = Params4bit(
            torch.empty(rows, 1, dtype=storage, device="meta"),
            requires_grad=False,
            blocksize=q.blocksize,
            compress_statistics=q.double_quant,
            quant_type=q.type,
            quant_storage=storage,
            module=layer,
            bnb_quantized=True,
        )
        return layer

    out = _swap_linears(causal_lm, q, build)
    causal_lm.is_loaded_in_4bit = True  # peft dispatches its 4-bit LoRA layer on this flag
    return out


# LLM.int8's outlier threshold: activation columns with any |value| above it are multiplied in 16-bit
# instead of int8. 6.0 is the paper's value and transformers' `llm_int8_threshold` default (bitsandbytes'
# own Linear8bitLt defaults to 0.0, which turns the decomposition off). The recipe has no key for it.
INT8_THRESHOLD = 6.0


def replace_with_int8(causal_lm: nn.Module, q: QuantConfig) -> dict[str, nn.Module]:
    """Swap every non-skipped linear for a bitsandbytes Linear8bitLt (frozen int8) on meta; returns {name: layer}."""
    import bitsandbytes as bnb
    from bitsandbytes.nn import Int8Params

    def build(name: str, lin: nn.Linear) -> nn.Module:
        layer = bnb.nn.Linear8bitLt(
            lin.in_features,
            lin.out_features,
            bias=lin.bias is not None,
            has_fp16_weights=False,
            threshold=INT8_THRESHOLD,
            device="meta",
        )
        # int8 on meta, so materialising allocates one byte per weight, not the fp32 nn.Linear default.
        layer.weight = Int8Params(
            torch.empty(lin.out_features, lin.in_features, dtype=torch.int8, device="meta"),
            requires_grad=False,
            has_fp16_weights=False,
        )
        layer.register_state_dict_post_hook(_drop_int8_extras)
        return layer

    out = _swap_linears(causal_lm, q, build)
    causal_lm.is_loaded_in_8bit = True  # peft dispatches its 8-bit LoRA layer on this flag
    _warn_once(logging.getLogger("bitsandbytes.autograd._functions"))
    return out


def _drop_int8_extras(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    # Linear8bitLt adds `SCB` and `weight_format` entries that name no attribute of the module, which
    # torch.distributed.checkpoint's get_state_dict cannot map (AttributeError). They describe the frozen
    # base, which checkpoints leave out anyway (a resume rebuilds it from the model).
    state_dict.pop(prefix + "SCB", None)
    state_dict.pop(prefix + "weight_format", None)


class _Once(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


def _warn_once(logger: logging.Logger) -> None:
    # bitsandbytes warns on every int8 matmul whose input is not fp16 (LLM.int8 always quantizes activations
    # through fp16): with bf16/fp32 compute that is every layer of every forward, burying the rank logs.
    if not any(isinstance(f, _Once) for f in logger.filters):
        logger.addFilter(_Once())


def make_quant_state(absmax: torch.Tensor, shape: tuple[int, int], q: QuantConfig):
    """bitsandbytes QuantState from full per-block fp32 scales; double quantization done the library's way."""
    from bitsandbytes.functional import QuantState, get_4bit_type, quantize_blockwise

    code = get_4bit_type(q.type, device=absmax.device)
    dtype = DTYPES[q.compute_dtype]
    if q.double_quant:
        offset = absmax.mean()
        qabsmax, state2 = quantize_blockwise(absmax - offset, blocksize=256)
        return QuantState(
            absmax=qabsmax,
            shape=torch.Size(shape),
            dtype=dtype,
            blocksize=q.blocksize,
            code=code,
            quant_type=q.type,
            offset=offset,
            state2=state2,
        )
    return QuantState(
        absmax=absmax,
        shape=torch.Size(shape),
        dtype=dtype,
        blocksize=q.blocksize,
        code=code,
        quant_type=q.type,
    )


def quantize_blocks(flat: torch.Tensor, q: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed uint8 bytes and fp32 absmax of a block-aligned run of elements (bitsandbytes' own kernel)."""
    import bitsandbytes  # noqa: F401 - registers the torch.ops.bitsandbytes kernels

    packed, absmax = torch.ops.bitsandbytes.quantize_4bit.default(flat, q.blocksize, q.type, torch.uint8)
    return packed.reshape(-1), absmax.reshape(-1).float()


def quantize_shard(read_flat: Callable[[int, int], torch.Tensor], n: int, spans, q: QuantConfig, device):
    """(packed bytes of elements [e0, e1), fp32 absmax of blocks [b0, b1)) from the source values.

    Reads and quantizes only the block-aligned union of the two ranges; blockwise quantization is local
    to each block, so the bytes equal those of quantizing the whole tensor.
    """
    e0, e1, b0, b1 = spans
    bs = q.blocksize
    ranges = ([(e0 // bs, -(-e1 // bs))] if e1 > e0 else []) + ([(b0, b1)] if b1 > b0 else [])
    if not ranges:
        empty = torch.empty(0, device=device)
        return empty.to(torch.uint8), empty.float()
    u0, u1 = min(r[0] for r in ranges), max(r[1] for r in ranges)
    flat = read_flat(u0 * bs, min(u1 * bs, n)).to(device)
    packed, absmax = quantize_blocks(flat, q)
    off = (e0 - u0 * bs) // 2
    return packed[off : off + max(e1 - e0, 0) // 2], absmax[b0 - u0 : b1 - u0]


def fill_quantized(
    layer: nn.Module, hf_name: str, source, q: QuantConfig, device: torch.device, prequant: str | None
) -> None:
    """Fill this rank's packed bytes of a Linear4bit and attach the full quant state (see module doc).

    PREQUANT: None (quantize this rank's blocks of the dense source), "qlaunch" (`qlaunch quantize`'s packed
    bytes and fp32 scales) or "bnb" (bitsandbytes' own checkpoint: packed bytes and a finished state)."""
    from torch.distributed.tensor import DTensor

    p = layer.weight
    local, r0, r1 = local_view(p)
    rank, world, group = shard_group(p)
    out_f, in_f = layer.out_features, layer.in_features
    n = out_f * in_f
    spans = shard_spans(n, r0, r1, 2 * local.element_size(), q.blocksize, rank, world)
    e0, e1, b0, b1 = spans
    if prequant == "bnb":
        packed_local, qs = read_hub_shard(source, hf_name, q, e0, e1, device)
    else:
        if prequant == "qlaunch":
            packed_local = source.read_raw(hf_name + PACKED_SUFFIX, e0 // 2, e1 // 2, device).to(device)
            absmax_own = source.read_raw(hf_name + ABSMAX_SUFFIX, b0, b1, device).to(device).float()
        else:
            packed_local, absmax_own = quantize_shard(
                lambda a, b: source.read_flat(hf_name, a, b, device), n, spans, q, device
            )
        absmax_full = all_gather_blocks(absmax_own, -(-n // q.blocksize), world, group, device)
        qs = make_quant_state(absmax_full, (out_f, in_f), q)
    if e1 > e0:
        local.view(torch.uint8).reshape(-1)[: (e1 - e0) // 2].copy_(packed_local)
    layer.quant_state = qs
    if not isinstance(p, DTensor):
        from bitsandbytes.nn import Params4bit

        layer.weight = Params4bit(
            local,
            requires_grad=False,
            quant_state=qs,
            blocksize=q.blocksize,
            compress_statistics=q.double_quant,
            quant_type=q.type,
            quant_storage=local.dtype,
            module=layer,
            bnb_quantized=True,
        )


def read_hub_shard(source, hf_name: str, q: QuantConfig, e0: int, e1: int, device):
    """(packed bytes of elements [e0, e1), whole QuantState) of a weight of a bitsandbytes 4-bit checkpoint:
    the bytes are this rank's share only (any storage dtype: bytes e0/2 to e1/2), the small state is read whole
    on every rank, so nothing is gathered."""
    from launcher.rank.model.bnb_hub import hub_quant_state

    packed = source.read_bytes(hf_name, e0 // 2, e1 // 2, device).to(device)
    return packed, hub_quant_state(source, source.dir, hf_name, q, device)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB int8 [out, in], SCB fp32 [out]) of a whole weight, as bitsandbytes' Int8Params quantizes it.

    Int8Params casts to fp16 before its row-wise quantization; doing the same makes the bytes equal to
    `Int8Params(weight, has_fp16_weights=False).to(device)` for any source dtype (tests/test_loading.py).
    """
    from bitsandbytes.functional import int8_vectorwise_quant

    cb, scb, _ = int8_vectorwise_quant(weight.contiguous().to(torch.float16))
    return cb, scb


def fill_int8(layer: nn.Module, hf_name: str, source, device: torch.device) -> None:
    """Quantize a whole weight into a Linear8bitLt's Int8Params (CB as the parameter's data, SCB beside it).

    Every rank reads and quantizes the full tensor: the only backends that carry 8-bit weights (none, ZeRO-2)
    replicate them (see the module doc).
    """
    from bitsandbytes.nn import Int8Params
    from torch.distributed.tensor import DTensor

    p = layer.weight
    assert not isinstance(p, DTensor), f"{hf_name}: 8-bit weights cannot be sharded (the recipe refuses it)"
    out_f, in_f = layer.out_features, layer.in_features
    full = source.read_flat(hf_name, 0, out_f * in_f, device).to(device).reshape(out_f, in_f)
    cb, scb = quantize_int8(full)
    # The int8 storage materialize allocated is dropped for bitsandbytes' own tensor (same size, no copy).
    layer.weight = Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)


def all_gather_blocks(own: torch.Tensor, total: int, world: int, group, device) -> torch.Tensor:
    if world == 1:
        return own.contiguous()
    c = -(-total // world)
    buf = torch.zeros(c, dtype=torch.float32, device=device)
    buf[: own.numel()] = own
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf, group=group)
    return torch.cat(parts)[:total].contiguous()
