"""Reading torch.distributed.checkpoint directories without unpickling arbitrary objects.

DCP's stock reader loads the `.metadata` file with plain `pickle.load` and non-tensor entries with
`torch.load(weights_only=False)`: a crafted checkpoint directory could run code on every rank that
resumes from it. qlaunch reads the metadata with an unpickler that only builds DCP's own metadata
classes and a few torch value types, and non-tensor entries with `weights_only=True`.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

from launcher.errors import UserError

# Plain value types that DCP metadata legitimately contains besides its own dataclasses.
_TORCH_VALUE_TYPES = (torch.dtype, torch.layout, torch.memory_format)
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint.") or (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_VALUE_TYPES):
            return getattr(torch, name)
        raise UserError(f"checkpoint metadata refers to {module}.{name}; refusing to unpickle it")


class SafeReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any):
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load(state: dict, path: str) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.load(state, storage_reader=SafeReader(path), planner=SafeLoadPlanner())
