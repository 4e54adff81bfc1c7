"""Rows to token ids: rendering every row, dropping what cannot train, the validation carve-out, the dataset
mixture, and the payload (packed rows plus statistics) that the cache stores under the data fingerprint."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from launcher.errors import UserError

if TYPE_CHECKING:  # annotations only: packing and sampling import without pydantic (GPU hosts, tools)
    from launcher.plan.recipe import DataConfig, Recipe
from launcher.data.json_rows import json_source_rows, read_json_rows
from launcher.data.pack import Docs, Packed, pack
from launcher.data.read import RowWhere, dataset_rows, load_source, recipe_sources, source_identity
from launcher.data.render import Renderer, RenderStats, RowAt, finish_pair, finish_sample
from launcher.data.source import CHUNK_ROWS, Source
from launcher.data.tokenizer import model_vocab_size, tokenizer_fingerprint

# Bump when rendering, tokenization or the cached layout changes, so old caches stop matching.
# 3: preference pairs (one document per pair, position ids restarting at its split).
CACHE_VERSION = 3

# Rows per source that `check` reads in the launching process (enough to catch a systematic mistake).
CHECK_ROWS = 2000

# The validation carve uses its own fixed seed so the validation set does not change with train.seed.
VAL_SEED = 1_234_567


def fingerprint(recipe: Recipe, tokenizer) -> str:
    """Cache key of the tokenized data: data files, tokenizer, every data setting that matters, seed."""
    train, val = recipe_sources(recipe.data)
    settings = recipe.data.model_dump(mode="json")
    payload = {
        "version": CACHE_VERSION,
        "settings": settings,
        "seed": recipe.train.seed,
        "sources": [source_identity(s) for s in train] + ([source_identity(val)] if val else []),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        # A cache built for a model with more embeddings must not let a smaller model skip the id check.
        "model_vocab": model_vocab_size(recipe),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def encode_rows(
    renderer: Renderer, rows: Iterable[tuple[int, dict]], where: Callable[[int], str], lenient: bool, stats: RenderStats
) -> Docs:
    """Validate, render, tokenize and filter rows (index, dict) into documents (a preference pair is one
    document, split where its rejected half starts)."""
    docs = []
    splits: list[int] = []
    chunk: list[tuple[int, dict]] = []

    def flush() -> None:
        rendered = [renderer.render(row, RowAt(where, i), lenient) for i, row in chunk]
        if renderer.cfg.format == "preference":
            for (i, _), pair in zip(chunk, renderer.tokenize_pairs(rendered), strict=True):
                renderer.check_ids(pair.prompt + pair.chosen + pair.rejected, RowAt(where, i))
                doc = finish_pair(pair, renderer.cfg, RowAt(where, i), stats)
                if doc is not None:
                    docs.append(doc[:2])
                    splits.append(doc[2])
        else:
            for (i, _), (ids, labels) in zip(chunk, renderer.tokenize(rendered), strict=True):
                renderer.check_ids(ids, RowAt(where, i))
                doc = finish_sample(ids, labels, renderer.cfg, RowAt(where, i), stats)
                if doc is not None:
                    docs.append(doc)
                    splits.append(0)
        chunk.clear()

    for item in rows:
        chunk.append(item)
        if len(chunk) >= CHUNK_ROWS:
            flush()
    if chunk:
        flush()
    return Docs.from_docs(docs, splits)


def no_samples_error(src: Source, cfg: DataConfig, stats: RenderStats) -> UserError:
    why = []
    if stats.overlong_dropped:
        why.append(
            f"{stats.overlong_dropped} longer than data.seq_len = {cfg.seq_len} dropped (data.overlong = 'drop')"
        )
    if stats.no_target:
        why.append(
            f"{stats.no_target} with no token to train on (e.g. a response cut off by truncation, "
            "a conversation without an assistant message, or a pair with a completion cut away)"
        )
    return UserError(f"{src.path}: no usable samples left of {stats.rows} rows: {'; '.join(why)}")


def tokenize_source(src: Source, renderer: Renderer) -> tuple[Docs, RenderStats]:
    """All documents of one source; raises UserError for any bad row, naming its file and line/row."""
    stats = RenderStats()
    if src.kind == "json":
        lines: list[int] = []
        first = read_json_rows(Path(src.path), CHECK_ROWS)[0]
        if not first:
            raise UserError(f"{src.path}: the dataset is empty (no records)")
        renderer.check_columns(sorted({c for r in first for c in r if r.get(c) is not None} | set(first[0])), src)
        rows = json_source_rows(Path(src.path), lines)
        docs = encode_rows(renderer, rows, RowWhere(src, lines), False, stats)
    else:
        ds = load_source(src)
        renderer.check_columns(ds.column_names, src)
        docs = encode_rows(renderer, dataset_rows(ds, src), RowWhere(src), src.kind == "csv", stats)
    if not len(docs):
        raise no_samples_error(src, renderer.cfg, stats)
    return docs, stats


def carve(docs: Docs, fraction: float, index: int, src: Source) -> tuple[Docs, Docs]:
    """(train, val): a fixed-seed `fraction` of a source's documents becomes validation data."""
    n = len(docs)
    n_val = max(1, round(fraction * n))
    if n - n_val < 1:
        raise UserError(
            f"{src.path}: {n} usable samples are too few to carve off data.val_fraction = {fraction} for validation"
        )
    perm = np.random.default_rng([VAL_SEED, index]).permutation(n)
    return docs.take(np.sort(perm[n_val:])), docs.take(np.sort(perm[:n_val]))


def mixture(sizes: list[int], weights: list[float], seed: int) -> list[np.ndarray]:
    """Document indices each source contributes to one epoch: weight 2 = every document twice, 0.5 = a
    seeded half (at least one). A pure function of sizes, weights and seed: the same at any world size."""
    out = []
    for i, (n, w) in enumerate(zip(sizes, weights, strict=True)):
        whole = int(math.floor(w))
        extra = round((w - whole) * n)
        if whole == 0 and extra == 0:
            extra = 1
        rng = np.random.default_rng([seed, i, 1])
        parts = [np.arange(n)] * whole + [np.sort(rng.permutation(n)[:extra])]
        out.append(np.concatenate(parts))
    return out


def _pad_id(tokenizer) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if t is not None:
            return int(t)
    return 0


def _describe(name: str, docs: Docs, packed: Packed) -> dict:
    real = int(docs.lengths.sum())
    return {
        f"{name}_documents": len(docs),
        f"{name}_rows": len(packed),
        f"{name}_tokens": real,
        f"{name}_fill": real / max(1, packed.input_ids.numel()),
    }


def build_payload(recipe: Recipe, tokenizer) -> dict:
    """Everything build_data returns, computed from scratch (what the cache stores)."""
    cfg = recipe.data
    t0 = time.time()
    vocab = model_vocab_size(recipe)
    renderer = Renderer(cfg, tokenizer, vocab)
    train_srcs, val_src = recipe_sources(cfg)
    per = []
    stats = RenderStats()
    for src in train_srcs:
        docs, s = tokenize_source(src, renderer)
        per.append(docs)
        for k in ("rows", "truncated", "overlong_dropped", "no_target"):
            setattr(stats, k, getattr(stats, k) + getattr(s, k))
    val_docs = None
    if val_src is not None:
        val_docs, _ = tokenize_source(val_src, renderer)
    elif cfg.val_fraction > 0:
        pairs = [carve(d, cfg.val_fraction, i, s) for i, (d, s) in enumerate(zip(per, train_srcs, strict=True))]
        per = [t for t, _ in pairs]
        val_docs = Docs.concat([v for _, v in pairs])
    picks = mixture([len(d) for d in per], [d.weight for d in cfg.datasets], recipe.train.seed)
    mixed = Docs.concat([d.take(ix) for d, ix in zip(per, picks, strict=True)])
    # Shuffle before packing so equal-length documents of different sources share rows.
    mixed = mixed.take(np.random.default_rng([recipe.train.seed, 2]).permutation(len(mixed)))
    pad = _pad_id(tokenizer)
    if vocab is not None and pad >= vocab:
        raise UserError(
            f"{recipe.model.tokenizer or recipe.model.path}: the tokenizer's padding id {pad} (its pad or EOS "
            f"token) has no embedding in the model (config.json vocab_size = {vocab}); use the model's own tokenizer"
        )
    train = pack(mixed, cfg.seq_len, pad, cfg.packing)
    out_stats = {
        "rows_read": stats.rows,
        "truncated": stats.truncated,
        "overlong_dropped": stats.overlong_dropped,
        "no_target_dropped": stats.no_target,
        **_describe("train", mixed, train),
    }
    val = None
    if val_docs is not None:
        val = pack(val_docs, cfg.seq_len, pad, cfg.packing)
        out_stats.update(_describe("val", val_docs, val))
    out_stats["seconds"] = time.time() - t0

    def tensors(p: Packed | None) -> dict | None:
        return None if p is None else {"input_ids": p.input_ids, "labels": p.labels, "position_ids": p.position_ids}

    return {"version": CACHE_VERSION, "train": tensors(train), "val": tensors(val), "stats": out_stats}
