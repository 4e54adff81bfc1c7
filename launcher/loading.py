"""Meta-device skeleton, 4-bit/8-bit layer replacement, LoRA, and per-rank shard materialisation.

Order matters and is the whole point of this module:
  1. build the architecture on the meta device (no memory),
  2. swap target linears for bitsandbytes 4-bit (or LLM.int8) layers and inject LoRA (still meta),
  3. let the backend shard the parameters (FSDP2 `fully_shard`) — shards are still meta,
  4. allocate each rank's local shards and fill them, tensor by tensor, from a sliceable source.
No rank ever holds a whole tensor it does not own, and no rank waits for another to broadcast weights.

4-bit layout: bitsandbytes quantizes in independent blocks of `blocksize` consecutive elements of the
flattened weight, so rank r can quantize just the blocks under its shard and get the very bytes a
whole-tensor quantization would give. The per-block scales (absmax) are computed the same way for the
blocks each rank owns and all-gathered (they are 1/32 to 1/8 of the packed bytes): every rank needs all
of them to dequantize the all-gathered weight.

8-bit layout (LLM.int8): one int8 row per output feature plus one fp32 scale per row (`Int8Params` CB and
SCB). The scales are not a parameter, so a backend that partitions and re-gathers parameters would move the
rows without them; the recipe therefore allows 8-bit only where weights are replicated (backend 'none',
ZeRO-2), and every rank quantizes whole tensors.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from launcher.errors import UserError
from launcher.recipe import QuantConfig, Recipe
from launcher.sources import (
    ABSMAX_SUFFIX,
    PACKED_SUFFIX,
    RandomSource,
    SafetensorsSource,
    read_json_object,
    read_quant_meta,
)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Architectures whose decoder layers live at `model.layers` and that were tested with this loader, with
# their config's model_type (transformers builds the model from model_type, not from architectures).
MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_ARCHS = tuple(MODEL_TYPES)
SUPPORTED_MODEL_TYPES = tuple(MODEL_TYPES.values())
# Sizes the skeleton is built from: transformers accepts 0 or negative values for some and builds a
# model without layers, or fails deep inside torch with a negative dimension.
POSITIVE_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# Upper bounds no real model reaches (Llama-3.1-405B: 126 layers, hidden 16384, intermediate 53248, 128 heads;
# Gemma 3: a 262,208-token vocabulary; Llama 4 Scout: 10M positions), so that a crafted config.json cannot make
# preflight build a skeleton of 100,000 layers (it hangs) or the planner count absurd bytes.
MAX_SIZES = {
    "vocab_size": 1 << 24,
    "hidden_size": 1 << 20,
    "intermediate_size": 1 << 20,
    "num_hidden_layers": 1024,
    "num_attention_heads": 4096,
    "num_key_value_heads": 4096,
    "head_dim": 1 << 16,
    "max_position_embeddings": 1 << 28,
}


# ------------------------------------------------------------------ config & skeleton


def resolve_model_dir(recipe: Recipe) -> Path:
    """Local directory for the model's config/weights; hub ids go through huggingface_hub's cache.

    A relative path is never looked up in the current directory: the recipe made every local path absolute
    (relative to the recipe file, or to where `--set` was typed), so what is still relative is a hub id,
    and a planted ./org/name folder where qlaunch runs must not stand in for it."""
    p = Path(recipe.model.path).expanduser()
    if p.is_absolute() and p.exists():
        if not p.is_dir():
            raise UserError(
                f"model.path = {recipe.model.path!r}: not a directory (a model directory holds config.json "
                "and *.safetensors files)"
            )
        # lexists: a config.json that is a FIFO or a dangling link exists, and load_config says what it is.
        if not os.path.lexists(p / "config.json"):
            raise UserError(f"model.path = {recipe.model.path!r}: directory has no config.json")
        return p
    if recipe.model.path.count("/") == 1 and not recipe.model.path.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.model", "*.txt"]
        if recipe.model.init == "pretrained":
            patterns.append("*.safetensors")
        try:
            return Path(snapshot_download(recipe.model.path, revision=recipe.model.revision, allow_patterns=patterns))
        except Exception as err:  # network, auth, missing repo: all user-facing
            raise UserError(f"model.path = {recipe.model.path!r}: could not fetch from the hub ({err})") from None
    raise UserError(f"model.path = {recipe.model.path!r}: no such directory (and not a hub id of the form org/name)")


def load_config(recipe: Recipe, model_dir: Path):
    """The model's transformers config; anything wrong with config.json is one line naming it."""
    from transformers import AutoConfig

    path = model_dir / "config.json"
    raw = read_json_object(path, "model config")
    problem = config_dict_problem(raw, recipe.model.trust_remote_code)
    if problem:
        raise UserError(f"{path}: {problem}")
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=recipe.model.trust_remote_code)
    except Exception as err:  # any refusal of a config file is bad input, not a crash
        raise UserError(f"{path}: transformers cannot load this config ({transformers_refusal(err)})") from None
    archs = list(getattr(config, "architectures", None) or [])
    if not archs or archs[0] not in SUPPORTED_ARCHS:
        name = (_identifier(archs[0]) or "(not a class name)") if archs else "(none)"
        raise UserError(f"{path}: architecture {name} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}")
    model_type = MODEL_TYPES[archs[0]]
    if config.model_type != model_type and not recipe.model.trust_remote_code:
        # transformers builds the model from model_type, not from architectures: another family's
        # tensors would be expected (and reported missing) under a name that says Llama.
        raise UserError(  # config.model_type is transformers' own name for the class it loaded
            f"{path}: model_type {config.model_type!r} does not match architectures = [{archs[0]!r}], whose "
            f"model_type is {model_type!r}"
        )
    problem = config_size_problem(config)
    if problem:
        raise UserError(f"{path}: {problem}")
    if getattr(config, "tie_word_embeddings", False):
        # The loader fills lm_head and the embedding as separate tensors and FSDP shards them apart; a
        # tied pair would silently come untied. Refuse rather than train a different model.
        raise UserError(
            f"{path}: tie_word_embeddings = true (e.g. Llama-3.2-1B/3B, small Qwen2.5) is not "
            "supported yet; supported: untied models such as Llama-3.1-8B/70B, Mistral-7B, Qwen2.5-7B+"
        )
    return config


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Errors only from transformers' loggers: its warnings about a config quote the file's values (and
    would be a second line beside qlaunch's one-line error)."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _identifier(value: object) -> str | None:
    """VALUE if it is a short name such as `llama` or `LlamaForCausalLM` (safe to show), else None."""
    return value if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value) else None


def config_dict_problem(raw: dict, trust_remote_code: bool) -> str | None:
    """What makes a parsed config.json unloadable before transformers sees it (its messages quote values)."""
    from transformers import CONFIG_MAPPING

    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        return f"no model_type (a string such as {', '.join(map(repr, SUPPORTED_MODEL_TYPES))})"
    remote = trust_remote_code and "auto_map" in raw
    if model_type not in CONFIG_MAPPING and not remote:
        import transformers

        name = _identifier(model_type)
        return (
            f"model_type {name + ' ' if name else ''}is not an architecture transformers "
            f"{transformers.__version__} knows; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    archs = raw.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        return 'architectures must be a list of class names such as ["LlamaForCausalLM"]'
    return None


def config_size_problem(config) -> str | None:
    """The sizes the skeleton is built from, checked (transformers lets some impossible ones through).

    CONFIG is a transformers config or a config.json dict (the memory planner reads the file itself)."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    for key in POSITIVE_SIZES:
        value = get(key)
        if type(value) is not int or value <= 0:
            return f"{key} must be a positive integer"
    heads = get("num_attention_heads")
    kv_heads = heads if get("num_key_value_heads") is None else get("num_key_value_heads")
    if type(kv_heads) is not int or kv_heads <= 0 or heads % kv_heads:
        return "num_key_value_heads must be a positive integer that divides num_attention_heads"
    for key in ("head_dim", "max_position_embeddings"):
        value = get(key)
        if value is not None and (type(value) is not int or value <= 0):
            return f"{key} must be a positive integer"
    for key, limit in MAX_SIZES.items():
        value = get(key)
        if type(value) is int and value > limit:  # the value itself is not shown: it comes from the file
            return f"{key} is larger than any real model's (at most {limit:,})"
    return None


def transformers_refusal(err: Exception) -> str:
    """Why transformers refused a config, naming no value from it.

    A strict-dataclass error's first line names the field or validator, and its next line the value; other
    messages may quote the file, so only their class is given."""
    from huggingface_hub.errors import StrictDataclassError

    first = str(err).strip().splitlines()[0].rstrip(":") if str(err).strip() else ""
    if isinstance(err, StrictDataclassError) and first:
        return first[:1].lower() + first[1:200]
    return f"{type(err).__name__}; compare it with the config.json of the same model on the hub"


def max_positions(config) -> int | None:
    """max_position_embeddings of the (text) model, if the config gives one."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return value if type(value) is int and value > 0 else None


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


def _matches(name: str, suffixes: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def lora_targets(recipe: Recipe, causal_lm: nn.Module) -> list[str]:
    """Module-name suffixes LoRA wraps; validated against the architecture before any weight is read."""
    names = linear_names(causal_lm)
    if recipe.lora.target_modules == "all-linear":
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names if ".layers." in n})
        return leaves
    for t in recipe.lora.target_modules:
        if not any(_matches(n, [t]) for n in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise UserError(f"lora.target_modules: {t!r} matches no linear layer; this model has {', '.join(leaves)}")
    return list(recipe.lora.target_modules)


# ------------------------------------------------------------------ quantized layers


def _swap_linears(causal_lm: nn.Module, q: QuantConfig, build: Callable[[str, nn.Linear], nn.Module]):
    """Replace every non-skipped linear by build(name, linear) (a quantized layer on meta); {name: layer}."""
    out: dict[str, nn.Module] = {}
    for name in linear_names(causal_lm):
        if _matches(name, q.skip_modules):
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


# ------------------------------------------------------------------ shard geometry


def shard_rows(dim0: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, end) of dim 0 that rank owns under FSDP2's even (torch.chunk-style) split."""
    c = -(-dim0 // world)
    s = min(rank * c, dim0)
    return s, min(s + c, dim0)


def _shard_dim(p) -> int:
    """Mesh dimension along which a DTensor parameter is sharded: FSDP's (Shard(0),), or HSDP's
    (Replicate(), Shard(0)) where the rows depend only on the shard coordinate (replicas hold the same)."""
    from torch.distributed.tensor import Replicate, Shard

    pl = p.placements
    if len(pl) == 1 and isinstance(pl[0], Shard) and pl[0].dim == 0:
        return 0
    assert len(pl) == 2 and isinstance(pl[0], Replicate) and isinstance(pl[1], Shard) and pl[1].dim == 0, pl
    return 1


def local_view(p: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(local tensor, first global row, row count) of a parameter, sharded (DTensor) or not."""
    from torch.distributed.tensor import DTensor

    if isinstance(p, DTensor):
        mesh, dim = p.device_mesh, _shard_dim(p)
        s, e = shard_rows(p.shape[0], mesh.get_local_rank(dim), mesh.size(dim))
        local = p.to_local()
        assert local.shape[0] == e - s, (local.shape, s, e)
        return local, s, e
    return p.data, 0, p.shape[0]


# ------------------------------------------------------------------ filling


@dataclass
class LoadStats:
    bytes_read: int = 0
    seconds: float = 0.0
    tensors: int = 0
    events: list[str] = field(default_factory=list)


def shard_group(p: torch.Tensor) -> tuple[int, int, object]:
    from torch.distributed.tensor import DTensor

    if isinstance(p, DTensor):
        mesh, dim = p.device_mesh, _shard_dim(p)
        return mesh.get_local_rank(dim), mesh.size(dim), mesh.get_group(dim)
    return 0, 1, None


def shard_spans(n: int, r0: int, r1: int, per_row: int, blocksize: int, rank: int, world: int):
    """Element range [e0, e1) of this rank's packed rows, and the absmax blocks [b0, b1) it contributes.

    Rows are FSDP's dim-0 shard of the packed storage tensor (`per_row` 4-bit elements per row); blocks are
    an even split of all quantization blocks, so every block's scale is computed by exactly one rank.
    """
    e0, e1 = r0 * per_row, min(r1 * per_row, n)
    b0, b1 = shard_rows(-(-n // blocksize), rank, world)
    return e0, e1, b0, b1


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
    layer: nn.Module, hf_name: str, source, q: QuantConfig, device: torch.device, prequant: bool
) -> None:
    """Fill this rank's packed bytes of a Linear4bit and attach the full quant state (see module doc)."""
    from torch.distributed.tensor import DTensor

    p = layer.weight
    local, r0, r1 = local_view(p)
    rank, world, group = shard_group(p)
    out_f, in_f = layer.out_features, layer.in_features
    n = out_f * in_f
    spans = shard_spans(n, r0, r1, 2 * local.element_size(), q.blocksize, rank, world)
    e0, e1, b0, b1 = spans
    if prequant:
        packed_local = source.read_raw(hf_name + PACKED_SUFFIX, e0 // 2, e1 // 2, device).to(device)
        absmax_own = source.read_raw(hf_name + ABSMAX_SUFFIX, b0, b1, device).to(device).float()
    else:
        packed_local, absmax_own = quantize_shard(
            lambda a, b: source.read_flat(hf_name, a, b, device), n, spans, q, device
        )
    if e1 > e0:
        local.view(torch.uint8).reshape(-1)[: (e1 - e0) // 2].copy_(packed_local)
    absmax_full = _all_gather_blocks(absmax_own, -(-n // q.blocksize), world, group, device)
    qs = make_quant_state(absmax_full, (out_f, in_f), q)
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


def _all_gather_blocks(own: torch.Tensor, total: int, world: int, group, device) -> torch.Tensor:
    if world == 1:
        return own.contiguous()
    c = -(-total // world)
    buf = torch.zeros(c, dtype=torch.float32, device=device)
    buf[: own.numel()] = own
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf, group=group)
    return torch.cat(parts)[:total].contiguous()


def fill_dense(p: torch.Tensor, hf_name: str, source, device: torch.device) -> None:
    local, r0, r1 = local_view(p)
    if r1 <= r0:
        return
    row = math.prod(p.shape[1:]) if p.dim() > 1 else 1
    src = source.read_flat(hf_name, r0 * row, r1 * row, device)
    local.copy_(src.to(device=device, dtype=local.dtype).reshape(local.shape))


def lora_init(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """peft's default LoRA A init (kaiming-uniform, a=sqrt(5)) from a generator keyed by the module name.

    Generated whole on every rank (LoRA matrices are small) so all ranks and all world sizes agree.
    """
    from launcher.sources import _name_seed

    g = torch.Generator().manual_seed(_name_seed(seed, name, 0))
    t = torch.empty(shape, dtype=torch.float32)
    bound = 1.0 / math.sqrt(shape[1]) if len(shape) > 1 else 0.0  # = kaiming_uniform(a=sqrt(5)) bound
    return t.uniform_(-bound, bound, generator=g)


def fill_base_param(module, pname, p, hf_name, source, recipe, device, prequant, quant_layers, stats, progress):
    """Fill one frozen base parameter (4-bit packed, int8 or dense) from the source; shared by every loader."""
    if module in quant_layers and pname == "weight" and recipe.quant.bits == 8:
        fill_int8(module, hf_name, source, device)
    elif module in quant_layers and pname == "weight":
        fill_quantized(module, hf_name, source, recipe.quant, device, prequant)
    else:
        fill_dense(p, hf_name, source, device)
    stats.tensors += 1
    if progress and hf_name.endswith(("mlp.down_proj.weight", "embed_tokens.weight")):
        progress(hf_name, getattr(source, "bytes_read", 0))


def fill_lora_param(local: torch.Tensor, name: str, shape: tuple[int, ...], r0: int, r1: int, seed: int) -> None:
    """LoRA B starts at zero, A from the name-keyed generator (rows r0:r1 of the full matrix)."""
    if "lora_B" in name:
        local.zero_()
    elif "lora_A" in name:
        key = name.split("base_model.model.", 1)[-1]
        local.copy_(lora_init(key, shape, seed)[r0:r1].to(device=local.device, dtype=local.dtype))
    else:
        raise UserError(f"{name}: no loader for this parameter (lora.use_dora is not supported yet; set it to false)")


def iter_base_params(
    module_names: dict[nn.Module, str],
) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    seen: set[int] = set()
    for module, prefix in module_names.items():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            yield (f"{prefix}.{pname}" if prefix else pname), module, pname, p


def materialize(
    root: nn.Module,
    module_names: dict[nn.Module, str],
    quant_layers: set[nn.Module],
    source,
    recipe: Recipe,
    device: torch.device,
    prequant: bool,
    progress: Callable[[str], None] | None = None,
) -> LoadStats:
    """Allocate local shards on `device` and fill them; non-persistent buffers are restored afterwards.

    With parallel.fsdp.cpu_offload the shards are allocated in host memory (FSDP2 copies each unit's
    shards to the GPU for its all-gather and refuses shards that start on the GPU); buffers and the 4-bit
    quant states, which the GPU reads directly, stay on `device`."""
    stats = LoadStats()
    t0 = time.perf_counter()
    buffers = {n: b.detach().clone() for n, b in root.named_buffers()}
    p = recipe.parallel
    offload = device.type == "cuda" and p.backend == "fsdp" and p.fsdp.cpu_offload
    root.to_empty(device=torch.device("cpu") if offload else device)
    with torch.no_grad():
        if offload:  # the buffers (rotary tables) go to the GPU, which reads them
            for m in root.modules():
                for key, b in m._buffers.items():
                    if b is not None:
                        m._buffers[key] = b.to(device)
        for n, b in root.named_buffers():
            b.copy_(buffers[n].to(b.device))
        for hf_name, module, pname, p in iter_base_params(module_names):
            fill_base_param(module, pname, p, hf_name, source, recipe, device, prequant, quant_layers, stats, progress)
        for name, p in root.named_parameters():
            if "lora_" in name:
                local, r0, r1 = local_view(p)
                fill_lora_param(local, name, tuple(p.shape), r0, r1, recipe.lora.init_seed)
    stats.bytes_read = getattr(source, "bytes_read", 0)
    stats.seconds = time.perf_counter() - t0
    return stats


def open_source(recipe: Recipe, model_dir: Path, config, shapes: dict[str, tuple[int, ...]], device):
    """(source, prequantized?) for the recipe's model.init and the directory's contents.

    Every tensor the architecture needs is checked against the headers here (name, shape, dtype; for a
    pre-quantized checkpoint the packed bytes and scales too), so a mismatched file never reaches a rank's
    reads."""
    if recipe.model.init == "random":
        std = float(getattr(config, "initializer_range", 0.02))
        return RandomSource(shapes, std, recipe.train.seed, device), False
    meta = read_quant_meta(model_dir)
    src = SafetensorsSource(model_dir)
    if meta is not None:
        q = recipe.quant
        want = {"type": q.type, "blocksize": q.blocksize}
        have = {k: meta[k] for k in want}  # validated by read_quant_meta: safe to show
        if q.bits != 4:
            # `qlaunch quantize` writes packed NF4 bytes and block scales: nothing an int8 or dense layer can use.
            raise UserError(
                f"{model_dir}: a `qlaunch quantize` checkpoint (4-bit {meta['type']}) cannot be loaded with "
                f"quant.bits = {q.bits!r}; set model.path to the original checkpoint, or quant.bits = 4"
            )
        if want != have:
            raise UserError(
                f"{model_dir}: pre-quantized with {have}, but the recipe asks for {want}; "
                "quantize again or match the recipe"
            )
    for name, shape in shapes.items():
        if meta is not None and name + PACKED_SUFFIX in src:
            _check_packed(src, model_dir, name, shape, meta)
            continue
        if name not in src:
            raise UserError(f"{model_dir}: tensor '{name}' missing from the checkpoint (a shard file missing?)")
        if tuple(src.shape(name)) != tuple(shape):
            raise UserError(f"{model_dir}: tensor '{name}' has shape {src.shape(name)}, the config implies {shape}")
        src.dtype(name)  # rejects int/unknown dtypes with the file named
    return src, meta is not None


def _check_packed(src: SafetensorsSource, model_dir: Path, name: str, shape: tuple[int, ...], meta: dict) -> None:
    """The packed bytes (uint8, two weights a byte) and fp32 block scales of a pre-quantized weight fit SHAPE."""
    n = math.prod(shape)
    if meta["shapes"].get(name) != list(shape):
        raise UserError(f"{model_dir}: {name} was quantized with another shape than the config implies ({shape})")
    for tensor, dtype, numel in (
        (name + PACKED_SUFFIX, "U8", n // 2),
        (name + ABSMAX_SUFFIX, "F32", -(-n // meta["blocksize"])),
    ):
        if tensor not in src:
            raise UserError(f"{model_dir}: tensor '{tensor}' missing from the pre-quantized checkpoint")
        info = src.info[tensor]
        if info.dtype != dtype or len(info.shape) != 1 or info.shape[0] != numel:
            raise UserError(
                f"{model_dir}: tensor '{tensor}' is {info.dtype} {list(info.shape)}; the config's {shape} "
                f"needs {dtype} [{numel}]"
            )


# ------------------------------------------------------------------ assembly


@dataclass
class Built:
    peft_model: nn.Module  # peft's PeftModel (for export)
    loss_model: nn.Module  # CausalLMLoss: what the step loop calls (the FSDP root)
    causal_lm: nn.Module
    stats: LoadStats
    model_dir: Path


def compile_layers(recipe: Recipe, device: torch.device) -> bool:
    """train.compile resolved: 'auto' compiles the 4-bit layers (the measured case) on GPUs, for every
    backend, unless log.memory_steps records the allocator (see the recipe key)."""
    c = recipe.train.compile
    auto = device.type == "cuda" and recipe.quant.bits == 4 and recipe.log.memory_steps is None
    return c is True or (c == "auto" and auto)


def build_model(
    recipe: Recipe,
    device: torch.device,
    mesh=None,
    progress: Callable[[str], None] | None = None,
    materializer: Callable[..., LoadStats] | None = None,
) -> Built:
    """Skeleton -> 4-bit/8-bit layers -> LoRA -> shard (if a mesh is given) -> fill this rank's shards.

    `materializer` replaces `materialize` (same arguments): DeepSpeed ZeRO-3 fills and partitions the
    model unit by unit (launcher.parallel.deepspeed.zero3_materializer).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from launcher.train import CausalLMLoss

    model_dir = resolve_model_dir(recipe)
    config = load_config(recipe, model_dir)
    causal_lm = build_skeleton(recipe, config)
    # Checkpoint names of every module, recorded before peft moves linears under `.base_layer`.
    module_names = {m: n for n, m in causal_lm.named_modules()}
    shapes = checkpoint_shapes(causal_lm)
    targets = lora_targets(recipe, causal_lm)
    quant_layers: dict[str, nn.Module] = {}
    if recipe.quant.bits == 4:
        quant_layers = replace_with_4bit(causal_lm, recipe.quant)
        module_names = {m: n for n, m in causal_lm.named_modules()}
    elif recipe.quant.bits == 8:
        quant_layers = replace_with_int8(causal_lm, recipe.quant)
        module_names = {m: n for n, m in causal_lm.named_modules()}
    peft_cfg = PeftLoraConfig(
        r=recipe.lora.rank,
        lora_alpha=recipe.lora.alpha,
        lora_dropout=recipe.lora.dropout,
        target_modules=targets,
        use_dora=recipe.lora.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=recipe.model.path,
    )
    peft_model = get_peft_model(causal_lm, peft_cfg)
    quant_params = {id(layer.weight) for layer in quant_layers.values()}
    compute = DTYPES[recipe.quant.compute_dtype]
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.float32)  # fp32 masters; FSDP casts them to compute dtype for matmuls
        elif mesh is None and id(p) not in quant_params and p.is_floating_point():
            # Unsharded runs have no mixed-precision policy: hold frozen dense weights in compute dtype.
            p.data = p.data.to(compute)
    if recipe.train.gradient_checkpointing:
        causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_model = CausalLMLoss(causal_lm)
    if mesh is not None:
        from launcher.parallel.fsdp import apply_fsdp

        apply_fsdp(loss_model, causal_lm, recipe, mesh)
    if compile_layers(recipe, device):
        # The layer's forward only (with the activation checkpoint when it is inside forward): FSDP's
        # hooks run eagerly around it, and all layers share one graph (their parameters are graph inputs,
        # not constants). Graph breaks would split it into many small graphs whose per-call overhead
        # costs more than fusion saves (QLinear4bit exists partly to avoid one).
        for layer in decoder_layers(causal_lm):
            layer.forward = torch.compile(layer.forward)
    source, prequant = open_source(recipe, model_dir, config, shapes, device)
    stats = (materializer or materialize)(
        loss_model, module_names, set(quant_layers.values()), source, recipe, device, prequant, progress
    )
    loss_model.train()
    return Built(peft_model, loss_model, causal_lm, stats, model_dir)
