"""Filling each rank's own shards (still meta after the backend sharded them), tensor by tensor, from a
sliceable source: dense, 4-bit and 8-bit weights, LoRA initialisation; and opening that source."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from launcher.errors import UserError
from launcher.plan.model_info import is_bnb_4bit
from launcher.plan.recipe import Recipe
from launcher.rank.model.bnb_hub import QUANT_TYPES, STATE_KEY, check_stored_4bit, hub_quant_config, stored_4bit
from launcher.rank.model.dora import MAGNITUDE, magnitude_bases, magnitude_rows
from launcher.rank.model.experts import NF4Experts, fill_experts
from launcher.rank.model.quant import fill_int8, fill_quantized
from launcher.rank.model.shard import LoadStats, local_view
from launcher.rank.model.skeleton import linear_names, retie, shared_parameters
from launcher.rank.model.sources import (
    ABSMAX_SUFFIX,
    PACKED_SUFFIX,
    QUANT_META,
    RandomSource,
    SafetensorsSource,
    read_quant_meta,
)


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
    from launcher.rank.model.sources import name_seed

    g = torch.Generator().manual_seed(name_seed(seed, name, 0))
    t = torch.empty(shape, dtype=torch.float32)
    bound = 1.0 / math.sqrt(shape[1]) if len(shape) > 1 else 0.0  # = kaiming_uniform(a=sqrt(5)) bound
    return t.uniform_(-bound, bound, generator=g)


def fill_base_param(module, pname, p, hf_name, source, recipe, device, prequant, quant_layers, stats, progress):
    """Fill one frozen base parameter (4-bit packed, int8 or dense) from the source; shared by every loader."""
    if isinstance(module, NF4Experts):
        fill_experts(module, pname, hf_name, source, recipe.quant, device)
    elif module in quant_layers and pname == "weight" and recipe.quant.bits == 8:
        fill_int8(module, hf_name, source, device)
    elif module in quant_layers and pname == "weight":
        fill_quantized(module, hf_name, source, recipe.quant, device, prequant)
    else:
        fill_dense(p, hf_name, source, device)
    stats.tensors += 1
    if progress and hf_name.endswith(("mlp.down_proj.weight", "embed_tokens.weight")):
        progress(hf_name, getattr(source, "bytes_read", 0))


def fill_lora_param(
    local: torch.Tensor, name: str, shape: tuple[int, ...], r0: int, r1: int, seed: int, magnitude=None
):
    """LoRA B starts at zero, A from the name-keyed generator (rows r0:r1 of the full matrix); a DoRA
    magnitude from MAGNITUDE(r0, r1), the row norms of its base weight (dora.magnitude_rows)."""
    if "lora_B" in name:
        local.zero_()
    elif "lora_A" in name:
        key = name.split("base_model.model.", 1)[-1]
        local.copy_(lora_init(key, shape, seed)[r0:r1].to(device=local.device, dtype=local.dtype))
    elif MAGNITUDE in name and magnitude is not None:
        local.copy_(magnitude(r0, r1).to(device=local.device, dtype=local.dtype))
    else:
        raise UserError(f"{name}: no loader for this parameter")


def lora_filler(
    root: nn.Module, module_names: dict[nn.Module, str], source, recipe: Recipe, device, prequant: str | None
):
    """fill(local, name, shape, r0, r1): `fill_lora_param` for the parameters under ROOT, with each DoRA
    magnitude's base layer and checkpoint tensor resolved (the base must be filled first: its quant state)."""
    bases = magnitude_bases(root) if recipe.lora.use_dora else {}

    def fill(local: torch.Tensor, name: str, shape: tuple[int, ...], r0: int, r1: int) -> None:
        magnitude = None
        if MAGNITUDE in name:
            base = bases[root.get_submodule(name.rpartition(".")[0])]
            hf_name = module_names[base] + ".weight"

            def magnitude(a: int, b: int) -> torch.Tensor:
                return magnitude_rows(base, hf_name, a, b, source, recipe, device, prequant)

        fill_lora_param(local, name, shape, r0, r1, recipe.lora.init_seed, magnitude)

    return fill


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
    prequant: str | None,
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
    shared = shared_parameters(root)
    root.to_empty(device=torch.device("cpu") if offload else device)
    retie(shared)  # to_empty gives every owner of a tied weight a parameter of its own
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
        fill_lora = lora_filler(root, module_names, source, recipe, device, prequant)
        for name, p in root.named_parameters():
            if "lora_" in name:
                local, r0, r1 = local_view(p)
                fill_lora(local, name, tuple(p.shape), r0, r1)
    stats.bytes_read = getattr(source, "bytes_read", 0)
    stats.seconds = time.perf_counter() - t0
    return stats


def open_source(
    recipe: Recipe,
    model_dir: Path,
    config,
    shapes: dict[str, tuple[int, ...]],
    device,
    constants: dict[str, float] | None = None,
):
    """(source, how it is pre-quantized) for the recipe's model.init and the directory's contents: None,
    "qlaunch" (a `qlaunch quantize` output) or "bnb" (a bitsandbytes 4-bit checkpoint). CONSTANTS: the 1-D
    parameters random init sets to a constant (skeleton.constant_inits).

    Every tensor the architecture needs is checked against the headers here (name, shape, dtype; for a
    pre-quantized checkpoint the packed bytes and scales too), so a mismatched file never reaches a rank's
    reads."""
    if recipe.model.init == "random":
        std = float(getattr(config, "initializer_range", 0.02))
        return RandomSource(shapes, std, recipe.train.seed, device, constants), None
    meta = read_quant_meta(model_dir)
    bnb = is_bnb_4bit(config)
    if meta is not None and bnb:
        raise UserError(
            f"{model_dir}: has both {QUANT_META} and a bitsandbytes quantization_config in config.json; "
            "a checkpoint is quantized one way"
        )
    src = SafetensorsSource(model_dir)
    if bnb:
        _check_hub_4bit(src, model_dir, shapes, recipe)
        return src, "bnb"
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
        _check_dense(src, model_dir, name, shape)
    return src, "qlaunch" if meta is not None else None


def quant_config(recipe: Recipe, causal_lm: nn.Module, source, prequant: str | None):
    """The quant section the 4-bit swap follows: the recipe's, except that a bitsandbytes checkpoint decides
    itself which linears are 4-bit (hub repositories leave some dense through llm_int8_skip_modules)."""
    if prequant != "bnb":
        return recipe.quant
    return hub_quant_config(recipe.quant, linear_names(causal_lm), stored_4bit(source))


def _check_dense(src: SafetensorsSource, model_dir: Path, name: str, shape: tuple[int, ...]) -> None:
    if tuple(src.shape(name)) != tuple(shape):
        if any(name + STATE_KEY + t in src for t in QUANT_TYPES):
            raise UserError(
                f"{model_dir}: tensor '{name}' is a bitsandbytes 4-bit weight, but config.json has no "
                "quantization_config saying so (it is written with the weights: restore it)"
            )
        raise UserError(f"{model_dir}: tensor '{name}' has shape {src.shape(name)}, the config implies {shape}")
    src.dtype(name)  # rejects int/unknown dtypes with the file named


def _check_hub_4bit(src: SafetensorsSource, model_dir: Path, shapes: dict[str, tuple[int, ...]], recipe) -> None:
    """A bitsandbytes 4-bit checkpoint: quant.bits = 4, every weight it stores packed fits the skeleton and
    the recipe's quant section, every other tensor is dense as usual."""
    if recipe.quant.bits != 4:
        raise UserError(
            f"{model_dir}: a bitsandbytes 4-bit checkpoint (quantization_config in config.json) cannot be "
            f"loaded with quant.bits = {recipe.quant.bits!r}; set quant.bits = 4, or model.path to the "
            "unquantized checkpoint"
        )
    stored = stored_4bit(src)
    for name, shape in shapes.items():
        if name not in stored:
            if name not in src:
                raise UserError(f"{model_dir}: tensor '{name}' missing from the checkpoint (a shard file missing?)")
            if tuple(src.shape(name)) != tuple(shape):
                raise UserError(
                    f"{model_dir}: tensor '{name}' has shape {list(src.shape(name))}, neither the config's "
                    f"{list(shape)} nor a 4-bit weight ({name}{STATE_KEY}nf4 or fp4, its quant-state record, "
                    "is missing)"
                )
            _check_dense(src, model_dir, name, shape)
        elif len(shape) != 2:
            raise UserError(f"{model_dir}: tensor '{name}' is stored in 4-bit, but it is no linear weight")
        else:
            check_stored_4bit(src, model_dir, name, shape, recipe.quant)


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
