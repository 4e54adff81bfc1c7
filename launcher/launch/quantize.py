"""`qlaunch quantize`: a pre-quantized 4-bit checkpoint, written one tensor at a time.

For each quantized linear weight W it stores `NAME.qweight` (the packed 4-bit bytes, uint8, flat) and
`NAME.absmax` (fp32 per-block scales, before double quantization); every other tensor is copied. Ranks
loading it read just the byte range of their shard (half a byte per weight instead of two).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from launcher.errors import UserError
from launcher.plan.model_info import quantized_as
from launcher.plan.recipe import QuantConfig
from launcher.rank.model.sources import (
    ABSMAX_SUFFIX,
    INDEX_FILE,
    PACKED_SUFFIX,
    QUANT_FORMAT,
    QUANT_META,
    SafetensorsSource,
    read_quant_meta,
)
from launcher.safe_files import open_regular, read_json_object, shown

# The files besides the weights that a model directory holds (configs, tokenizer, templates, docs, code).
# Nothing else is copied into OUT: not a key or an archive that happens to lie there, nor a directory.
EXTRA_SUFFIXES = frozenset((".json", ".txt", ".model", ".tiktoken", ".jinja", ".md", ".py", ".vocab"))

EXTRA_NAMES = frozenset(("LICENSE", "NOTICE", "COPYING"))

# The flags of `qlaunch quantize` behind the QuantConfig fields it sets.
FLAGS = {"type": "--type", "blocksize": "--blocksize"}


def copy_root(model_dir: Path) -> Path:
    """Where the files of a model directory may really lie: the directory itself, or for a hub snapshot
    (.../models--ORG--NAME/snapshots/REV/, whose files are links to ../../blobs/) its repository's cache folder."""
    real = model_dir.resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent
    return real


def extra_file_problem(path: Path, root: Path) -> str | None:
    """Why PATH, an entry of the model directory besides its weights, is not copied into OUT (None: it is).

    A link is followed only to a file inside ROOT: a link to a private file elsewhere would otherwise be
    copied into a checkpoint the user may share."""
    if path.suffix.lower() not in EXTRA_SUFFIXES and path.name not in EXTRA_NAMES:
        return "not a kind of file a model directory holds"
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "a dangling link"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    if not path.resolve().is_relative_to(root):
        return "a link to a file outside the model directory"
    return None


def _extras(src_dir: Path) -> tuple[list[Path], dict[str, str]]:
    """(the files to copy into OUT, {name: why} for each one left out)."""
    root = copy_root(src_dir)
    copy: list[Path] = []
    skipped: dict[str, str] = {}
    for extra in sorted(src_dir.iterdir()):
        if extra.name.endswith(".safetensors") or extra.name == INDEX_FILE:
            continue
        if extra.is_dir() and not extra.is_symlink():
            continue  # e.g. original/ of a hub snapshot: not part of the transformers checkpoint
        problem = extra_file_problem(extra, root)
        if problem is None:
            copy.append(extra)
        elif not extra.name.startswith("."):  # .gitattributes and the like: nothing anyone misses
            skipped[extra.name] = problem
    return copy, skipped


def _copy_regular(src: Path, dst: Path) -> None:
    fd = open_regular(src, "model file")  # regular, and no FIFO swapped in since it was checked
    with os.fdopen(fd, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout)


def quantize_checkpoint(
    model_dir: str,
    out: str,
    quant_type: str,
    blocksize: int,
    skip: list[str],
    warn: Callable[[str], None] | None = None,
) -> Path:
    src_dir, out_dir = Path(model_dir), Path(out)
    src, q = _checked_inputs(src_dir, out_dir, quant_type, blocksize)
    extras, skipped = _extras(src_dir)
    if "config.json" in skipped:
        raise UserError(f"{src_dir / 'config.json'}: {skipped['config.json']}; the quantized checkpoint needs it")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        meta = _write_tensors(src, tmp, q, skip)
        for extra in extras:
            _copy_regular(extra, tmp / extra.name)
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
    if skipped and warn is not None:
        listed = ", ".join(f"{shown(name)} ({why})" for name, why in skipped.items())
        warn(f"warning: not copied into {out_dir}: {listed}")
    return out_dir


def _checked_inputs(src_dir: Path, out_dir: Path, quant_type: str, blocksize: int):
    """(source, quant config) once everything about the input and OUT is known good; nothing written yet."""
    if not src_dir.is_dir():
        what = "no such directory" if not src_dir.exists() else "a file, not a directory"
        raise UserError(f"{src_dir}: not a model directory ({what}; one holds config.json and *.safetensors)")
    if not os.path.lexists(src_dir / "config.json"):
        raise UserError(f"{src_dir}: not a model directory (no config.json)")
    config = read_json_object(src_dir / "config.json", "model config")  # copied into OUT: a real JSON file
    meta = read_quant_meta(src_dir)
    if meta is not None:
        raise UserError(f"{src_dir}: already quantized (`qlaunch quantize`, {meta['type']}); train it directly")
    if "quantization_config" in config:
        raise UserError(f"{src_dir}: already quantized ({quantized_as(config)}); train it directly")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir}: exists and is not empty")
    try:
        q = QuantConfig(type=quant_type, blocksize=blocksize)
    except Exception as err:  # pydantic's message names the field, which a flag sets
        e = err.errors()[0]  # type: ignore[attr-defined]
        flag = FLAGS.get(str(e["loc"][0]), "qlaunch quantize") if e["loc"] else "qlaunch quantize"
        value = {"--type": shown(quant_type), "--blocksize": str(blocksize)}.get(flag)
        msg = str(e["msg"])
        where = f"{flag} {value}" if value else flag
        raise UserError(f"{where}: {msg[:1].lower() + msg[1:]}") from None
    src = SafetensorsSource(src_dir)  # every header validated
    for name in src.where:
        src.dtype(name)  # every tensor is read as values: an int or unknown dtype is refused before writing
    return src, q


def _write_tensors(src: SafetensorsSource, tmp: Path, q: QuantConfig, skip: list[str]) -> dict:
    """Quantize or copy every tensor into TMP, one output file per input file; the QUANT_META record."""
    from launcher.rank.model.quant import quantize_blocks

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
