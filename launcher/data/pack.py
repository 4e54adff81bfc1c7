"""Packing tokenized documents into fixed-length rows (best-fit decreasing), labels masked with IGNORE."""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

IGNORE = -100


@dataclass
class Packed:
    """Rows of seq_len tokens. Stored as int32 (half the memory; possibly memory-mapped from the cache)."""

    input_ids: torch.Tensor  # [N, T]
    labels: torch.Tensor  # [N, T], IGNORE where no loss
    position_ids: torch.Tensor  # [N, T], 0 at every document start and split; padding continues the last
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
    """Tokenized documents, flat: document k is ids[offsets[k]:offsets[k+1]] (labels alike).

    splits[k]: where the second sequence of document k starts, as an offset inside it; 0 = one sequence.
    A preference pair is one document, prompt + chosen followed by prompt + rejected, split at the second
    prompt, so that every operation that moves documents keeps the two halves of a pair together."""

    ids: np.ndarray  # int32
    labels: np.ndarray  # int32
    offsets: np.ndarray  # int64, len = documents + 1
    splits: np.ndarray | None = None  # int64, len = documents; None = all 0

    def __post_init__(self) -> None:
        if self.splits is None:
            self.splits = np.zeros(len(self), dtype=np.int64)
        if len(self.splits) != len(self):
            raise AssertionError("Docs: one split per document")
        inside = (self.splits == 0) | ((self.splits > 0) & (self.splits < self.lengths))
        if not bool(inside.all()):
            raise AssertionError("Docs: a split must be 0 or fall strictly inside its document")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def doc(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = self.offsets[k], self.offsets[k + 1]
        return self.ids[s:e], self.labels[s:e]

    def take(self, idx: Iterable[int]) -> Docs:
        ks = [int(k) for k in idx]
        return Docs.from_docs([self.doc(k) for k in ks], self.splits[ks])

    @staticmethod
    def from_docs(docs: list[tuple[np.ndarray, np.ndarray]], splits: Iterable[int] | None = None) -> Docs:
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(i) for i, _ in docs], dtype=np.int64)
        cuts = None if splits is None else np.asarray(list(splits), dtype=np.int64).reshape(-1)
        if not docs:
            empty = np.zeros(0, dtype=np.int32)
            return Docs(empty, empty.copy(), offsets, cuts)
        ids = np.concatenate([i for i, _ in docs]).astype(np.int32, copy=False)
        labels = np.concatenate([lab for _, lab in docs]).astype(np.int32, copy=False)
        return Docs(ids, labels, offsets, cuts)

    @staticmethod
    def concat(parts: list[Docs]) -> Docs:
        splits = np.concatenate([p.splits for p in parts]) if parts else None
        return Docs.from_docs([p.doc(k) for p in parts for k in range(len(p))], splits)


def pack(docs: Docs, seq_len: int, pad_id: int, packing: bool = True) -> Packed:
    """Place documents into rows of seq_len (best-fit decreasing when packing, one per row otherwise).

    Every document must already fit (the over-long policy ran before). Position ids restart at 0 at each
    document's start and at its split (a pair's rejected half), so a 0 marks exactly every sequence start.
    Padding takes label IGNORE and position ids that continue the row's last sequence, so it joins that
    sequence's attention block and, being after it, cannot change any of its outputs (nor add a 0).
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
            m, cut = int(e - s), int(docs.splits[k])
            ids[r, c : c + m] = docs.ids[s:e]
            labels[r, c : c + m] = docs.labels[s:e]
            pos[r, c : c + cut] = ar[:cut]
            pos[r, c + cut : c + m] = ar[: m - cut]
            c += m
            last = m - cut
        pos[r, c:] = ar[last : last + seq_len - c]
    return Packed(torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(pos))


def pair_segments(position_ids: torch.Tensor) -> torch.Tensor:
    """[rows, T] position ids of preference rows -> [rows, T] int64 segment numbers, 1 from each row's start.

    Every sequence starts at position 0 (pack() restarts at each pair and at its split; padding adds none),
    so the running count of zeros numbers the sequences: odd = a pair's chosen half, even = its rejected
    half, pair (s - 1) // 2 of the row. Padding falls in the row's last segment."""
    return (position_ids == 0).long().cumsum(dim=-1)


def with_pair_top(batch: dict) -> dict:
    """BATCH (host tensors) with "pair_top": the highest segment number of its rows, an int, for the
    objective's pair layout (rank/objective.PairLayout) — read here on the host, where it costs no wait for
    the GPU, rather than from the device copy in every micro-step."""
    seg = pair_segments(batch["position_ids"])
    batch["pair_top"] = int(seg.max()) if seg.numel() else 0
    return batch


def count_pairs(position_ids: torch.Tensor) -> int:
    """Preference pairs in these rows: two sequence starts (position 0) per pair."""
    return int((position_ids == 0).sum()) // 2


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
