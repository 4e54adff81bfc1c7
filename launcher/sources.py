"""Where weights come from: sliceable readers over safetensors, pre-quantized checkpoints, or a seeded generator.

Every source answers the same question — "give me elements [start, end) of tensor NAME, flattened" — so
every rank reads only the byte ranges of its own shard. safetensors files are read with positioned reads
(pread) of exactly those bytes, never loaded whole and never memory-mapped: pages of a mapped file count in
the process's resident memory once touched, so a rank streaming its half of a 16 GB checkpoint through
mmap showed 9 GiB of RSS; read through one reused buffer, its RSS stays about one tensor slice deep.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Protocol

import torch

from launcher.errors import UserError

QUANT_META = "qlaunch_quant.json"
# Suffixes of the tensors a pre-quantized checkpoint stores for each quantized linear weight.
PACKED_SUFFIX = ".qweight"
ABSMAX_SUFFIX = ".absmax"

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "U8": torch.uint8}
_MAX_READ = 1 << 30  # Linux returns at most ~2 GiB per read call; ask for 1 GiB at a time


class Source(Protocol):
    def shape(self, name: str) -> tuple[int, ...]: ...
    def read_flat(self, name: str, start: int, end: int, device=None) -> torch.Tensor: ...


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
        self.offset: dict[str, int] = {}  # byte offset of each tensor's data in its file
        for f in files:
            for name, (dt, shape, offset) in _read_header(f).items():
                self.where[name] = f
                self.meta[name] = (_DTYPES.get(dt), shape, dt)
                self.offset[name] = offset
        self.bytes_read = 0
        self._fds: dict[Path, int] = {}
        self._buffer: torch.Tensor | None = None

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

    def _read(self, name: str, dtype: torch.dtype, start: int, end: int, device=None) -> torch.Tensor:
        """Elements [start, end) of tensor NAME stored as DTYPE: exactly their bytes, by positioned reads.

        The bytes go through one reused host buffer (pinned when the destination is a GPU): a fresh host
        buffer per tensor costs a page fault per 4 KiB, which made an 8B load several times slower than
        reading through mmap. The result is on `device` if that is a GPU, else a CPU tensor of its own.
        """
        f = self.where[name]
        if f not in self._fds:
            self._fds[f] = os.open(f, os.O_RDONLY)
        size = torch.empty((), dtype=dtype).element_size()
        nbytes = (end - start) * size
        cuda = device is not None and torch.device(device).type == "cuda"
        out = self._staging(nbytes, pin=cuda)
        view, pos, done = memoryview(out.numpy())[:nbytes], self.offset[name] + start * size, 0
        while done < nbytes:
            got = os.preadv(self._fds[f], [view[done : done + _MAX_READ]], pos + done)
            if got <= 0:
                raise UserError(f"{f}: ends inside tensor {name} (truncated file?)")
            done += got
        self.bytes_read += nbytes
        t = out[:nbytes].view(dtype)
        # Both copies are synchronous, so the buffer is free for the next read on return.
        return t.to(device) if cuda else t.clone()

    def _staging(self, nbytes: int, pin: bool) -> torch.Tensor:
        if self._buffer is None or self._buffer.numel() < nbytes or (pin and not self._buffer.is_pinned()):
            self._buffer = None  # release the old one first: peak host memory is one buffer
            self._buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin)
        return self._buffer

    def read_flat(self, name: str, start: int, end: int, device=None) -> torch.Tensor:
        """Elements [start, end) of the flattened tensor, reading only their bytes (on a GPU `device` if given)."""
        self.shape(name)
        dtype = self.dtype(name)
        if start >= end:
            return torch.empty(0, dtype=dtype)
        return self._read(name, dtype, start, end, device)

    def read_raw(self, name: str, start: int, end: int, device=None) -> torch.Tensor:
        """Elements [start, end) of a 1-D tensor of any dtype (used for packed 4-bit bytes)."""
        dt, _, raw = self._check(name)
        if dt is None:
            raise UserError(f"{self.where[name]}: tensor {name} has dtype {raw}; expected one of {sorted(_DTYPES)}")
        return self._read(name, dt, start, end, device)

    def close(self) -> None:
        fds = getattr(self, "_fds", {})  # absent when __init__ refused the directory
        for fd in fds.values():
            os.close(fd)
        fds.clear()

    def __del__(self) -> None:
        self.close()


def _read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...], int]]:
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
            out[name] = (info["dtype"], tuple(info["shape"]), 8 + n + a)
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

    def read_flat(self, name: str, start: int, end: int, device=None) -> torch.Tensor:
        # Generated on self.device already; `device` is accepted for the common Source interface.
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
