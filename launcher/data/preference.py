"""Preference pairs (data.format = 'preference'): TRL's split of a tokenized pair into prompt, chosen and
rejected ids, the over-long rule for a whole pair, and the one document a pair is stored as."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from launcher.data.pack import IGNORE


@dataclass(frozen=True)
class PairText:
    """A preference row rendered into the three texts TRL's DPOTrainer tokenizes: the prompt alone and the
    prompt followed by each completion. `special`: the tokenizer adds its own special tokens (string rows,
    as tokenizer(text) does); a chat template writes them itself, so rendered chat is tokenized without."""

    prompt: str
    prompt_chosen: str
    prompt_rejected: str
    special: bool


@dataclass(frozen=True)
class PairIds:
    """A pair's token ids: the shared prompt and each completion after it (TRL's prompt_ids, chosen_ids,
    rejected_ids)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Leading tokens a and b have in common."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def split_pair(prompt_ids: list[int], prompt_chosen_ids: list[int], prompt_rejected_ids: list[int]) -> PairIds:
    """TRL 1.16's rule: the completions start where the tokenized prompt stops being a prefix of either
    tokenized prompt + completion (tokens can merge across the boundary; templates may render the prompt
    alone with a different ending), so the prompt both halves share is the shorter common prefix."""
    n = min(common_prefix_length(prompt_ids, prompt_chosen_ids), common_prefix_length(prompt_ids, prompt_rejected_ids))
    return PairIds(list(prompt_ids[:n]), list(prompt_chosen_ids[n:]), list(prompt_rejected_ids[n:]))


def pair_length(prompt: int, chosen: int, rejected: int) -> int:
    """Tokens of the stored document: the prompt twice (once before each completion) plus both completions."""
    return 2 * prompt + chosen + rejected


def fit_pair(prompt: int, chosen: int, rejected: int, seq_len: int) -> tuple[int, int, int]:
    """Lengths (prompt kept from its END, chosen and rejected kept from their start) that fit seq_len.

    A pair that fits is kept whole. Otherwise the completions are owed what they need up to half the row,
    NEED = min(chosen + rejected, seq_len // 2); the prompt is kept whole if that leaves them NEED, else cut to
    its last (seq_len - NEED) // 2 tokens (the end of a prompt is what the completion answers; a prompt
    just under half the row would otherwise leave nothing to learn from). The completions share what is
    left, B = seq_len - 2 x prompt: chosen keeps min(chosen, max(B // 2, B - rejected)), so a short rejected
    leaves its unused half to chosen, and rejected keeps min(rejected, B - chosen kept)."""
    if pair_length(prompt, chosen, rejected) <= seq_len:
        return prompt, chosen, rejected
    need = min(chosen + rejected, seq_len // 2)
    p = prompt if seq_len - 2 * prompt >= need else min(prompt, (seq_len - need) // 2)
    budget = seq_len - 2 * p
    c = min(chosen, max(budget // 2, budget - rejected))
    r = min(rejected, budget - c)
    return p, c, r


def pair_document(pair: PairIds) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids, labels, split) of the one document a pair is stored as: prompt + chosen, then prompt +
    rejected from offset `split`. Only completion tokens carry labels (their own ids), and never the first
    token of either sequence: in a packed row nothing before it belongs to its sequence."""
    first = pair.prompt + pair.chosen
    second = pair.prompt + pair.rejected
    labels = [IGNORE] * len(pair.prompt) + pair.chosen + [IGNORE] * len(pair.prompt) + pair.rejected
    lab = np.asarray(labels, dtype=np.int32)
    lab[0] = IGNORE
    lab[len(first)] = IGNORE
    return np.asarray(first + second, dtype=np.int32), lab, len(first)


def cut_pair(pair: PairIds, seq_len: int) -> PairIds:
    """The pair cut to fit seq_len by fit_pair's rule."""
    p, c, r = fit_pair(len(pair.prompt), len(pair.chosen), len(pair.rejected), seq_len)
    prompt = pair.prompt[len(pair.prompt) - p :]
    return PairIds(prompt, pair.chosen[:c], pair.rejected[:r])


def trains_both(labels: np.ndarray, split: int) -> bool:
    """Each half of a pair document has at least one labelled token (DPO compares the two)."""
    return bool((labels[:split] != IGNORE).any()) and bool((labels[split:] != IGNORE).any())
