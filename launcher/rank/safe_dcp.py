"""Reading torch.distributed.checkpoint directories without unpickling arbitrary objects.

DCP's stock reader loads the `.metadata` file with plain `pickle.load` and non-tensor entries with
`torch.load(weights_only=False)`: a crafted checkpoint directory could run code on every rank that
resumes from it. qlaunch reads the metadata in two stages, so that no object the file names is ever
created or called:

1. Unpickling builds only inert stand-ins. `find_class` knows an exact list of (module, name) pairs —
   the DCP metadata dataclasses real `.metadata` files contain and the torch values inside them
   (`torch.Size`, dtypes, the strided layout, the memory-format code) — and returns for each a stand-in of
   qlaunch's own: a record that only stores the state pickle's BUILD hands it, a token for a torch value,
   or a constructor that checks its arguments are plain ints/strings. Any other global, a dotted name
   (`os.system` reached through a torch module's namespace), hostile REDUCE/NEWOBJ arguments or BUILD
   state on anything but a fresh record are refused while unpickling.
2. The stand-ins are checked against the schema of DCP's Metadata (every field's type, tensor chunk
   bounds, storage entries that are plain file names inside the checkpoint directory and lie within
   their file) and only then converted into real DCP objects with their ordinary constructors.

Non-tensor entries are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import os
import pickle
import stat
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.futures import Future

from launcher.errors import UserError
from launcher.safe_files import plain_file_name

METADATA_FILE = ".metadata"

_MAX_DIM = 2**62  # any real tensor dimension or byte offset is far below this


class _Refused(Exception):
    """Why the metadata was refused (raised while unpickling or checking; never carries file bytes)."""


class _Record:
    """Stands in for one DCP metadata dataclass: NEWOBJ makes an empty one, BUILD stores its state once."""

    __slots__ = ("state",)
    dcp_class: str = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Record:
        if args or kwargs:
            raise _Refused(f"{cls.dcp_class} is created with arguments (real metadata has none)")
        obj = object.__new__(cls)
        obj.state = _UNSET
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Reached only when the pickle calls the class (REDUCE/INST/OBJ) instead of NEWOBJ.
        raise _Refused(f"{self.dcp_class} is called as a function (real metadata never does that)")

    def __setstate__(self, state: Any) -> None:
        if not isinstance(self, _Record) or self.state is not _UNSET:
            raise _Refused("pickle BUILD on something that is not a fresh metadata record")
        self.state = state


_UNSET = object()


def _record(name: str) -> type[_Record]:
    return type(f"_{name.lstrip('_')}Record", (_Record,), {"__slots__": (), "dcp_class": name})


class _Token:
    """An inert stand-in for a torch value (a dtype, a layout, a memory format, a shape, a path)."""

    __slots__ = ("kind", "value")

    def __init__(self, kind: str, value: Any) -> None:
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "value", value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise _Refused("pickle state on a torch value")

    def __setstate__(self, state: Any) -> None:
        raise _Refused("pickle BUILD on a torch value")


class _Constructor:
    """A callable stand-in whose `check` accepts only plain arguments and returns a _Token."""

    __slots__ = ("name", "check")

    def __init__(self, name: str, check) -> None:
        self.name, self.check = name, check

    def __call__(self, *args: Any, **kwargs: Any) -> _Token:
        if kwargs:
            raise _Refused(f"{self.name} called with keyword arguments")
        return self.check(*args)

    def __setstate__(self, state: Any) -> None:
        raise _Refused(f"pickle BUILD on {self.name}")


def _plain_ints(values: Any) -> tuple[int, ...]:
    if type(values) not in (tuple, list) or not all(type(v) is int and 0 <= v < _MAX_DIM for v in values):
        raise _Refused("torch.Size of something other than non-negative integers")
    return tuple(values)


def _size(*args: Any) -> _Token:
    if len(args) != 1:
        raise _Refused("torch.Size called with other than one argument")
    return _Token("size", _plain_ints(args[0]))


def _layout(*args: Any) -> _Token:
    if args != ("torch.strided",):
        raise _Refused("a tensor layout other than torch.strided")
    return _Token("layout", torch.strided)


_MEMORY_FORMATS = {0: torch.contiguous_format, 1: torch.channels_last, 2: torch.preserve_format}


def _memory_format(*args: Any) -> _Token:
    if len(args) != 1 or type(args[0]) is not int or args[0] not in _MEMORY_FORMATS:
        raise _Refused("a memory-format code other than DCP's three")
    return _Token("memory_format", _MEMORY_FORMATS[args[0]])


def _path(*args: Any) -> _Token:
    if not args or not all(type(a) is str for a in args):
        raise _Refused("a path made of something other than strings")
    return _Token("path", os.path.join(*args))


_DCP_META = "torch.distributed.checkpoint.metadata"

_RECORDS = {
    name: _record(name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_StorageInfo",
    )
}

# The exact globals real `.metadata` files name (listed from checkpoints qlaunch wrote: FSDP2 and unsharded
# LoRA + AdamW, with its non-tensor param_groups entries). Nothing else is ever looked up.
_GLOBALS: dict[tuple[str, str], Any] = {
    **{(_DCP_META, n): r for n, r in _RECORDS.items() if n != "_StorageInfo"},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _RECORDS["_StorageInfo"],
    (_DCP_META, "_MEM_FORMAT_ENCODING"): _Constructor("_MEM_FORMAT_ENCODING", _memory_format),
    ("torch", "Size"): _Constructor("torch.Size", _size),
    ("torch.serialization", "_get_layout"): _Constructor("_get_layout", _layout),
    ("pathlib", "PosixPath"): _Constructor("PosixPath", _path),
    ("pathlib", "PurePosixPath"): _Constructor("PurePosixPath", _path),
    **{("torch", n): _Token("dtype", v) for n in dir(torch) if isinstance(v := getattr(torch, n), torch.dtype)},
}


class _MetadataUnpickler(pickle._Unpickler):
    # The pure-Python unpickler, not the C one: the C unpickler sizes its memo table by the largest index a
    # PUT opcode names, so a few bytes (LONG_BINPUT 690514018) make it allocate gigabytes; this one keeps a
    # dict. It reads from the file's bytes in memory, so a length field cannot make it allocate more.
    def find_class(self, module: str, name: str) -> Any:
        # Exact pairs only: pickle itself would resolve a dotted name attribute by attribute, through
        # whatever the module imported (os, builtins, ...).
        found = _GLOBALS.get((module, name))
        if found is None:
            raise _Refused("it names a global that is not a DCP metadata class or torch value type")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("it uses persistent ids (real metadata has none)")


def _fields(rec: Any, kind: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    if type(rec) is not _RECORDS[kind]:
        raise _Refused(f"a {kind} was expected")
    state = {} if rec.state is _UNSET or rec.state is None else rec.state
    if type(state) is not dict or not all(type(k) is str for k in state):
        raise _Refused(f"the state of a {kind} is not a field dictionary")
    unknown = set(state) - set(required) - set(optional)
    missing = set(required) - set(state)
    if unknown or missing:
        raise _Refused(f"a {kind} has {'unknown' if unknown else 'missing'} fields")
    return state


def _token(v: Any, kind: str, what: str) -> Any:
    if type(v) is not _Token or v.kind != kind:
        raise _Refused(f"{what} is not a {kind}")
    return v.value


def _str(v: Any, what: str, optional: bool = False) -> str | None:
    if (v is None and optional) or type(v) is str:
        return v
    raise _Refused(f"{what} is not a string")


def _int(v: Any, what: str, optional: bool = False) -> int | None:
    if (v is None and optional) or (type(v) is int and 0 <= v < _MAX_DIM):
        return v
    raise _Refused(f"{what} is not a non-negative integer")


def _bool(v: Any, what: str) -> bool:
    if type(v) is not bool:
        raise _Refused(f"{what} is not a boolean")
    return v


def _properties(rec: Any) -> TensorProperties:
    if type(rec) is _RECORDS["TensorProperties"] and type(rec.state) is tuple:
        # What TensorProperties.__getstate__ writes: (dtype, layout, requires_grad, memory format code, pin_memory)
        if len(rec.state) != 5:
            raise _Refused("TensorProperties state is not five fields")
        dtype, layout, requires_grad, mem, pin = rec.state
    else:
        f = _fields(rec, "TensorProperties", ("dtype",), ("layout", "requires_grad", "memory_format", "pin_memory"))
        dtype, layout = f["dtype"], f.get("layout", _Token("layout", torch.strided))
        requires_grad, pin = f.get("requires_grad", False), f.get("pin_memory", False)
        mem = f.get("memory_format", _Token("memory_format", torch.contiguous_format))
    return TensorProperties(
        dtype=_token(dtype, "dtype", "a tensor's dtype"),
        layout=_token(layout, "layout", "a tensor's layout"),
        requires_grad=_bool(requires_grad, "requires_grad"),
        memory_format=_token(mem, "memory_format", "a tensor's memory format"),
        pin_memory=_bool(pin, "pin_memory"),
    )


def _tensor_storage(rec: Any) -> TensorStorageMetadata:
    f = _fields(rec, "TensorStorageMetadata", ("properties", "size", "chunks"))
    size = torch.Size(_token(f["size"], "size", "a tensor's size"))
    if type(f["chunks"]) is not list:
        raise _Refused("a tensor's chunks are not a list")
    chunks = []
    for c in f["chunks"]:
        cf = _fields(c, "ChunkStorageMetadata", ("offsets", "sizes"))
        offsets = _token(cf["offsets"], "size", "a chunk's offsets")
        sizes = _token(cf["sizes"], "size", "a chunk's sizes")
        if not (len(offsets) == len(sizes) == len(size)) or any(
            o + s > n for o, s, n in zip(offsets, sizes, size, strict=True)
        ):
            raise _Refused("a tensor chunk lies outside its tensor")
        chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)))
    return TensorStorageMetadata(properties=_properties(f["properties"]), size=size, chunks=chunks)


def _storage_type(rec: Any) -> TensorStorageMetadata | BytesStorageMetadata:
    if type(rec) is _RECORDS["BytesStorageMetadata"]:
        _fields(rec, "BytesStorageMetadata", ())
        return BytesStorageMetadata()
    return _tensor_storage(rec)


def _index(rec: Any) -> MetadataIndex:
    f = _fields(rec, "MetadataIndex", ("fqn",), ("offset", "index"))
    offset = f.get("offset")
    return MetadataIndex(
        fqn=_str(f["fqn"], "a storage key's name"),
        offset=None if offset is None else _token(offset, "size", "a storage key's offset"),
        index=_int(f.get("index"), "a storage key's index", optional=True),
    )


def _storage_info(rec: Any) -> _StorageInfo:
    f = _fields(rec, "_StorageInfo", ("relative_path", "offset", "length"), ("transform_descriptors",))
    if not plain_file_name(f["relative_path"]) or f["relative_path"].startswith("."):  # DCP writes no hidden file
        raise _Refused("a storage entry names a file outside the checkpoint directory")
    if f.get("transform_descriptors"):
        raise _Refused("a storage entry asks for a stream transform (qlaunch writes none)")
    return _StorageInfo(
        relative_path=f["relative_path"],
        offset=_int(f["offset"], "a storage entry's offset"),
        length=_int(f["length"], "a storage entry's length"),
    )


def _storage_meta(rec: Any) -> StorageMeta | None:
    if rec is None:
        return None
    f = _fields(rec, "StorageMeta", (), ("checkpoint_id", "save_id", "load_id", "modules"))
    cid = f.get("checkpoint_id")
    modules = f.get("modules", [])
    if type(modules) is not list or not all(type(m) is str for m in modules):
        raise _Refused("StorageMeta.modules is not a list of strings")
    return StorageMeta(
        checkpoint_id=cid if cid is None or type(cid) is str else _token(cid, "path", "the checkpoint id"),
        save_id=_str(f.get("save_id"), "the save id", optional=True),
        load_id=_str(f.get("load_id"), "the load id", optional=True),
        modules=list(modules),
    )


def _planner_data(v: Any) -> dict[str, tuple] | None:
    # DCP's flattening map: flat key -> the path of keys/indices it came from.
    if v is None:
        return None
    if type(v) is not dict:
        raise _Refused("planner_data is not a dictionary")
    out = {}
    for k, path in v.items():
        if type(k) is not str or type(path) not in (tuple, list) or not all(type(p) in (str, int) for p in path):
            raise _Refused("planner_data maps a key to something other than a path of names and indices")
        out[k] = tuple(path)
    return out


def _metadata(root: Any) -> Metadata:
    f = _fields(root, "Metadata", ("state_dict_metadata",), ("planner_data", "storage_data", "storage_meta", "version"))
    sdm = f["state_dict_metadata"]
    if type(sdm) is not dict or not all(type(k) is str for k in sdm):
        raise _Refused("state_dict_metadata is not a dictionary of names")
    storage = f.get("storage_data")
    if type(storage) is not dict:
        raise _Refused("storage_data is not a dictionary")
    storage_data = {_index(k): _storage_info(v) for k, v in storage.items()}
    if len(storage_data) != len(storage):
        raise _Refused("storage_data has duplicate keys")
    return Metadata(
        state_dict_metadata={k: _storage_type(v) for k, v in sdm.items()},
        planner_data=_planner_data(f.get("planner_data")),
        storage_data=storage_data,
        storage_meta=_storage_meta(f.get("storage_meta")),
        version=_str(f.get("version"), "the version", optional=True),
    )


def _check_files(metadata: Metadata, directory: Path) -> None:
    """Every storage entry's file is a regular file of the directory (no symlink out) that holds its bytes."""
    sizes: dict[str, int] = {}
    for info in metadata.storage_data.values():
        name = info.relative_path
        if name not in sizes:
            try:
                st = os.lstat(directory / name)
            except OSError:
                raise _Refused("a storage entry names a file that is not in the checkpoint directory") from None
            if not stat.S_ISREG(st.st_mode):
                raise _Refused("a storage entry names something that is not a regular file (a link, a directory)")
            sizes[name] = st.st_size
        if info.offset + info.length > sizes[name]:
            raise _Refused("a storage entry lies past the end of its file")


def read_metadata(directory: str | os.PathLike) -> Metadata:
    """The checked Metadata of a DCP directory; UserError (one line, no file bytes) if it is refused."""
    path = Path(directory) / METADATA_FILE
    try:
        # Non-blocking and not through a link: a FIFO must not hang the open, a link must not read elsewhere.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError as err:
            if err.errno != errno.ELOOP:
                raise
            raise _Refused("it is not a regular file (a link)") from None
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise _Refused("it is not a regular file")
            data = fh.read()
        metadata = _metadata(_MetadataUnpickler(io.BytesIO(data)).load())
        _check_files(metadata, Path(directory))
    except _Refused as why:
        raise UserError(
            f"checkpoint metadata {path}: refusing to unpickle it: {why} "
            "(nothing in it was run; qlaunch resumes only from metadata as DCP writes it)"
        ) from None
    except OSError as err:
        raise UserError(f"checkpoint metadata {path}: cannot read it ({err.strerror or type(err).__name__})") from None
    except Exception as err:  # noqa: BLE001 - a malformed pickle stream; its message may quote file bytes
        raise UserError(
            f"checkpoint metadata {path}: refusing to unpickle it: not a DCP metadata file qlaunch can read "
            f"({type(err).__name__} while unpickling; nothing in it was run)"
        ) from None
    return metadata


def _entry_refused(name: str, err: BaseException) -> UserError:
    return UserError(
        f"{name} does not load ({type(err).__name__}): the shard is damaged or not as DCP writes it "
        "(nothing in it was run)"
    )


def check_entries(directory: str | os.PathLike) -> None:
    """Every entry of every shard file unpickles as plain data (a tensor where the metadata says tensor),
    checked in the launching process so that a crafted shard is refused before any rank starts.

    Costs about what the checksums cost (one read of every byte); entries are read one at a time."""
    metadata = read_metadata(directory)
    tensors = {k for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    by_file: dict[str, list] = {}
    for index, info in metadata.storage_data.items():
        by_file.setdefault(info.relative_path, []).append((index, info))
    for name, entries in sorted(by_file.items()):
        try:
            fd = os.open(Path(directory) / name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError as err:
            raise UserError(f"checkpoint {directory}: {name}: cannot open it ({err.strerror})") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UserError(f"checkpoint {directory}: {name} is not a regular file")
            for index, info in entries:
                try:
                    with warnings.catch_warnings():  # torch warns about unusual pickle protocols on stderr
                        warnings.simplefilter("ignore")
                        value = torch.load(io.BytesIO(os.pread(fd, info.length, info.offset)), weights_only=True)
                except Exception as err:  # noqa: BLE001 - a crafted or damaged entry; its message may quote bytes
                    raise UserError(f"checkpoint {directory}: {_entry_refused(name, err)}") from None
                if index.fqn in tensors and not isinstance(value, torch.Tensor):
                    raise UserError(f"checkpoint {directory}: {name}: a tensor entry holds no tensor")
        finally:
            os.close(fd)


class SafeReader(FileSystemReader):
    """DCP's file reader with the metadata checked up front (every rank reads the same checked copy)."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self._metadata = read_metadata(path)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        # Never the stock fallback to a rank-local `__<rank>.metadata`: only the checked file counts.
        metadata = self._metadata
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        # One file at a time, so a failure names the file (DCP's own error would quote what it read).
        per_file: dict[str, list] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for name, items in per_file.items():
            try:
                super().read_data(dataclasses.replace(plan, items=items), planner)
            except UserError as err:
                raise UserError(f"{name}: {err}") from None
            except (MemoryError, torch.OutOfMemoryError):
                raise
            except Exception as err:  # noqa: BLE001 - a damaged or crafted shard; its message may quote bytes
                raise _entry_refused(name, err) from None
        fut: Future = Future()
        fut.set_result(None)
        return fut


class SafeLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError:
            raise UserError(
                "a non-tensor entry is not plain data (weights_only loading refused it; nothing in it was run)"
            ) from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def user_error_in(err: BaseException) -> UserError | None:
    """The UserError a rank raised inside DCP, which wraps it in a CheckpointException (per failed rank)."""
    if isinstance(err, UserError):
        return err
    if isinstance(err, CheckpointException):
        for _rank, failure in sorted(err.failures.items()):
            inner = user_error_in(failure[0] if isinstance(failure, tuple) else failure)
            if inner is not None:
                return inner
    return None


def load(state: dict, path: str) -> None:
    import torch.distributed.checkpoint as dcp

    reader = SafeReader(path)
    try:
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
    except CheckpointException as err:
        user = user_error_in(err)
        if user is None:
            raise
        raise UserError(f"checkpoint {path}: {user}") from None
