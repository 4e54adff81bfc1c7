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
from typing import NamedTuple, Protocol

import torch

from launcher.errors import UserError
from launcher.safe_files import MAX_READ_BYTES, open_regular, plain_file_name, pread_exact, read_json_object, shown

QUANT_META = "qlaunch_quant.json"

# Suffixes of the tensors a pre-quantized checkpoint stores for each quantized linear weight.
PACKED_SUFFIX = ".qweight"

ABSMAX_SUFFIX = ".absmax"

INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "U8": torch.uint8}

# Bits per element of every dtype the safetensors format defines (F4 and F6 pack elements across bytes).
DTYPE_BITS = {
    **dict.fromkeys(["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0"], 8),
    **dict.fromkeys(["I16", "U16", "F16", "BF16"], 16),
    **dict.fromkeys(["I32", "U32", "F32"], 32),
    **dict.fromkeys(["I64", "U64", "F64", "C64"], 64),
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}

MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses larger headers

_U64 = 1 << 64  # offsets and dimensions are u64 in the format


class WeightSource(Protocol):
    def shape(self, name: str) -> tuple[int, ...]: ...
    def read_flat(self, name: str, start: int, end: int, device=None) -> torch.Tensor: ...


class TensorInfo(NamedTuple):
    """One header entry: dtype string, shape, and byte range [begin, end) within the data after the header."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsSource:
    """Tensor name -> (file, dtype, shape) from the headers of the directory's *.safetensors files.

    With a `model.safetensors.index.json` the files are exactly those its weight map names (as transformers
    reads them); without one, every *.safetensors file. Every header is validated completely first
    (`read_header`), so the positioned reads below stay inside the tensor they were asked for.
    """

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        index = self.dir / INDEX_FILE
        weight_map = read_index(index) if os.path.lexists(index) else None
        if weight_map is None:
            files = sorted(self.dir.glob("*.safetensors"))
        else:
            if not weight_map:
                raise UserError(f"{index}: 'weight_map' is empty; it must map every tensor to its shard file")
            names = sorted(set(weight_map.values()))
            missing = [f for f in names if not os.path.lexists(self.dir / f)]
            if missing:
                raise UserError(f"{index}: shard file {missing[0]} is missing from {self.dir}")
            files = [self.dir / f for f in names]
        if not files:
            raise UserError(f"{self.dir}: no *.safetensors files (a model directory needs its weights)")
        self.where: dict[str, Path] = {}
        self.info: dict[str, TensorInfo] = {}
        self.offset: dict[str, int] = {}  # byte offset of each tensor's data in its file
        for f in files:
            data_start, tensors = read_header(f)
            for name, info in tensors.items():
                if name in self.where:
                    raise UserError(
                        f"{self.dir}: tensor {shown(name)} is in both {self.where[name].name} and {f.name}; "
                        "each tensor must be in one file"
                    )
                self.where[name] = f
                self.info[name] = info
                self.offset[name] = data_start + info.begin
        for name, fname in (weight_map or {}).items():
            if self.where.get(name) != self.dir / fname:
                raise UserError(f"{index}: maps tensor {shown(name)} to {fname}, which does not contain it")
        self.bytes_read = 0
        self._fds: dict[Path, int] = {}
        self._buffer: torch.Tensor | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._check(name).shape

    def dtype(self, name: str) -> torch.dtype:
        raw = self._check(name).dtype
        if raw not in ("BF16", "F16", "F32"):  # U8 too: its bytes are packed weights, not values (read_raw)
            raise UserError(f"{self.where[name]}: tensor {name} has dtype {raw}; expected BF16, F16 or F32")
        return _DTYPES[raw]

    def _check(self, name: str) -> TensorInfo:
        if name not in self.info:
            raise UserError(
                f"{self.dir}: tensor '{name}' is not in the checkpoint (wrong architecture or a missing shard?)"
            )
        return self.info[name]

    def _read(self, name: str, dtype: torch.dtype, start: int, end: int, device=None) -> torch.Tensor:
        """Elements [start, end) of tensor NAME stored as DTYPE: exactly their bytes, by positioned reads.

        The bytes go through one reused host buffer (pinned when the destination is a GPU): a fresh host
        buffer per tensor costs a page fault per 4 KiB, which made an 8B load several times slower than
        reading through mmap. The result is on `device` if that is a GPU, else a CPU tensor of its own.
        """
        f = self.where[name]
        numel = math.prod(self.info[name].shape)
        if not 0 <= start <= end <= numel:
            # Past its end lie the next tensor's bytes: a mismatched checkpoint must not be read as weights.
            raise UserError(
                f"{f}: tensor {name} has {numel} elements, elements [{start}, {end}) were asked for "
                "(a checkpoint that does not match the model?)"
            )
        size = torch.empty((), dtype=dtype).element_size()
        return self._read_span(name, dtype, self.offset[name] + start * size, (end - start) * size, device)

    def _read_span(self, name: str, dtype: torch.dtype, pos: int, nbytes: int, device) -> torch.Tensor:
        """NBYTES bytes of NAME's file from byte POS (inside the tensor: the callers checked), as DTYPE."""
        f = self.where[name]
        if f not in self._fds:
            self._fds[f] = open_regular(f, "safetensors file")
        cuda = device is not None and torch.device(device).type == "cuda"
        out = self._staging(nbytes, pin=cuda)
        view, done = memoryview(out.numpy())[:nbytes], 0
        while done < nbytes:
            got = os.preadv(self._fds[f], [view[done : done + MAX_READ_BYTES]], pos + done)
            if got <= 0:
                raise UserError(f"{f}: ends inside tensor {name} (truncated since it was checked?)")
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
        raw = self._check(name).dtype
        if raw not in _DTYPES:
            raise UserError(f"{self.where[name]}: tensor {name} has dtype {raw}; expected one of {sorted(_DTYPES)}")
        return self._read(name, _DTYPES[raw], start, end, device)

    def read_bytes(self, name: str, start: int, end: int, device=None) -> torch.Tensor:
        """Bytes [start, end) of tensor NAME's data, whatever its dtype, as uint8 (bitsandbytes' packed 4-bit
        weights are the same bytes whether a checkpoint stores them as U8 or BF16 elements)."""
        info = self._check(name)
        nbytes = info.end - info.begin
        if not 0 <= start <= end <= nbytes:
            raise UserError(
                f"{self.where[name]}: tensor {name} has {nbytes} bytes, bytes [{start}, {end}) were asked for "
                "(a checkpoint that does not match the model?)"
            )
        if start == end:
            return torch.empty(0, dtype=torch.uint8)
        return self._read_span(name, torch.uint8, self.offset[name] + start, end - start, device)

    def close(self) -> None:
        fds = getattr(self, "_fds", {})  # absent when __init__ refused the directory
        for fd in fds.values():
            os.close(fd)
        fds.clear()

    def __del__(self) -> None:
        self.close()


class HeaderError(ValueError):
    """A rule of the safetensors format that a file breaks; the text quotes no bytes of the file."""


def header_length(first8: bytes, file_size: int) -> int:
    """N, the header size in the file's first 8 bytes (little-endian u64), if it fits the file and the cap."""
    if len(first8) < 8:
        raise HeaderError("the file is shorter than the 8-byte header size")
    n = int.from_bytes(first8, "little")
    if n > MAX_HEADER_BYTES:
        raise HeaderError(f"the header size field exceeds the format's limit of {MAX_HEADER_BYTES // 1_000_000} MB")
    if n > file_size - 8:
        raise HeaderError("the header size field points past the end of the file")
    return n


def _no_constant(name: str):
    raise HeaderError("the header contains NaN or Infinity, which JSON does not allow")


def _is_u64(value: object) -> bool:
    return type(value) is int and 0 <= value < _U64  # type(): bool is an int subclass


def _tensor_info(name: str, entry: object) -> TensorInfo:
    where = f"tensor {shown(name)}"
    if not isinstance(entry, dict):
        raise HeaderError(f"{where}: its entry is not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise HeaderError(f"{where}: its entry has no '{key}'")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise HeaderError(f"{where}: unknown dtype; the format's dtypes are {', '.join(DTYPE_BITS)}")
    if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
        raise HeaderError(f"{where}: shape is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_u64, offsets))) or offsets[0] > offsets[1]:
        raise HeaderError(f"{where}: data_offsets is not [begin, end] with 0 <= begin <= end")
    elements = 1
    for d in shape:
        elements *= d
        if elements >= _U64:  # as the library does: a product past u64 is refused even if a later dim is 0
            raise HeaderError(f"{where}: its shape has more elements than the format can address")
    bits = elements * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
        raise HeaderError(f"{where}: data_offsets span a different number of bytes than its shape and dtype need")
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


def parse_header(header: bytes, data_size: int) -> dict[str, TensorInfo]:
    """Every tensor of a safetensors header whose data area holds `data_size` bytes, under the format's rules.

    The rules are the safetensors library's own: UTF-8 JSON object; `__metadata__` maps strings to
    strings; each other entry has a known dtype, a shape of non-negative integers and [begin, end] offsets
    whose span is exactly shape x dtype bytes; sorted by offset, the tensors tile the data area from byte 0
    to its end with no gap, overlap or trailing bytes.
    """
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError:
        raise HeaderError("the header is not UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as err:
        raise HeaderError(f"the header is not valid JSON ({err.msg} at character {err.pos})") from None
    except RecursionError:
        raise HeaderError("the header is nested too deeply to parse (no safetensors header is)") from None
    if not isinstance(value, dict):
        raise HeaderError("the header is not a JSON object")
    meta = value.pop("__metadata__", None)
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        raise HeaderError("__metadata__ is not an object of strings")
    tensors = {name: _tensor_info(name, entry) for name, entry in value.items()}
    end, previous = 0, None
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.end > data_size:
            raise HeaderError(f"tensor {shown(name)} lies past the end of the file (truncated?)")
        if info.begin < end:
            raise HeaderError(f"tensors {shown(previous or '')} and {shown(name)} overlap")
        if info.begin > end:
            raise HeaderError(f"the bytes before tensor {shown(name)} belong to no tensor (a gap in the data)")
        end, previous = info.end, name
    if end != data_size:
        raise HeaderError("the file has bytes after the last tensor that belong to no tensor")
    return tensors


def read_header(path: Path) -> tuple[int, dict[str, TensorInfo]]:
    """(byte offset of the data area, validated tensors) of a safetensors file; one line naming it if invalid.

    The format's rules are checked here (parse_header) and then by the safetensors library itself, the
    authority on what a valid file is: if a future version of the library grows a rule, it still holds.
    """
    fd = open_regular(path, "safetensors file")
    try:
        size = os.fstat(fd).st_size
        n = header_length(pread_exact(fd, 8, 0), size)
        tensors = parse_header(pread_exact(fd, n, 8), size - 8 - n)
    except HeaderError as err:
        raise UserError(f"{path}: corrupt safetensors file ({err})") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read the safetensors file ({err.strerror})") from None
    finally:
        os.close(fd)
    _library_accepts(path)
    return 8 + n, tensors


def _library_accepts(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception:  # its messages quote header bytes (an unknown dtype, a bad number): give none of them
        raise UserError(f"{path}: corrupt safetensors file (the safetensors library refuses it)") from None


def read_index(path: Path) -> dict[str, str]:
    """The weight map (tensor name -> shard file name) of a model.safetensors.index.json.

    A crafted index must not make qlaunch read outside the model directory: every file it names must be a
    plain *.safetensors file name there."""
    index = read_json_object(path, "safetensors index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{path}: 'weight_map' must be an object mapping tensor names to shard file names")
    for name, fname in weight_map.items():
        if not (plain_file_name(fname) and fname.endswith(".safetensors")):
            raise UserError(
                f"{path}: weight_map[{shown(name)}] must be the name of a *.safetensors file in the model "
                "directory itself (no '/', no '..')"
            )
    return weight_map


class RandomSource:
    """Deterministic random weights: fixed-size chunks of each tensor, each from its own seeded generator.

    The value of element i depends only on (seed, name, i) — not on the world size or on which rank asks —
    so every rank generates only its own slice and the model is the same at any world size.
    """

    CHUNK = 1 << 20

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        std: float,
        seed: int,
        device: torch.device,
        constants: dict[str, float] | None = None,
    ):
        self.shapes = shapes
        self.constants = constants or {}  # 1-D parameters the architecture initialises to a constant
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
        # Generated on self.device already; `device` is accepted for the common WeightSource interface.
        if name in self.constants:
            return torch.full((end - start,), self.constants[name], dtype=torch.bfloat16, device=self.device)
        # Each fp32 chunk is rounded into the bf16 output as it is made: fp32 parts of a whole tensor and
        # their concatenation held 4x the bf16 tensor at once (5 GiB beside the loaded model for 8B's
        # embedding, the peak of the whole 8B rehearsal), which no run from a checkpoint has.
        out = torch.empty(max(end - start, 0), dtype=torch.bfloat16, device=self.device)
        c0, c1 = start // self.CHUNK, -(-end // self.CHUNK)
        for c in range(c0, c1):
            g = torch.Generator(device=self.device)
            g.manual_seed(name_seed(self.seed, name, c))
            n = min(self.CHUNK, math.prod(self.shapes[name]) - c * self.CHUNK)
            chunk = torch.randn(n, generator=g, device=self.device, dtype=torch.float32) * self.std
            lo = max(start - c * self.CHUNK, 0)
            hi = min(end - c * self.CHUNK, n)
            at = c * self.CHUNK + lo - start
            out[at : at + hi - lo] = chunk[lo:hi]
        return out


def name_seed(seed: int, name: str, chunk: int) -> int:
    h = hashlib.blake2b(f"{seed}/{name}/{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


QUANT_FORMAT = "qlaunch-4bit-v1"


def read_quant_meta(directory: str | Path) -> dict | None:
    """The record `qlaunch quantize` leaves in its output (None for any other directory), validated."""
    p = Path(directory) / QUANT_META
    if not os.path.lexists(p):
        return None
    meta = read_json_object(p, "qlaunch quantize record")
    problem = quant_meta_problem(meta)
    if problem:
        raise UserError(f"{p}: {problem}; write the checkpoint again with `qlaunch quantize`")
    return meta


def quant_meta_problem(meta: dict) -> str | None:
    """What is wrong with a qlaunch_quant.json, or None (values are checked before any message shows them)."""
    if meta.get("format") != QUANT_FORMAT:
        return f"'format' must be {QUANT_FORMAT!r}"
    if meta.get("type") not in ("nf4", "fp4"):
        return "'type' must be 'nf4' or 'fp4'"
    if type(meta.get("blocksize")) is not int or meta["blocksize"] not in (32, 64, 128, 256):
        return "'blocksize' must be 32, 64, 128 or 256"
    quantized, shapes = meta.get("quantized"), meta.get("shapes")
    if not isinstance(quantized, list) or not all(isinstance(n, str) for n in quantized):
        return "'quantized' must be a list of tensor names"
    if not isinstance(shapes, dict) or set(shapes) != set(quantized):
        return "'shapes' must give the shape of every tensor in 'quantized'"
    for shape in shapes.values():
        if not (isinstance(shape, list) and len(shape) == 2 and all(type(d) is int and d > 0 for d in shape)):
            return "'shapes' must map each quantized tensor to [rows, columns] (positive integers)"
    return None
