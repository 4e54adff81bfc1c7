"""`qlaunch quantize`: a pre-quantized 4-bit checkpoint, written one tensor at a time.

For each quantized linear weight W it stores `NAME.qweight` (the packed 4-bit bytes, uint8, flat) and
`NAME.absmax` (fp32 per-block scales, before double quantization); every other tensor is copied. Ranks
loading it read just the byte range of their shard (half a byte per weight instead of two).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from launcher.errors import UserError
from launcher.recipe import QuantConfig
from launcher.sources import (
    ABSMAX_SUFFIX,
    INDEX_FILE,
    PACKED_SUFFIX,
    QUANT_FORMAT,
    QUANT_META,
    SafetensorsSource,
    read_json_object,
    read_quant_meta,
)


def quantize_checkpoint(model_dir: str, out: str, quant_type: str, blocksize: int, skip: list[str]) -> Path:
    src_dir, out_dir = Path(model_dir), Path(out)
    src, q = _checked_inputs(src_dir, out_dir, quant_type, blocksize)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        meta = _write_tensors(src, tmp, q, skip)
        for extra in src_dir.iterdir():
            if extra.is_file() and not extra.name.endswith(".safetensors") and extra.name != INDEX_FILE:
                shutil.copy2(extra, tmp / extra.name)
        (tmp / QUANT_META).write_text(json.dumps(meta, indent=1) + "\n")
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{out}: cannot write the quantized checkpoint ({err.strerror or err})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written checkpoint beside OUT
        raise
    return out_dir


def _checked_inputs(src_dir: Path, out_dir: Path, quant_type: str, blocksize: int):
    """(source, quant config) once everything about the input and OUT is known good; nothing written yet."""
    if not src_dir.is_dir():
        raise UserError(f"{src_dir}: not a model directory (no such directory)")
    if not os.path.lexists(src_dir / "config.json"):
        raise UserError(f"{src_dir}: not a model directory (no config.json)")
    read_json_object(src_dir / "config.json", "model config")  # copied into OUT: it must be a real JSON file
    if read_quant_meta(src_dir) is not None:
        raise UserError(f"{src_dir}: already pre-quantized")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir}: exists and is not empty")
    try:
        q = QuantConfig(type=quant_type, blocksize=blocksize)
    except Exception as err:  # pydantic's message names the field
        raise UserError(f"qlaunch quantize: {err.errors()[0]['msg']}") from None  # type: ignore[attr-defined]
    src = SafetensorsSource(src_dir)  # every header validated
    for name in src.where:
        src.dtype(name)  # every tensor is read as values: an int or unknown dtype is refused before writing
    return src, q


def _write_tensors(src: SafetensorsSource, tmp: Path, q: QuantConfig, skip: list[str]) -> dict:
    """Quantize or copy every tensor into TMP, one output file per input file; the QUANT_META record."""
    from launcher.loading import quantize_blocks

    # bitsandbytes' CPU kernel takes ~10 s per 8B-model MLP matrix; a GPU does the whole model in seconds.
    # The loaders quantize on their own device, so this matches what a GPU run's ranks would compute.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quantized = []
    # One output file per input file keeps peak memory at one shard's worth of tensors.
    by_file: dict[Path, list[str]] = {}
    for name, f in src.where.items():
        by_file.setdefault(f, []).append(name)
    for f, names in sorted(by_file.items()):
        tensors: dict[str, torch.Tensor] = {}
        for name in sorted(names):
            shape = src.shape(name)
            module = name.rsplit(".", 1)[0]
            is_linear = name.endswith(".weight") and len(shape) == 2 and ".layers." in name
            if is_linear and not any(module == s or module.endswith("." + s) for s in skip):
                flat = src.read_flat(name, 0, shape[0] * shape[1], device)
                packed, absmax = quantize_blocks(flat.to(device), q)
                tensors[name + PACKED_SUFFIX] = packed.cpu().contiguous()
                tensors[name + ABSMAX_SUFFIX] = absmax.cpu().contiguous()
                quantized.append(name)
            else:
                tensors[name] = src.read_flat(name, 0, int(torch.Size(shape).numel())).reshape(shape).clone()
        save_file(tensors, str(tmp / f.name), metadata={"format": "pt"})
    return {
        "format": QUANT_FORMAT,
        "type": q.type,
        "blocksize": q.blocksize,
        "quantized": quantized,
        "shapes": {n: list(src.shape(n)) for n in quantized},
    }
