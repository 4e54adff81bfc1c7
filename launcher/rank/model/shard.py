"""Shard arithmetic: which rows and quantization blocks of a parameter this rank owns, and the load statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
