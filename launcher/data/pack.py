"""Packing tokenized documents into fixed-length rows (best-fit decreasing), labels masked with IGNORE."""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # annotations only: packing and sampling import without pydantic (GPU hosts, tools)
    pass


IGNORE = -100


@dataclass
class Packed:
    """Rows of seq_len tokens. Stored as int32 (half the memory; possibly memory-mapped from the cache)."""

    input_ids: torch.Tensor  # [N, T]
    labels: torch.Tensor  # [N, T], IGNORE where no loss
    position_ids: torch.Tensor  # [N, T], restarting at 0 per document; padding continues the last one
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        i = torch.as_tensor(idx, dtype=torch.long)
        return {
            "input_ids": self.input_ids[i].long(),
            "labels": self.labels[i].long(),
            "position_ids": self.position_ids[i].long(),
        }


@dataclass
class Docs:
    """Tokenized documents, flat: document k is ids[offsets[k]:offsets[k+1]] (labels alike)."""

    ids: np.ndarray  # int32
    labels: np.ndarray  # int32
    offsets: np.ndarray  # int64, len = documents + 1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def doc(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = self.offsets[k], self.offsets[k + 1]
        return self.ids[s:e], self.labels[s:e]

    def take(self, idx: Iterable[int]) -> Docs:
        return Docs.from_docs([self.doc(int(k)) for k in idx])

    @staticmethod
    def from_docs(docs: list[tuple[np.ndarray, np.ndarray]]) -> Docs:
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(i) for i, _ in docs], dtype=np.int64)
        if not docs:
            empty = np.zeros(0, dtype=np.int32)
            return Docs(empty, empty.copy(), offsets)
        ids = np.concatenate([i for i, _ in docs]).astype(np.int32, copy=False)
        labels = np.concatenate([lab for _, lab in docs]).astype(np.int32, copy=False)
        return Docs(ids, labels, offsets)

    @staticmethod
    def concat(parts: list[Docs]) -> Docs:
        return Docs.from_docs([p.doc(k) for p in parts for k in range(len(p))])


def pack(docs: Docs, seq_len: int, pad_id: int, packing: bool = True) -> Packed:
    """Place documents into rows of seq_len (best-fit decreasing when packing, one per row otherwise).

    Every document must already fit (the over-long policy ran before). Padding takes label IGNORE and
    position ids that continue the row's last document, so it joins that document's attention block and,
    being after it, cannot change any of its outputs.
    """
    lengths = docs.lengths
    if len(lengths) and int(lengths.max()) > seq_len:
        raise AssertionError("pack() got a document longer than seq_len")
    rows = _best_fit(lengths, seq_len) if packing else [[k] for k in range(len(docs))]
    n = len(rows)
    ids = np.full((n, seq_len), pad_id, dtype=np.int32)
    labels = np.full((n, seq_len), IGNORE, dtype=np.int32)
    pos = np.zeros((n, seq_len), dtype=np.int32)
    ar = np.arange(seq_len, dtype=np.int32)
    for r, members in enumerate(rows):
        c = 0
        last = 0
        for k in members:
            s, e = docs.offsets[k], docs.offsets[k + 1]
            m = int(e - s)
            ids[r, c : c + m] = docs.ids[s:e]
            labels[r, c : c + m] = docs.labels[s:e]
            pos[r, c : c + m] = ar[:m]
            c += m
            last = m
        pos[r, c:] = ar[last : last + seq_len - c]
    return Packed(torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(pos))


def _best_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing in O(n log capacity).

    Open rows are bucketed by remaining space; `caps` holds the distinct remaining spaces in order, so it
    never has more than `capacity` entries however many rows are open. Ties keep the input order, which
    makes the result a pure function of the (already seeded) document order.
    """
    order = np.argsort(-lengths, kind="stable")
    rows: list[list[int]] = []
    buckets: dict[int, list[int]] = {}
    caps: list[int] = []
    for k in order.tolist():
        need = int(lengths[k])
        j = bisect.bisect_left(caps, need)
        if j == len(caps):
            r = len(rows)
            rows.append([])
            left = capacity - need
        else:
            space = caps[j]
            bucket = buckets[space]
            r = bucket.pop()
            if not bucket:
                del buckets[space]
                caps.pop(j)
            left = space - need
        rows[r].append(k)
        if left > 0:
            if left not in buckets:
                bisect.insort(caps, left)
                buckets[left] = []
            buckets[left].append(r)
    return rows
