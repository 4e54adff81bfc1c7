"""The data pipeline with real parts: datasets loaders, the tiny model's tokenizer, the tiny model's forward."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.data.cache import build_data, prepare, shared_build
from launcher.data.check import check
from launcher.data.pack import IGNORE, Docs, Packed, _best_fit
from launcher.data.read import classify
from launcher.data.sampler import StepBatches, StepSampler
from launcher.data.tokenize import build_payload, fingerprint
from launcher.data.tokenizer import build_tokenizer
from launcher.errors import UserError
from launcher.plan.recipe import Recipe
from launcher.plan.recipe_file import validate
from tests.conftest import TINY_DATA, TINY_MODEL

PAD = 2  # the tiny tokenizer's pad id; test documents never end with it


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Keep the datasets library's Arrow cache inside the test's tmp dir (and observable)."""
    import datasets

    cache = tmp_path / "hf-datasets"
    cache.mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY_MODEL))


def recipe(data_: dict, **train) -> Recipe:
    return validate(
        {
            "name": "t",
            "model": {"path": str(TINY_MODEL)},
            "data": {"seq_len": 64, **data_},
            "train": {"max_steps": 1, "global_batch": 4, "micro_batch": 1, **train},
        }
    )


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def docs_of(packed) -> list[tuple[list[int], list[int]]]:
    """Split packed rows back into documents (a document starts where position_ids is 0)."""
    out = []
    for r in range(len(packed)):
        ids, labels, pos = (t[r].tolist() for t in (packed.input_ids, packed.labels, packed.position_ids))
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for s, e in zip(starts, starts[1:], strict=False):
            # Padding continues the last document's positions: cut it off by its labels and ids.
            while e > s + 1 and ids[e - 1] == PAD and labels[e - 1] == IGNORE:
                e -= 1
            out.append((ids[s:e], labels[s:e]))
    return out


def trained_text(tok, packed) -> list[str]:
    return [tok.decode([t for t in lab if t != IGNORE]) for _, lab in docs_of(packed)]


def trained_spans(tok, labels: list[int]) -> list[str]:
    """Decoded runs of consecutive label-carrying tokens."""
    spans, cur = [], []
    for t in [*labels, IGNORE]:
        if t != IGNORE:
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    return spans


# ------------------------------------------------------------------ formats


def test_text_format_trains_every_token_but_the_first(tmp_path, tok):
    texts = ["hello world", "a longer piece of text here", "x"]
    path = jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    train, val = build_data(recipe({"datasets": [{"path": str(path)}], "packing": False}), tok, 0, 1)
    assert val is None
    got = sorted(docs_of(train))
    want = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        want.append((ids, [IGNORE] + ids[1:]))
    assert got == sorted(want)
    row = train.collate([0])
    assert set(row) == {"input_ids", "labels", "position_ids"}
    assert all(v.dtype == torch.long and v.shape == (1, 64) for v in row.values())
    n = int((row["labels"] != IGNORE).sum()) + 1  # the document's length (first token has no label)
    assert row["position_ids"][0].tolist() == list(range(64)), "padding continues the document's positions"
    assert (row["labels"][0, n:] == IGNORE).all()


def test_alpaca_trains_on_the_response_only_unless_told(tmp_path, tok):
    rows = [
        {"instruction": "Reverse the word.", "input": "cloud", "output": "duolc"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
    ]
    path = jsonl(tmp_path / "a.jsonl", rows)
    r = recipe({"datasets": [{"path": str(path)}], "format": "alpaca", "seq_len": 128, "packing": False})
    train, _ = build_data(r, tok, 0, 1)
    assert sorted(trained_text(tok, train)) == ["duolc<|eos|>", "hi<|eos|>"]
    full = sorted(tok.decode(ids) for ids, _ in docs_of(train))
    assert full[0].startswith("### Instruction:\nReverse the word.\n\n### Input:\ncloud\n\n### Response:\nduolc")
    assert full[1] == "### Instruction:\nSay hi.\n\n### Response:\nhi<|eos|>", "an empty input has no Input section"

    r = recipe(
        {
            "datasets": [{"path": str(path)}],
            "format": "alpaca",
            "seq_len": 128,
            "packing": False,
            "train_on_prompt": True,
        }
    )
    train, _ = build_data(r, tok, 0, 1)
    for ids, labels in docs_of(train):
        assert labels == [IGNORE] + ids[1:]


def test_alpaca_column_names_are_configurable(tmp_path, tok):
    path = jsonl(tmp_path / "a.jsonl", [{"q": "Say hi.", "ctx": "now", "a": "hi"}])
    r = recipe(
        {
            "datasets": [{"path": str(path)}],
            "format": "alpaca",
            "instruction_column": "q",
            "input_column": "ctx",
            "output_column": "a",
            "seq_len": 128,
        }
    )
    train, _ = build_data(r, tok, 0, 1)
    assert trained_text(tok, train) == ["hi<|eos|>"]
    assert tok.decode(docs_of(train)[0][0]).startswith("### Instruction:\nSay hi.\n\n### Input:\nnow\n")


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Ciao"},
]


def test_chat_default_template_trains_on_assistant_turns_only(tmp_path, tok):
    assert tok.chat_template is None, "the tiny tokenizer has no template: the documented default applies"
    path = jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    r = recipe({"datasets": [{"path": str(path)}], "format": "chat", "seq_len": 128})
    train, _ = build_data(r, tok, 0, 1)
    (ids, labels), *rest = docs_of(train)
    assert not rest
    assert tok.decode(ids) == (
        "<|im_start|>system\nBe brief.<|eos|><|im_start|>user\nHi<|eos|><|im_start|>assistant\nHello<|eos|>"
        "<|im_start|>user\nBye<|eos|><|im_start|>assistant\nCiao<|eos|>"
    )
    assert trained_spans(tok, labels) == ["Hello<|eos|>", "Ciao<|eos|>"]

    r = recipe({"datasets": [{"path": str(path)}], "format": "chat", "seq_len": 128, "train_on_prompt": True})
    (ids, labels), *_ = docs_of(build_data(r, tok, 0, 1)[0])
    assert labels == [IGNORE] + ids[1:]


def test_chat_template_from_the_recipe_and_custom_column(tmp_path, tok):
    template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    path = jsonl(tmp_path / "c.jsonl", [{"conv": CHAT[1:3]}])
    r = recipe(
        {
            "datasets": [{"path": str(path)}],
            "format": "chat",
            "messages_column": "conv",
            "chat_template": template,
            "seq_len": 128,
        }
    )
    train, _ = build_data(r, tok, 0, 1)
    (ids, _), *_ = docs_of(train)
    assert tok.decode(ids) == "[user] Hi\n[assistant] Hello\n"
    assert trained_text(tok, train) == ["Hello\n"]


SYSTEM_CHAT = [{"role": "system", "content": "Be brief."}, *CHAT[1:]]

# What each named template makes of SYSTEM_CHAT (the tiny tokenizer's bos/eos are <|bos|>/<|eos|>), and the
# assistant replies it trains on: the reply and the family's end-of-turn marker.
NAMED_RENDERINGS = {
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "Hello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nCiao<|im_end|>\n",
        ["Hello<|im_end|>\n", "Ciao<|im_end|>\n"],
    ),
    "llama3": (
        "<|bos|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
        "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
        "\n\nCiao<|eot_id|>",
        ["Hello<|eot_id|>", "Ciao<|eot_id|>"],
    ),
    "gemma": (
        "<|bos|><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\nCiao<end_of_turn>\n",
        ["Hello<end_of_turn>\n", "Ciao<end_of_turn>\n"],
    ),
    "mistral": (
        "<|bos|>[INST] Be brief.\n\nHi [/INST]Hello<|eos|>[INST] Bye [/INST]Ciao<|eos|>",
        ["Hello<|eos|>", "Ciao<|eos|>"],
    ),
    "phi": (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n<|user|>\nBye<|end|>\n"
        "<|assistant|>\nCiao<|end|>\n",
        ["Hello<|end|>\n", "Ciao<|end|>\n"],
    ),
    "phi4": (
        "<|im_start|>system<|im_sep|>Be brief.<|im_end|><|im_start|>user<|im_sep|>Hi<|im_end|><|im_start|>"
        "assistant<|im_sep|>Hello<|im_end|><|im_start|>user<|im_sep|>Bye<|im_end|><|im_start|>assistant<|im_sep|>"
        "Ciao<|im_end|>",
        ["Hello<|im_end|>", "Ciao<|im_end|>"],
    ),
}


@pytest.mark.parametrize("name", sorted(NAMED_RENDERINGS))
def test_named_chat_templates_render_the_family_layout_and_train_on_the_replies(tmp_path, tok, name):
    path = jsonl(tmp_path / "c.jsonl", [{"messages": SYSTEM_CHAT}])
    train, _ = build_data(recipe({"datasets": [{"path": str(path)}], "format": "chat", "chat_template": name,
                                  "seq_len": 256}), tok, 0, 1)  # fmt: skip
    (ids, labels), *rest = docs_of(train)
    text, replies = NAMED_RENDERINGS[name]
    assert not rest and tok.decode(ids) == text
    assert trained_spans(tok, labels) == replies


def test_qwen_adds_its_default_system_turn_and_tokenizer_means_the_tokenizers(tmp_path, tok):
    from launcher.errors import UserError

    path = jsonl(tmp_path / "c.jsonl", [{"messages": CHAT[1:3]}])
    r = recipe({"datasets": [{"path": str(path)}], "format": "chat", "chat_template": "qwen", "seq_len": 256})
    (ids, _), *_ = docs_of(build_data(r, tok, 0, 1)[0])
    assert tok.decode(ids).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>"
    )
    assert tok.chat_template is None
    r = recipe({"datasets": [{"path": str(path)}], "format": "chat", "chat_template": "tokenizer", "seq_len": 256})
    with pytest.raises(UserError, match="data.chat_template = 'tokenizer', but the tokenizer has no chat template"):
        build_data(r, tok, 0, 1)


def test_tokenized_format_keeps_ids_and_labels(tmp_path, tok):
    rows = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
        {"input_ids": [9, 10, 11]},  # no labels: train on every token
    ]
    path = jsonl(tmp_path / "k.jsonl", rows)
    train, _ = build_data(recipe({"datasets": [{"path": str(path)}], "format": "tokenized"}), tok, 0, 1)
    assert sorted(docs_of(train)) == [([5, 6, 7, 8], [-100, -100, 7, 8]), ([9, 10, 11], [-100, 10, 11])]


# ------------------------------------------------------------------ loaders


ROWS = [{"text": f"document number {i} " + "word " * i} for i in range(12)]


def _write(kind: str, tmp_path: Path) -> str:
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    if kind == "jsonl":
        return str(jsonl(tmp_path / "d.jsonl", ROWS))
    if kind == "json-array":
        (tmp_path / "d.json").write_text(json.dumps(ROWS, indent=1))
        return str(tmp_path / "d.json")
    if kind == "parquet":
        ds.to_parquet(tmp_path / "d.parquet")
        return str(tmp_path / "d.parquet")
    if kind == "csv":
        ds.to_csv(tmp_path / "d.csv", index=False)
        return str(tmp_path / "d.csv")
    if kind == "saved":
        datasets.DatasetDict({"train": ds, "validation": ds.select([0])}).save_to_disk(tmp_path / "saved")
        return str(tmp_path / "saved")
    if kind == "arrow":
        ds.save_to_disk(tmp_path / "single")
        (arrow,) = (tmp_path / "single").glob("*.arrow")
        return str(arrow)
    # A directory of data files goes through load_dataset(name, split=...), the hub code path.
    (tmp_path / "repo").mkdir()
    jsonl(tmp_path / "repo" / "train.jsonl", ROWS)
    return str(tmp_path / "repo")


def test_every_loader_gives_the_same_rows(tmp_path, tok):
    results = {}
    for kind in ("jsonl", "json-array", "parquet", "csv", "saved", "arrow", "repo"):
        d = tmp_path / kind
        d.mkdir()
        r = recipe({"datasets": [{"path": _write(kind, d)}], "seq_len": 32})
        check(r)
        results[kind], _ = build_data(r, tok, 0, 1)
    ref = results["jsonl"]
    assert len(ref) > 1
    for kind, got in results.items():
        assert torch.equal(got.input_ids, ref.input_ids), kind
        assert torch.equal(got.labels, ref.labels), kind


def test_hub_names_are_passed_to_datasets(tmp_path, tok, monkeypatch):
    import datasets

    seen = {}

    def fake_load(name, split=None, **kw):
        seen["args"] = (name, split)
        return datasets.Dataset.from_list(ROWS)

    # The hub itself is unreachable here; what matters is that an org/name reaches load_dataset unchanged.
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert classify("someorg/some-data", "train", "k").kind == "hub"
    train, _ = build_data(recipe({"datasets": [{"path": "someorg/some-data", "split": "sft"}]}), tok, 0, 1)
    assert seen["args"] == ("someorg/some-data", "sft") and len(train) > 0
    check(recipe({"datasets": [{"path": "someorg/some-data"}]}))  # named only: nothing to read offline


# ------------------------------------------------------------------ packing


def test_best_fit_fills_rows():
    rows = _best_fit(np.array([5, 3, 5, 2, 3, 2]), 10)
    assert sorted(sorted(r) for r in rows) == [[0, 2], [1, 3, 4, 5]]


def test_packing_keeps_every_document_whole_and_once(tmp_path, tok):
    rng = np.random.default_rng(0)
    rows = [{"input_ids": rng.integers(3, 500, size=int(n)).tolist()} for n in rng.integers(2, 40, size=60)]
    path = jsonl(tmp_path / "k.jsonl", rows)
    r = recipe({"datasets": [{"path": str(path)}], "format": "tokenized", "seq_len": 48})
    packed, _ = build_data(r, tok, 0, 1)
    unpacked, _ = build_data(recipe({**r.data.model_dump(), "packing": False}), tok, 0, 1)
    assert len(unpacked) == 60 and len(packed) < 40
    assert sorted(ids for ids, _ in docs_of(packed)) == sorted(x["input_ids"] for x in rows)
    for ids, labels in docs_of(packed):
        assert labels == [IGNORE] + ids[1:]
    p = packed.position_ids
    assert ((p[:, 1:] == p[:, :-1] + 1) | (p[:, 1:] == 0)).all(), "positions count up, restarting per document"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_packed_loss_equals_unpacked_loss(tmp_path, tok, attn, train_on_prompt):
    """No attention across packed documents: transformers derives the block mask from position_ids."""
    from transformers import AutoModelForCausalLM

    from launcher.rank.loss import CausalLMLoss

    lines = (TINY_DATA / "train.jsonl").read_text().splitlines()[:24]
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(lines) + "\n")
    base = {"datasets": [{"path": str(path)}], "format": "alpaca", "seq_len": 160, "train_on_prompt": train_on_prompt}
    packed, _ = build_data(recipe(base), tok, 0, 1)
    single, _ = build_data(recipe({**base, "packing": False}), tok, 0, 1)
    assert len(single) == 24 and len(packed) <= 12, "rows hold two or more documents"

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(TINY_MODEL), dtype=torch.float32, attn_implementation=attn)
    f = CausalLMLoss(model).eval()
    with torch.no_grad():
        b = packed.collate(list(range(len(packed))))
        s_packed, n_packed = f(b["input_ids"], b["labels"], b["position_ids"])
        u = single.collate(list(range(len(single))))
        s_single, n_single = f(u["input_ids"], u["labels"], u["position_ids"])
        # Control: the same packed rows with positions that do not restart let documents see each other.
        leaky = torch.arange(packed.seq_len).expand_as(b["position_ids"])
        s_leaky, _ = f(b["input_ids"], b["labels"], leaky)
    assert int(n_packed) == int(n_single) > 0
    torch.testing.assert_close(s_packed, s_single, rtol=2e-6, atol=1e-4)
    assert abs(float(s_leaky - s_single)) > 100 * abs(float(s_packed - s_single)) + 1e-3


# ------------------------------------------------------------------ over-long samples


@pytest.mark.parametrize("policy", ["truncate", "drop", "error"])
def test_overlong_policy(tmp_path, tok, policy):
    path = jsonl(tmp_path / "t.jsonl", [{"text": "short"}, {"text": "word " * 80}, {"text": "tiny"}])
    r = recipe({"datasets": [{"path": str(path)}], "seq_len": 16, "overlong": policy})
    if policy == "error":
        for fn in (lambda: check(r), lambda: build_data(r, tok, 0, 1)):
            with pytest.raises(UserError, match=rf"^{path}:2: sample has \d+ tokens, more than data.seq_len = 16"):
                fn()
        return
    train, _ = build_data(r, tok, 0, 1)
    lengths = sorted(len(ids) for ids, _ in docs_of(train))
    assert train.stats["rows_read"] == 3
    if policy == "truncate":
        assert lengths[-1] == 16 and len(lengths) == 3 and train.stats["truncated"] == 1
    else:
        assert len(lengths) == 2 and train.stats["overlong_dropped"] == 1


# ------------------------------------------------------------------ validation data


def test_val_path_and_val_fraction(tmp_path, tok):
    rows = [{"text": f"sample {i} " + "x " * (i % 7)} for i in range(40)]
    path = jsonl(tmp_path / "t.jsonl", rows)
    vpath = jsonl(tmp_path / "v.jsonl", rows[:3])
    train, val = build_data(recipe({"datasets": [{"path": str(path)}], "val_path": str(vpath)}), tok, 0, 1)
    assert len(docs_of(val)) == 3 and len(docs_of(train)) == 40

    def split(seed: int):
        r = recipe({"datasets": [{"path": str(path)}], "val_fraction": 0.25}, seed=seed)
        t, v = build_data(r, tok, 0, 1)
        return {tuple(i) for i, _ in docs_of(t)}, {tuple(i) for i, _ in docs_of(v)}

    t0, v0 = split(0)
    t1, v1 = split(5)
    assert len(v0) == 10 and len(t0) == 30 and not (t0 & v0)
    assert v0 == v1, "the validation carve does not depend on train.seed"

    tiny = jsonl(tmp_path / "one.jsonl", rows[:1])
    r = recipe({"datasets": [{"path": str(tiny)}], "val_fraction": 0.5})
    with pytest.raises(UserError, match="too few to carve off data.val_fraction"):
        check(r)


# ------------------------------------------------------------------ mixing


def test_weights_mix_deterministically(tmp_path, tok):
    a = jsonl(tmp_path / "a.jsonl", [{"input_ids": [10, 10 + i]} for i in range(4)])
    b = jsonl(tmp_path / "b.jsonl", [{"input_ids": [20, 20 + i]} for i in range(6)])

    def mix(seed: int):
        r = recipe(
            {
                "datasets": [{"path": str(a), "weight": 2.0}, {"path": str(b), "weight": 0.5}],
                "format": "tokenized",
                "seq_len": 8,
            },
            seed=seed,
        )
        train, _ = build_data(r, tok, 0, 1)
        return sorted(tuple(ids) for ids, _ in docs_of(train)), train

    docs, train = mix(0)
    from_a = [d for d in docs if d[0] == 10]
    from_b = [d for d in docs if d[0] == 20]
    assert sorted(set(from_a)) == [(10, 10 + i) for i in range(4)] and len(from_a) == 8
    assert len(from_b) == 3 and len(set(from_b)) == 3
    again, train2 = mix(0)
    assert again == docs and torch.equal(train.input_ids, train2.input_ids)
    assert {d for d in mix(1)[0] if d[0] == 20} != set(from_b), "another seed picks another half"


# ------------------------------------------------------------------ cache shared by ranks


def test_fingerprint_tracks_files_settings_and_tokenizer(tmp_path, tok):
    path = jsonl(tmp_path / "t.jsonl", ROWS)
    r = recipe({"datasets": [{"path": str(path)}]})
    key = fingerprint(r, tok)
    assert fingerprint(r, tok) == key
    assert fingerprint(recipe({"datasets": [{"path": str(path)}], "seq_len": 65}), tok) != key
    other = tok.__class__.from_pretrained(str(TINY_MODEL))
    other.chat_template = "{{ messages }}"
    assert fingerprint(r, other) != key
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert fingerprint(r, tok) != key


def test_ranks_share_one_tokenization(tmp_path, tok, monkeypatch):
    path = jsonl(tmp_path / "t.jsonl", ROWS)
    r = recipe({"datasets": [{"path": str(path)}], "seq_len": 32})
    cache = tmp_path / "cache"
    builds = []
    real = build_payload

    def counting(*a):
        builds.append(threading.get_ident())
        time.sleep(0.3)  # long enough that the other ranks find the lock taken
        return real(*a)

    monkeypatch.setattr("launcher.data.cache.build_payload", counting)
    with ThreadPoolExecutor(3) as ex:
        out = list(ex.map(lambda rank: build_data(r, tok, rank, 3, cache), range(3)))
    assert len(builds) == 1
    for train, _ in out[1:]:
        assert torch.equal(train.input_ids, out[0][0].input_ids)
    assert [p.suffix for p in cache.iterdir()] == [".pt"], "no lock, marker or tmp file left behind"
    build_data(r, tok, 0, 1, cache)
    assert len(builds) == 1, "a second run with the same inputs reads the cache"


def test_a_failing_build_reaches_every_rank(tmp_path, tok):
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "broken\n')
    r = recipe({"datasets": [{"path": str(bad)}]})
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(2) as ex:
        futures = [ex.submit(build_data, r, tok, rank, 2, cache) for rank in range(2)]
        errors = [f.exception(timeout=60) for f in futures]
    assert all(isinstance(e, UserError) for e in errors)
    assert {str(e) for e in errors} == {f"{bad}:2: malformed JSON (Unterminated string starting at column 10)"}
    (marker,) = cache.glob("*.error")
    assert json.loads(marker.read_text())["kind"] == "user"
    with pytest.raises(UserError, match="malformed JSON"):
        build_data(r, tok, 1, 2, cache)  # a late rank gets it from the marker at once


def test_shared_build_crash_stale_lock_and_timeout(tmp_path):
    def crash():
        raise ValueError("disk on fire")

    with pytest.raises(ValueError):
        shared_build(tmp_path / "a", "k", crash)
    with pytest.raises(RuntimeError, match="ValueError: disk on fire"):
        shared_build(tmp_path / "a", "k", lambda: {"x": 1})

    # A builder killed without cleaning up leaves a lock whose heartbeat stopped: it is taken over.
    (tmp_path / "b").mkdir()
    lock = tmp_path / "b" / "k.lock"
    lock.write_text("{}")
    os.utime(lock, (time.time() - 60, time.time() - 60))
    assert shared_build(tmp_path / "b", "k", lambda: {"x": torch.ones(2)}, stale_s=10)["x"].sum() == 2

    # A live lock (fresh heartbeat) that never finishes: the wait ends with a clear message.
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "k.lock").write_text("{}")
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"gave up after 1s waiting for another process to prepare the data cache"):
        shared_build(tmp_path / "c", "k", lambda: {}, timeout_s=1.0, stale_s=60, poll_s=0.05)
    assert time.monotonic() - t0 < 10


def test_a_failed_build_never_fails_later_runs(tmp_path):
    """The cache directory is shared by every run: a failure marker tells only the failing attempt's own
    processes (so they stop at once instead of waiting); a later run or an elastic restart builds again."""

    def crash():
        raise ValueError("disk on fire")

    cache = tmp_path / "cache"
    with pytest.raises(ValueError):
        shared_build(cache, "k", crash, attempt="run-a#0")
    with pytest.raises(RuntimeError, match="ValueError: disk on fire"):
        shared_build(cache, "k", lambda: {"x": 1}, attempt="run-a#0")  # the same attempt's other ranks
    got = shared_build(cache, "k", lambda: {"x": torch.ones(2)}, attempt="run-a#1")  # the restart builds
    assert got["x"].sum() == 2
    assert [p.name for p in cache.iterdir()] == ["k.pt"], "the failed attempt's marker is cleaned up"
    # A process nobody waits for (the launcher's own build, a one-rank run) leaves no marker at all.
    with pytest.raises(ValueError):
        shared_build(tmp_path / "solo", "k", crash, share_errors=False)
    assert list((tmp_path / "solo").iterdir()) == []


def test_a_lock_whose_builder_died_is_broken_at_once(tmp_path):
    """A builder killed outright (SIGKILL, a segfault) leaves its lock: a process of the same machine sees the
    holder is gone and builds, instead of waiting out the heartbeat (minutes)."""
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "k.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "rank": 0}))
    t0 = time.monotonic()
    got = shared_build(cache, "k", lambda: {"x": torch.ones(1)}, timeout_s=5.0, stale_s=300)
    assert got["x"].sum() == 1 and time.monotonic() - t0 < 2


# ------------------------------------------------------------------ sampling


def test_sampler_is_disjoint_world_size_independent_and_deterministic():
    n, G = 37, 8
    one = StepSampler(n, G, 2, 1, 0, seed=3)
    for step in (0, 1, 4, 5, 9):  # 4 steps per epoch: crosses two epoch boundaries
        gb = one.global_batch(step)
        assert sorted(x for m in one.micro_batches(step) for x in m) == sorted(gb)
        for world in (2, 4):
            ranks = [StepSampler(n, G, 2, world, r, seed=3).micro_batches(step) for r in range(world)]
            flat = [x for rk in ranks for m in rk for x in m]
            assert len(flat) == len(set(flat)) == G and sorted(flat) == sorted(gb)
    epoch0 = [x for s in range(4) for x in one.global_batch(s)]
    assert len(set(epoch0)) == 32, "no sample twice within an epoch"
    assert one.global_batch(0) != one.global_batch(4), "a fresh permutation per epoch"
    assert StepSampler(n, G, 2, 1, 0, seed=3).global_batch(2) == one.global_batch(2)
    assert StepSampler(n, G, 2, 1, 0, seed=4).global_batch(2) != one.global_batch(2)


def test_sampler_resumes_exactly():
    def fresh(world: int = 2, rank: int = 1) -> StepSampler:
        return StepSampler(50, 8, 2, world, rank, seed=7)

    full = fresh()
    want = [full.next() for _ in range(15)]
    first = fresh()
    for _ in range(9):
        first.next()
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = fresh()
    resumed.load_state_dict(state)
    assert [resumed.next() for _ in range(6)] == want[9:]

    # The global batch of a step is the same at any world size, so a resume may change it.
    wide = [fresh(4, r) for r in range(4)]
    for s in wide:
        s.load_state_dict(state)
    assert sorted(x for s in wide for m in s.next() for x in m) == sorted(full.global_batch(9))

    with pytest.raises(UserError, match="checkpoint was taken with train.global_batch = 8"):
        StepSampler(50, 16, 2, 2, 1, seed=7).load_state_dict(state)
    with pytest.raises(UserError, match="fewer than train.global_batch"):
        StepSampler(3, 8, 2, 2, 0, seed=0)


def test_step_batches_are_the_samplers_and_count_every_ranks_labels():
    """StepBatches (built one step ahead on a thread) hands out exactly the collated micro-batches of the
    sampler, and its label count is the sum over every rank's micro-batches: what an all-reduce of the
    per-rank counts gave, computed without one."""
    g = torch.Generator().manual_seed(0)
    n, T, G, world = 40, 12, 8, 2
    labels = torch.randint(0, 50, (n, T), generator=g, dtype=torch.int32)
    labels[torch.rand(n, T, generator=g) < 0.4] = IGNORE  # prompts / padding: varying counts per row
    packed = Packed(labels.abs(), labels, torch.arange(T).expand(n, T).contiguous())
    samplers = [StepSampler(n, G, 2, world, r, seed=1) for r in range(world)]
    feeds = [StepBatches(packed, s, pin=False) for s in samplers]
    for step in range(7):  # crosses an epoch boundary (5 steps per epoch)
        then = step + 1 if step < 6 else None
        got = [f.get(step, then) for f in feeds]
        counted = 0
        for (micro, n_labels), sampler in zip(got, samplers, strict=True):
            want = [packed.collate(idx) for idx in sampler.micro_batches(step)]
            assert len(micro) == len(want) == 2
            for b, w in zip(micro, want, strict=True):
                assert b.keys() == w.keys() and all(torch.equal(b[k], w[k]) for k in w)
            counted += sum(int((w["labels"][:, 1:] != IGNORE).sum()) for w in want)
            assert n_labels == got[0][1]
        assert got[0][1].tokens == counted
        assert all((f._ahead is None) == (then is None) for f in feeds)
        if then is not None:
            assert all(f._ahead[0] == then for f in feeds)  # the next step is already being built
    assert feeds[0].get(3, None)[1] == feeds[1].counts(3)  # a step asked out of order is built then


# ------------------------------------------------------------------ bad input: one line naming file and line


def _bad_cases(tmp_path: Path) -> list[tuple[str, dict, str]]:
    """(name, data settings, expected message prefix) for each class of bad input."""
    import datasets

    p = tmp_path
    jsonl(p / "ok.jsonl", [{"instruction": "i", "output": "o"}])
    (p / "malformed.jsonl").write_text('{"instruction": "i", "output": "o"}\n\n{"instruction": "i", "output": \n')
    jsonl(p / "nocol.jsonl", [{"instruction": "i", "response": "o"}])
    jsonl(p / "rowcol.jsonl", [{"instruction": "i", "output": "o"}, {"instruction": "i"}])
    jsonl(p / "type.jsonl", [{"instruction": "i", "output": "o"}, {"instruction": "i", "output": 5}])
    datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}, {"text": ""}]).to_parquet(p / "t.parquet")
    datasets.Dataset.from_list([{"text": [1]}, {"text": [2]}]).to_parquet(p / "type.parquet")
    (p / "empty.jsonl").write_text("\n")
    (p / "empty.csv").write_text("instruction,output\n")
    (p / "data.txt").write_text("hello\n")
    chat_ok = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    jsonl(p / "role.jsonl", [{"messages": chat_ok}, {"messages": [chat_ok[0], {"role": "bot", "content": "a"}]}])
    jsonl(p / "chat.jsonl", [{"messages": chat_ok}])
    jsonl(p / "nochat.jsonl", [{"messages": [{"role": "user", "content": "only a question"}]}])
    jsonl(p / "long.jsonl", [{"text": "word " * 200}])
    alpaca = {"format": "alpaca"}
    return [
        ("malformed", {**alpaca, "path": "malformed.jsonl"}, "malformed.jsonl:3: malformed JSON (Expecting value"),
        ("missing column", {**alpaca, "path": "nocol.jsonl"}, "nocol.jsonl: missing column 'output'"),
        ("missing in a row", {**alpaca, "path": "rowcol.jsonl"}, "rowcol.jsonl:2: column 'output' is missing"),
        (
            "wrong type",
            {**alpaca, "path": "type.jsonl"},
            "type.jsonl:2: column 'output' must be a string, got a number",
        ),
        (
            "wrong type, parquet",
            {"path": "type.parquet"},
            "type.parquet row 1: column 'text' must be a string, got a list",
        ),
        ("empty", {**alpaca, "path": "empty.jsonl"}, "empty.jsonl: the dataset is empty"),
        ("empty csv", {**alpaca, "path": "empty.csv"}, "empty.csv: the dataset is empty"),
        ("empty after filtering", {"path": "long.jsonl", "overlong": "drop"}, "long.jsonl: no usable samples left"),
        ("no target", {"path": "nochat.jsonl", "format": "chat"}, "nochat.jsonl: no usable samples left"),
        ("unknown role", {"path": "role.jsonl", "format": "chat"}, "role.jsonl:2: message 2 has unknown role 'bot'"),
        (
            "template renders nothing",
            {"path": "chat.jsonl", "format": "chat", "chat_template": "{% for m in messages %}{% endfor %}"},
            "chat.jsonl:1: the chat template rendered nothing",
        ),
        ("not found", {**alpaca, "path": "nope.jsonl"}, "nope.jsonl: file not found (data.datasets[0].path)"),
        ("extension", {**alpaca, "path": "data.txt"}, "data.txt: unsupported file type '.txt'"),
        ("bad val file", {**alpaca, "path": "ok.jsonl", "val_path": "type.jsonl"}, "type.jsonl:2: column 'output'"),
    ]


def _bad_recipe(tmp_path: Path, settings: dict) -> Recipe:
    s = dict(settings)
    path = str(tmp_path / s.pop("path"))
    if "val_path" in s:
        s["val_path"] = str(tmp_path / s["val_path"])
    return recipe({"datasets": [{"path": path}], "seq_len": 64, **s})


def test_bad_input_is_one_line_naming_file_and_line(tmp_path, tok, monkeypatch):
    for name, settings, expected in _bad_cases(tmp_path):
        r = _bad_recipe(tmp_path, settings)
        for where, fn in (("check", lambda r=r: check(r)), ("build_data", lambda r=r: build_data(r, tok, 0, 1))):
            try:
                fn()
                raise AssertionError(f"{name} ({where}): no error")
            except UserError as err:
                msg = str(err)
            assert msg.startswith(f"{tmp_path}/{expected}"), f"{name} ({where}): {msg}"
            assert "\n" not in msg
    # check() converts nothing into the datasets cache (build_data above did); streaming leaves a lock file.
    import datasets

    cache = tmp_path / "check-only"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    datasets.Dataset.from_list([{"text": "a"}]).to_csv(tmp_path / "t.csv", index=False)
    for name in ("t.parquet", "t.csv", "ok.jsonl"):
        fmt = "alpaca" if name == "ok.jsonl" else "text"
        check(recipe({"datasets": [{"path": str(tmp_path / name)}], "format": fmt}))
    assert not [f for f in cache.rglob("*") if not f.name.endswith(".lock")]


def test_check_reads_a_bounded_prefix_and_the_ranks_find_the_rest(tmp_path, tok):
    rows = [json.dumps({"text": f"row {i}"}) for i in range(10)]
    rows[7] = '{"text": "row 7"'
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(rows) + "\n")
    r = recipe({"datasets": [{"path": str(path)}]})
    check(r, rows=5)
    with pytest.raises(UserError, match=rf"^{path}:8: malformed JSON"):
        check(r, rows=50)
    with pytest.raises(UserError, match=rf"^{path}:8: malformed JSON"):
        build_data(r, tok, 0, 1)


def test_docs_take_and_concat_round_trip():
    d = Docs.from_docs([(np.array([1, 2]), np.array([-100, 2])), (np.array([3]), np.array([3]))])
    assert len(d) == 2 and d.lengths.tolist() == [2, 1]
    both = Docs.concat([d.take([1]), d.take([0, 0])])
    assert [both.doc(k)[0].tolist() for k in range(3)] == [[3], [1, 2], [1, 2]]


# ------------------------------------------------------------------ hostile data files


GOOD = [{"instruction": "Say hi.", "output": "hi"}] * 2500  # past the rows check() reads


@pytest.mark.parametrize(
    "late,expected",
    [
        (b'{"instruction": "\xff SECRET", "output": "o"}', ":2501: not UTF-8 text (invalid start byte)"),
        (b"[1, 2]", ":2501: expected one JSON object per line, got a list"),
        (
            b'{"instruction": "i", "output": 5}',
            ":2501: column 'output' must be a string, got a number (data.output_column)",
        ),
        (
            b'{"instruction": {"a": 1}, "output": "o"}',
            ":2501: column 'instruction' must be a string, got an object (data.instruction_column)",
        ),
    ],
)
def test_a_late_bad_jsonl_row_is_found_by_qlaunchs_reader_with_its_line(tmp_path, tok, capfd, late, expected):
    # datasets decodes lazily (a UnicodeDecodeError traceback), logs the file's bytes, and its pandas fallback
    # re-types columns (a late number blamed on line 1): every JSON row is read by qlaunch itself.
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in GOOD) + late + b"\n")
    r = recipe({"datasets": [{"path": str(path)}], "format": "alpaca", "seq_len": 128})
    with pytest.raises(UserError) as err:
        prepare(r, tmp_path / "cache")
    assert str(err.value) == f"{path}{expected}"
    assert "SECRET" not in capfd.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_a_huge_token_id_in_a_late_row_is_named_with_its_line(tmp_path, tok):
    path = jsonl(tmp_path / "ids.jsonl", [{"input_ids": [5, 6, 7, 8]}] * 2500 + [{"input_ids": [5, 2**63]}])
    with pytest.raises(UserError, match=rf"^{path}:2501: column 'input_ids' has token id {2**63}, outside"):
        build_data(recipe({"datasets": [{"path": str(path)}], "format": "tokenized"}), tok, 0, 1)


def test_a_record_nested_200000_levels_deep_is_one_line_not_a_crash(tmp_path):
    # pyarrow's JSON reader segfaulted the launcher on this row (no message, the cache lock left behind).
    path = tmp_path / "deep.jsonl"
    deep = b'{"instruction": ' + b"[" * 200_000 + b"]" * 200_000 + b', "output": "o"}\n'
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in GOOD) + deep)
    script = (
        "import sys; from pathlib import Path; from launcher.data.cache import prepare; from launcher.errors import UserError\n"
        "from launcher.plan.recipe_file import validate\n"
        f"r = validate({{'name': 't', 'model': {{'path': {str(TINY_MODEL)!r}}}, 'data': {{'datasets': "
        f"[{{'path': {str(path)!r}}}], 'format': 'alpaca'}}, 'train': {{'max_steps': 1, 'global_batch': 4, 'micro_batch': 1}}}})\n"
        "try:\n    prepare(r, Path(sys.argv[1]))\nexcept UserError as e:\n    print(e); sys.exit(2)\n"
    )
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "cache")], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert out.stdout.strip().startswith(f"{path}:2501: JSON nested too deeply")
    assert not (tmp_path / "cache").exists()


def _ragged_csv(p: Path) -> None:
    p.write_text("instruction,output\n" + "i,o\n" * 50 + "SECRET1,SECRET2,SECRET3\n")


def _latin1_csv(p: Path) -> None:
    p.write_bytes(b"instruction,output\n" + b"i,o\n" * 50 + b"\xff SECRET,o\n")


def _corrupt_parquet(p: Path) -> None:
    p.write_bytes(b"PAR1" + bytes(range(256)) * 20 + b"SECRET")


def _empty_parquet(p: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"instruction": pa.array([], "string"), "output": pa.array([], "string")}), p)


@pytest.mark.parametrize(
    "name,write,expected",
    [
        ("r.csv", _ragged_csv, "line 52 has 3 fields, the header has 2 columns"),
        ("u.csv", _latin1_csv, "not UTF-8 text"),
        ("c.parquet", _corrupt_parquet, "could not read this parquet file"),
        ("e.parquet", _empty_parquet, "the dataset is empty"),
    ],
)
def test_loader_failures_are_one_line_that_echoes_no_bytes(tmp_path, tok, capfd, name, write, expected):
    path = tmp_path / name
    write(path)
    r = recipe({"datasets": [{"path": str(path)}], "format": "alpaca"})
    with pytest.raises(UserError) as err:
        prepare(r, tmp_path / "cache")
    msg = str(err.value)
    assert msg.startswith(f"{path}") and expected in msg, msg
    assert "SECRET" not in msg and "0xff" not in msg and "\n" not in msg
    # datasets logs "Failed to read file ... with error ..." (quoting the file) before it raises.
    assert capfd.readouterr().err == ""


# ------------------------------------------------------------------ the model's vocabulary, the global batch


@pytest.fixture
def zap_tokenizer(tmp_path) -> Path:
    """The tiny tokenizer plus one added token, <|zap|> = id 512: one past the model's 512 embeddings."""
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(TINY_MODEL))
    t.add_tokens(["<|zap|>"])
    out = tmp_path / "zap-tokenizer"
    t.save_pretrained(out)
    assert len(t) == 513 and t.convert_tokens_to_ids("<|zap|>") == 512
    return out


def test_text_that_tokenizes_past_the_models_embeddings_is_refused_with_its_line(tmp_path, zap_tokenizer):
    path = jsonl(
        tmp_path / "z.jsonl", [{"instruction": "Say hi.", "output": "hi"}, {"instruction": "x <|zap|>", "output": "o"}]
    )
    r = recipe({"datasets": [{"path": str(path)}], "format": "alpaca"})
    r = r.model_copy(update={"model": r.model.model_copy(update={"tokenizer": str(zap_tokenizer)})})
    with pytest.raises(UserError) as err:
        prepare(r, tmp_path / "cache")
    assert str(err.value).startswith(
        f"{path}:2: the tokenizer gives token id 512, but the model has embeddings for ids 0..511 only "
        "(config.json vocab_size = 512): the tokenizer has tokens the model has no embedding for"
    )
    with pytest.raises(UserError, match=rf"^{path}:2: the tokenizer gives token id 512"):
        check(r)


def test_a_tokenized_id_the_tokenizer_knows_but_the_model_does_not_is_refused(tmp_path, zap_tokenizer):
    path = jsonl(tmp_path / "ids.jsonl", [{"input_ids": [5, 6, 7, 8]}, {"input_ids": [5, 6, 7, 512, 8, 9]}])
    r = recipe({"datasets": [{"path": str(path)}], "format": "tokenized"})
    r = r.model_copy(update={"model": r.model.model_copy(update={"tokenizer": str(zap_tokenizer)})})
    with pytest.raises(UserError) as err:
        build_data(r, build_tokenizer(r, TINY_MODEL), 0, 1)
    assert str(err.value) == (
        f"{path}:2: column 'input_ids' has token id 512, outside the model's vocabulary 0..511 "
        "(config.json vocab_size = 512) (data.input_ids_column)"
    )


def test_prepare_refuses_fewer_packed_rows_than_the_global_batch(tmp_path):
    path = jsonl(tmp_path / "three.jsonl", [{"instruction": f"Say {w}.", "output": w} for w in ("a", "b", "c")])
    r = recipe({"datasets": [{"path": str(path)}], "format": "alpaca", "packing": False}, global_batch=8)
    with pytest.raises(UserError) as err:
        prepare(r, tmp_path / "cache")
    assert str(err.value) == (
        "data.datasets: the training data packs into 3 rows of data.seq_len = 64 tokens, fewer than "
        "train.global_batch = 8; add data or lower train.global_batch"
    )
    prepare(
        recipe({"datasets": [{"path": str(path)}], "format": "alpaca", "packing": False}, global_batch=2),
        tmp_path / "cache",
    )


# ------------------------------------------------------------------ tokenizer files


def _tokenizer_copy(tmp_path: Path) -> Path:
    out = tmp_path / "tok"
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((TINY_MODEL / name).read_bytes())
    return out


def _fifo(p: Path) -> None:
    p.unlink()
    os.mkfifo(p)


def _directory(p: Path) -> None:
    p.unlink()
    p.mkdir()


def _unknown_class(p: Path) -> None:
    p.write_text(json.dumps({**json.loads(p.read_text()), "tokenizer_class": "NoSuchTokenizerFast"}))


@pytest.mark.parametrize(
    "name,spoil,expected",
    [
        ("tokenizer_config.json", _fifo, "the tokenizer file is a FIFO; it must be a regular file"),
        ("tokenizer_config.json", _directory, "the tokenizer file is a directory; it must be a regular file"),
        ("tokenizer.json", _fifo, "the tokenizer file is a FIFO; it must be a regular file"),
        ("tokenizer_config.json", lambda p: p.write_text("[1]"), "the tokenizer config must be a JSON object"),
        ("tokenizer_config.json", _unknown_class, "tokenizer_class 'NoSuchTokenizerFast' is not a tokenizer class"),
    ],
)
def test_a_broken_tokenizer_file_is_one_line_naming_it(tmp_path, name, spoil, expected):
    # transformers skipped these silently: the run trained without the tokenizer's special tokens.
    tok_dir = _tokenizer_copy(tmp_path)
    spoil(tok_dir / name)
    path = jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi.", "output": "hi"}] * 8)
    r = recipe({"datasets": [{"path": str(path)}], "format": "alpaca"})
    r = r.model_copy(update={"model": r.model.model_copy(update={"tokenizer": str(tok_dir)})})
    with pytest.raises(UserError) as err:
        prepare(r, tmp_path / "cache")
    assert str(err.value).startswith(f"{tok_dir / name}: {expected}"), str(err.value)


def test_the_tokenizers_sequence_length_warning_is_not_printed(tmp_path):
    # transformers warns about model_max_length once per tokenizer: check and prepare each printed it.
    import logging

    tok_dir = _tokenizer_copy(tmp_path)
    cfg = tok_dir / "tokenizer_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "model_max_length": 8}))
    path = jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi. " * 20, "output": "hi"}] * 8)
    r = recipe({"datasets": [{"path": str(path)}], "format": "alpaca", "seq_len": 512}, global_batch=1)
    r = r.model_copy(update={"model": r.model.model_copy(update={"tokenizer": str(tok_dir)})})
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        check(r)
        prepare(r, tmp_path / "cache")
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [m for m in seen if "Token indices" in m]


# ------------------------------------------------------------------ a local dataset reads only its own directory


ROWS8 = [{"text": f"row {i}"} for i in range(8)]


def _saved(tmp_path: Path) -> tuple[Path, Path]:
    import datasets

    d = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS8).save_to_disk(d)
    (arrow,) = d.glob("*.arrow")
    return d, arrow


def _state_names_outside(tmp_path: Path) -> Path:
    d, arrow = _saved(tmp_path)
    (tmp_path / "outside").mkdir()
    arrow.rename(tmp_path / "outside" / arrow.name)
    state = json.loads((d / "state.json").read_text())
    state["_data_files"][0]["filename"] = f"../outside/{arrow.name}"
    (d / "state.json").write_text(json.dumps(state))
    return d


def _arrow_links_outside(tmp_path: Path) -> Path:
    d, arrow = _saved(tmp_path)
    arrow.rename(tmp_path / "elsewhere.arrow")
    arrow.symlink_to(tmp_path / "elsewhere.arrow")
    return d


def _split_outside(tmp_path: Path) -> Path:
    import datasets

    d = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS8)}).save_to_disk(d)
    (d / "train").rename(tmp_path / "train")
    (d / "dataset_dict.json").write_text(json.dumps({"splits": ["../train"]}))
    return d


def _readme_names_outside(tmp_path: Path) -> Path:
    (tmp_path / "secret").mkdir()
    jsonl(tmp_path / "secret" / "a.jsonl", ROWS8)
    d = tmp_path / "repo"
    d.mkdir()
    jsonl(d / "d.jsonl", ROWS8)
    configs = "configs:\n- config_name: default\n  data_files:\n  - split: train\n    path: ../secret/*.jsonl\n"
    (d / "README.md").write_text(f"---\n{configs}---\n")
    return d


def _repo_file_links_outside(tmp_path: Path) -> Path:
    (tmp_path / "secret").mkdir()
    jsonl(tmp_path / "secret" / "a.jsonl", ROWS8)
    d = tmp_path / "repo"
    d.mkdir()
    (d / "d.jsonl").symlink_to(tmp_path / "secret" / "a.jsonl")
    return d


@pytest.mark.parametrize(
    "make,expected",
    [
        (_state_names_outside, "saved/state.json: _data_files names '../outside/data-"),
        (_arrow_links_outside, "saved: file "),
        (_split_outside, "dd/dataset_dict.json: 'splits' must be a non-empty list of folder names"),
        (_readme_names_outside, "repo: data file "),
        (_repo_file_links_outside, "repo: data file "),
    ],
)
def test_a_local_dataset_reads_no_file_outside_its_directory(tmp_path, make, expected):
    d = make(tmp_path)
    r = recipe({"datasets": [{"path": str(d)}]}, global_batch=1)
    for fn in (lambda: check(r), lambda: prepare(r, tmp_path / "cache")):
        with pytest.raises(UserError) as err:
            fn()
        assert str(err.value).startswith(f"{tmp_path}/{expected}"), str(err.value)
        assert "outside" in str(err.value) or "folder names" in str(err.value)
    assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------------ a chat template that never ends

BOMB = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"


@pytest.mark.parametrize("where", ["recipe", "tokenizer"])
def test_a_chat_template_loop_bomb_ends_with_one_line_naming_the_template(tmp_path, monkeypatch, where):
    import signal

    monkeypatch.setattr("launcher.data.render.RENDER_LIMIT_S", 1.0)
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = jsonl(tmp_path / "c.jsonl", [chat] * 4)
    settings = {"datasets": [{"path": str(path)}], "format": "chat"}
    if where == "recipe":
        r = recipe({**settings, "chat_template": BOMB})
        which = "data.chat_template"
    else:
        tok_dir = _tokenizer_copy(tmp_path)
        cfg = tok_dir / "tokenizer_config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "chat_template": BOMB}))
        r = recipe(settings)
        r = r.model_copy(update={"model": r.model.model_copy(update={"tokenizer": str(tok_dir)})})
        which = "the tokenizer's chat_template"
    before = signal.getsignal(signal.SIGALRM)
    t0 = time.monotonic()
    with pytest.raises(UserError) as err:
        check(r)
    assert time.monotonic() - t0 < 30
    assert str(err.value) == (
        f"{path}:1: the chat template ({which}) did not finish rendering one conversation within 1 s "
        "(a template renders in milliseconds; does it loop?)"
    )
    assert signal.getsignal(signal.SIGALRM) is before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


@pytest.mark.parametrize("bad,what", [(1.5, "a fractional number"), (True, "a boolean"), ("7", "a string")])
def test_a_token_id_that_is_not_an_integer_is_named(tmp_path, tok, bad, what):
    path = jsonl(tmp_path / "ids.jsonl", [{"input_ids": [5, 6, 7]}, {"input_ids": [5, bad, 7]}])
    with pytest.raises(UserError) as err:
        build_data(recipe({"datasets": [{"path": str(path)}], "format": "tokenized"}), tok, 0, 1)
    assert str(err.value) == (
        f"{path}:2: column 'input_ids' must be a list of integer token ids; element 2 is {what} (data.input_ids_column)"
    )
