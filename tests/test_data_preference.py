"""Preference pairs (data.format = 'preference'): the pure pieces (length rule, segments) and one build."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from launcher.data.pack import IGNORE, Docs, count_pairs, pack, pair_segments
from launcher.data.preference import PairIds, fit_pair, pair_document, split_pair
from launcher.data.tokenize import build_payload
from launcher.plan.recipe_file import validate
from tests.conftest import TINY_DATA, TINY_MODEL


@pytest.mark.parametrize(
    "p,c,r,seq,expect",
    [
        (5, 3, 3, 16, (5, 3, 3)),  # 16 tokens exactly: kept whole
        (5, 4, 3, 16, (4, 4, 3)),  # one over, need min(7, 8) = 7 > 16 - 10: prompt to (16 - 7) // 2 = 4
        (4, 5, 4, 16, (4, 4, 4)),  # need 8 = 16 - 8: the prompt stays whole, completions cut to B = 8
        (2, 11, 2, 16, (2, 10, 2)),  # short rejected leaves its half to chosen: B = 12
        (2, 1, 20, 16, (2, 1, 11)),  # short chosen: rejected takes the rest
        (9, 4, 4, 16, (4, 4, 4)),  # prompt over half (18 > 16): last (16 - 8) // 2 = 4 tokens, B = 8
        (8, 4, 4, 16, (4, 4, 4)),  # prompt exactly half: cut too, the completions get their half
        (7, 1, 1, 16, (7, 1, 1)),  # fits (16): whole
        (7, 2, 1, 16, (6, 2, 1)),  # need min(3, 8) = 3 > 16 - 14: prompt (16 - 3) // 2 = 6, both completions whole
    ],
)
def test_fit_pair_boundaries(p, c, r, seq, expect):
    got = fit_pair(p, c, r, seq)
    assert got == expect
    assert 2 * got[0] + got[1] + got[2] <= seq


def test_split_pair_is_trls_common_prefix_rule():
    pair = split_pair([1, 2, 3], [1, 2, 4, 5], [1, 2, 3, 6])
    assert pair == PairIds([1, 2], [4, 5], [3, 6])


def test_pair_document_masks_prompt_and_each_first_token_and_splits():
    ids, labels, split = pair_document(PairIds([1, 2], [3, 4], [5]))
    assert ids.tolist() == [1, 2, 3, 4, 1, 2, 5] and split == 4
    assert labels.tolist() == [IGNORE, IGNORE, 3, 4, IGNORE, IGNORE, 5]
    _, labels, _ = pair_document(PairIds([], [3, 4], [5, 6]))
    assert labels.tolist() == [IGNORE, 4, IGNORE, 6]


def _pairs() -> Docs:
    docs = [pair_document(PairIds([1] * p, [2] * c, [3] * r)) for p, c, r in ((2, 2, 1), (1, 3, 3), (3, 1, 2))]
    return Docs.from_docs([(i, lab) for i, lab, _ in docs], [s for _, _, s in docs])


@pytest.mark.parametrize("packing", [True, False])
def test_pack_restarts_positions_at_every_sequence_and_segments_recover_pairs(packing):
    docs = _pairs()
    packed = pack(docs, 24, 0, packing)
    pos = packed.position_ids
    assert count_pairs(pos) == 3
    seg = pair_segments(pos)
    assert seg.dtype == torch.int64 and int(seg[:, 0].min()) == 1
    for r in range(len(packed)):
        ids = packed.input_ids[r]
        for s in range(1, int(seg[r].max()) + 1):
            tokens = ids[(seg[r] == s) & (ids != 0)].tolist()
            completion = {2} if s % 2 else {3}  # odd = chosen (2s), even = rejected (3s)
            assert set(tokens) - {1} == completion
    assert len(packed) == (1 if packing else 3)  # 7 + 8 + 9 tokens fill one row of 24


def test_docs_take_and_concat_keep_splits():
    docs = _pairs()
    both = Docs.concat([docs.take([2, 0]), docs.take([1])])
    assert both.splits.tolist() == [docs.splits[2], docs.splits[0], docs.splits[1]]
    assert Docs.from_docs([(np.array([1, 2]), np.array([1, 2]))]).splits.tolist() == [0]
    with pytest.raises(AssertionError):
        Docs.from_docs([(np.array([1, 2]), np.array([1, 2]))], [2])


@pytest.mark.parametrize("name", ["preference.jsonl", "preference-chat.jsonl"])
def test_tiny_preference_data_builds_pairs_with_a_val_carve(name):
    from transformers import AutoTokenizer

    r = validate(
        {
            "name": "t",
            "model": {"path": str(TINY_MODEL)},
            "data": {
                "format": "preference",
                "seq_len": 256,
                "val_fraction": 0.25,
                "datasets": [{"path": str(TINY_DATA / name)}],
            },
            "train": {"max_steps": 1, "global_batch": 4, "micro_batch": 1, "objective": "dpo"},
        }
    )
    payload = build_payload(r, AutoTokenizer.from_pretrained(str(TINY_MODEL)))
    rows = sum(1 for _ in open(TINY_DATA / name))
    counted = sum(count_pairs(payload[k]["position_ids"]) for k in ("train", "val"))
    assert counted == rows == payload["stats"]["train_documents"] + payload["stats"]["val_documents"]
