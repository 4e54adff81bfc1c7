"""Data: load records, render them, tokenize, pack into seq_len, and sample global batches deterministically.

Interface used by the worker (keep it stable):
  build_tokenizer(recipe, model_dir) -> tokenizer
  build_data(recipe, tokenizer, rank, world, cache_dir) -> (train: Packed, val: Packed | None)
  StepSampler(n, global_batch, micro_batch, world, rank, seed).micro_batches(step) -> list[list[int]]
  Packed.collate(indices) -> {"input_ids", "labels", "position_ids"} LongTensors [B, seq_len]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from launcher.errors import UserError
from launcher.recipe import Recipe

IGNORE = -100


@dataclass
class Packed:
    input_ids: torch.Tensor  # [N, T]
    labels: torch.Tensor  # [N, T], IGNORE where no loss
    position_ids: torch.Tensor  # [N, T], restarting at 0 per document

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        i = torch.tensor(idx, dtype=torch.long)
        return {
            "input_ids": self.input_ids[i],
            "labels": self.labels[i],
            "position_ids": self.position_ids[i],
        }


def build_tokenizer(recipe: Recipe, model_dir: Path):
    from transformers import AutoTokenizer

    path = recipe.model.tokenizer or str(model_dir)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=recipe.model.trust_remote_code)


def _records(path: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data.datasets: {path}: file not found")
    out = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{n}: malformed JSON ({err.msg})") from None
    return out


def _encode(recipe: Recipe, tok, rec: dict) -> tuple[list[int], list[int]]:
    d = recipe.data
    if d.format == "alpaca":
        prompt = f"{rec[d.instruction_column]}\n{rec.get(d.input_column) or ''}\n".replace("\n\n", "\n")
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(str(rec[d.output_column]), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = p + r
        labels = ([IGNORE] * len(p) if not d.train_on_prompt else p) + r
        return ids, labels
    ids = tok(str(rec[d.text_column]), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return ids, list(ids)


def _pack(docs: list[tuple[list[int], list[int]]], seq_len: int, pad: int) -> Packed:
    rows_i, rows_l, rows_p = [], [], []
    cur_i: list[int] = []
    cur_l: list[int] = []
    cur_p: list[int] = []
    for ids, labels in docs:
        ids, labels = ids[:seq_len], labels[:seq_len]
        if len(cur_i) + len(ids) > seq_len:
            rows_i.append(cur_i), rows_l.append(cur_l), rows_p.append(cur_p)
            cur_i, cur_l, cur_p = [], [], []
        cur_i += ids
        cur_l += labels
        cur_p += list(range(len(ids)))
    if cur_i:
        rows_i.append(cur_i), rows_l.append(cur_l), rows_p.append(cur_p)
    n = len(rows_i)
    ids_t = torch.full((n, seq_len), pad, dtype=torch.long)
    L = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    P = torch.zeros((n, seq_len), dtype=torch.long)
    for k in range(n):
        m = len(rows_i[k])
        ids_t[k, :m] = torch.tensor(rows_i[k])
        L[k, :m] = torch.tensor(rows_l[k])
        P[k, :m] = torch.tensor(rows_p[k])
        P[k, m:] = torch.arange(seq_len - m)
    return Packed(ids_t, L, P)


def build_data(recipe: Recipe, tokenizer, rank: int, world: int, cache_dir: Path | None = None):
    docs = []
    for ds in recipe.data.datasets:
        docs += [_encode(recipe, tokenizer, r) for r in _records(ds.path)]
    if not docs:
        raise UserError("data.datasets: the dataset is empty")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train = _pack(docs, recipe.data.seq_len, pad)
    val = None
    if recipe.data.val_path:
        val = _pack([_encode(recipe, tokenizer, r) for r in _records(recipe.data.val_path)], recipe.data.seq_len, pad)
    return train, val


class StepSampler:
    """Global batch of step s = samples perm[s*G:(s+1)*G] (a fresh seeded permutation per epoch).

    Rank r's micro-step a gets positions [(a*W + r)*mb, +mb) of that global batch: disjoint across ranks,
    the same global batch at any world size, and resumable from the step number alone.
    """

    def __init__(self, n: int, global_batch: int, micro_batch: int, world: int, rank: int, seed: int):
        if n < global_batch:
            raise UserError(f"the training data has {n} packed samples, fewer than train.global_batch = {global_batch}")
        self.n, self.G, self.mb, self.W, self.r, self.seed = n, global_batch, micro_batch, world, rank, seed
        self.steps_per_epoch = n // global_batch
        self.accum = global_batch // (micro_batch * world)

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def global_batch(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        return self._perm(epoch)[k * self.G : (k + 1) * self.G].tolist()

    def micro_batches(self, step: int) -> list[list[int]]:
        gb = self.global_batch(step)
        return [gb[(a * self.W + self.r) * self.mb : (a * self.W + self.r + 1) * self.mb] for a in range(self.accum)]
