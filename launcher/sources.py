"""Where weights come from: sliceable readers over safetensors, pre-quantized checkpoints, or a seeded generator.

Every source answers the same question — "give me elements [start, end) of tensor NAME, flattened" — so
that each rank reads only the byte ranges of its own shard. safetensors files are memory-mapped and
sliced, never loaded whole.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from launcher.errors import UserError

QUANT_META = "qlaunch_quant.json"
# Suffixes of the tensors a pre-quantized checkpoint stores for each quantized linear weight.
PACKED_SUFFIX = ".qweight"
ABSMAX_SUFFIX = ".absmax"

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "U8": torch.uint8}


class Source(Protocol):
    def shape(self, name: str) -> tuple[int, ...]: ...
    def read_flat(self, name: str, start: int, end: int) -> torch.Tensor: ...


class SafetensorsSource:
    """Tensor name -> (file, dtype, shape) from the headers of every *.safetensors file in a directory."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        files = sorted(self.dir.glob("*.safetensors"))
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise UserError(f"{index}: not a valid safetensors index ({err})") from None
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                raise UserError(f"{index}: shard file {missing[0]} is missing from {self.dir}")
        if not files:
            raise UserError(f"{self.dir}: no *.safetensors files (a model directory needs its weights)")
        self.where: dict[str, Path] = {}
        self.meta: dict[str, tuple[torch.dtype | None, tuple[int, ...], str]] = {}
        for f in files:
            for name, (dt, shape) in _read_header(f).items():
                self.where[name] = f
                self.meta[name] = (_DTYPES.get(dt), shape, dt)
        self.bytes_read = 0
        self._handles: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._check(name)[1]

    def dtype(self, name: str) -> torch.dtype:
        dt, _, raw = self._check(name)
        if dt is None:
            raise UserError(f"{self.where[name]}: tensor {name} has dtype {raw}; expected BF16, F16 or F32")
        return dt

    def _check(self, name: str) -> tuple[torch.dtype | None, tuple[int, ...], str]:
        if name not in self.meta:
            raise UserError(
                f"{self.dir}: tensor '{name}' is not in the checkpoint (wrong architecture or a missing shard?)"
            )
        return self.meta[name]

    def _open(self, name: str):
        f = self.where[name]
        if f not in self._handles:
            self._handles[f] = safe_open(str(f), framework="pt", device="cpu")
        return self._handles[f]

    def read_flat(self, name: str, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of the flattened tensor, reading only the rows that cover them."""
        shape = self.shape(name)
        self.dtype(name)
        if start >= end:
            return torch.empty(0, dtype=self.meta[name][0])
        sl = self._open(name).get_slice(name)
        if len(shape) <= 1:
            t = sl[start:end]
        else:
            row = math.prod(shape[1:])
            r0, r1 = start // row, -(-end // row)
            t = sl[r0:r1].reshape(-1)[start - r0 * row : end - r0 * row]
        self.bytes_read += t.numel() * t.element_size()
        return t

    def read_raw(self, name: str, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of a 1-D tensor of any dtype (used for packed 4-bit bytes)."""
        t = self._open(name).get_slice(name)[start:end]
        self.bytes_read += t.numel() * t.element_size()
        return t


def _read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Parse a safetensors header ourselves so a corrupt file gets a one-line error naming it."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            n = int.from_bytes(raw, "little")
            if n <= 0 or n > size - 8 or n > 100_000_000:
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(fh.read(n))
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            a, b = info["data_offsets"]
            if b > size - 8 - n or a > b:
                raise ValueError(f"tensor {name} lies past the end of the file (truncated?)")
            out[name] = (info["dtype"], tuple(info["shape"]))
        return out
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: corrupt safetensors file ({err})") from None


class RandomSource:
    """Deterministic random weights: fixed-size chunks of each tensor, each from its own seeded generator.

    The value of element i depends only on (seed, name, i) — not on the world size or on which rank asks —
    so every rank generates only its own slice and the model is the same at any world size.
    """

    CHUNK = 1 << 20

    def __init__(self, shapes: dict[str, tuple[int, ...]], std: float, seed: int, device: torch.device):
        self.shapes = shapes
        self.std = std
        self.seed = seed
        self.device = device
        self.bytes_read = 0

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return torch.bfloat16

    def read_flat(self, name: str, start: int, end: int) -> torch.Tensor:
        if _is_norm(name):
            return torch.ones(end - start, dtype=torch.bfloat16, device=self.device)
        parts = []
        c0, c1 = start // self.CHUNK, -(-end // self.CHUNK)
        for c in range(c0, c1):
            g = torch.Generator(device=self.device)
            g.manual_seed(_name_seed(self.seed, name, c))
            n = min(self.CHUNK, math.prod(self.shapes[name]) - c * self.CHUNK)
            chunk = torch.randn(n, generator=g, device=self.device, dtype=torch.float32) * self.std
            lo = max(start - c * self.CHUNK, 0)
            hi = min(end - c * self.CHUNK, n)
            parts.append(chunk[lo:hi])
        return torch.cat(parts).to(torch.bfloat16) if parts else torch.empty(0, dtype=torch.bfloat16)


def _is_norm(name: str) -> bool:
    leaf = name.rsplit(".", 2)
    return "norm" in (leaf[-2] if len(leaf) > 1 else name) or name.endswith(".bias")


def _name_seed(seed: int, name: str, chunk: int) -> int:
    h = hashlib.blake2b(f"{seed}/{name}/{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def read_quant_meta(directory: str | Path) -> dict | None:
    p = Path(directory) / QUANT_META
    if not p.is_file():
        return None
    return json.loads(p.read_text())
