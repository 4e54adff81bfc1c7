"""Data: load records, render them, tokenize, pack into seq_len, and sample global batches deterministically.

Interface used by the worker (keep it stable):
  build_tokenizer(recipe, model_dir) -> tokenizer
  build_data(recipe, tokenizer, rank, world, cache_dir) -> (train: Packed, val: Packed | None)
  StepSampler(n, global_batch, micro_batch, world, rank, seed).micro_batches(step) -> list[list[int]]
  Packed.collate(indices) -> {"input_ids", "labels", "position_ids"} LongTensors [B, seq_len]
and by preflight, in the launching process before anything is written:
  check(recipe) -> None

The flow, per dataset: source (file, saved dataset, hub name) -> rows -> each row validated and rendered
into text segments marked trainable or not -> token ids + labels per document -> over-long policy ->
validation carve -> weighted mixture -> documents packed into rows of seq_len. The result is a pure
function of (data files, tokenizer, data settings, seed), so one process per cache directory computes it,
stores it under a fingerprint of those inputs, and every other rank memory-maps the same file.

No attention across packed documents: rows carry no attention mask; their position_ids restart at 0 for
each document, and transformers (checked on 5.17 and 5.24, sdpa and eager; flash-attention uses the same
position_ids for its varlen path) derives a block-diagonal causal mask from them whenever attention_mask
is None (masking_utils.find_packed_sequence_indices). tests/test_data.py proves it: the loss of a packed
batch equals the loss of the same documents one by one. The first token of every document carries no
label, because in a packed row it would otherwise be predicted from the previous document's last token.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import re
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from launcher.errors import UserError
from launcher.sources import open_regular, read_regular, shown

if TYPE_CHECKING:  # annotations only: packing and sampling import without pydantic (GPU hosts, tools)
    from launcher.recipe import DataConfig, Recipe

IGNORE = -100
# Bump when rendering, tokenization or the cached layout changes, so old caches stop matching.
CACHE_VERSION = 2
# Rows per source that `check` reads in the launching process (enough to catch a systematic mistake).
CHECK_ROWS = 2000
# Wall-clock limit of one chat-template rendering: real templates take milliseconds; a Jinja loop bomb
# (range(100000) nested twice) would otherwise render for hours before a rank is even spawned.
RENDER_LIMIT_S = 5.0
# Rows rendered and tokenized per batched tokenizer call.
CHUNK_ROWS = 1024
# Waiting ranks give up after this long, or after the builder's lock file stopped being refreshed for
# STALE_LOCK_S (the builder touches it every STALE_LOCK_S / 4 while it works).
WAIT_TIMEOUT_S = 4 * 3600.0
STALE_LOCK_S = 300.0
# The validation carve uses its own fixed seed so the validation set does not change with train.seed.
VAL_SEED = 1_234_567
# A JSON array data file is parsed whole; bigger data belongs in JSON lines, which are streamed.
_MAX_JSON_ARRAY_BYTES = 2_000_000_000

FILE_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
ROLES = ("system", "user", "assistant", "tool")

# The Stanford-Alpaca style prompt; the response follows it and then the EOS token.
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"

# Used for `chat` when neither data.chat_template nor the tokenizer has a template: ChatML-style turn
# headers, each turn closed by the tokenizer's EOS token so a fine-tuned model learns to stop.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


# ------------------------------------------------------------------ packed samples


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


# ------------------------------------------------------------------ tokenizer


# The files transformers reads from a tokenizer directory. It skips one it cannot read, or a tokenizer_config.json
# that is a directory, and loads a tokenizer without its special tokens: a run that trains on the wrong ids.
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "tokenizer.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
)


def check_tokenizer_dir(directory: Path, trust_remote_code: bool) -> None:
    """Every tokenizer file present is a regular file; tokenizer_config.json is a JSON object whose
    tokenizer_class, if it names one, is a class transformers has (or the directory's own remote code)."""
    from launcher.sources import read_json_object

    for name in TOKENIZER_FILES:
        if os.path.lexists(directory / name):
            os.close(open_regular(directory / name, "tokenizer file"))
    config_path = directory / "tokenizer_config.json"
    if not os.path.lexists(config_path):
        return
    config = read_json_object(config_path, "tokenizer config")
    cls = config.get("tokenizer_class")
    if cls is None or (trust_remote_code and config.get("auto_map")):
        return
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    if not isinstance(cls, str) or tokenizer_class_from_name(cls) is None:
        what = shown(cls) if isinstance(cls, str) else _kind(cls)
        raise UserError(
            f"{config_path}: tokenizer_class {what} is not a tokenizer class transformers knows "
            "(e.g. PreTrainedTokenizerFast, LlamaTokenizer)"
        )


def build_tokenizer(recipe: Recipe, model_dir: Path):
    from transformers import AutoTokenizer

    path = recipe.model.tokenizer or str(model_dir)
    local = Path(path).expanduser()
    if not local.is_absolute() and not _HUB_ID.fullmatch(path):
        # Local tokenizer paths are absolute by now (see loading.resolve_model_dir): never the current directory.
        raise UserError(f"model.tokenizer = {path!r}: no such directory (and not a hub id of the form org/name)")
    if local.is_absolute() and local.is_dir():
        check_tokenizer_dir(local, recipe.model.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=recipe.model.trust_remote_code)
    # Its "Token indices sequence length is longer than ..." warning (once per tokenizer: twice per launch)
    # is about model_max_length; qlaunch applies data.overlong against data.seq_len and says so itself.
    getattr(tokenizer, "deprecation_warnings", {})["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything about a tokenizer that changes the token ids this module produces."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    meta = [
        type(tokenizer).__name__,
        getattr(tokenizer, "chat_template", None),
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        len(tokenizer),
    ]
    h.update(json.dumps(meta, default=str).encode())
    return h.hexdigest()


def _leading_special_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text by itself (e.g. Llama's BOS); [] for most others."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for j in range(len(full) - len(plain) + 1):
        if full[j : j + len(plain)] == plain:
            return list(full[:j])
    return []


# ------------------------------------------------------------------ sources


@dataclass(frozen=True)
class Source:
    """One dataset as the recipe names it, classified without reading it."""

    path: str
    kind: str  # json | parquet | csv | arrow | saved | repo | hub
    split: str
    key: str  # the recipe key that named it, for messages


def classify(path: str, split: str, key: str) -> Source:
    """File / saved dataset / directory of data files / hub name; raises for missing or unsupported files."""
    p = Path(path).expanduser()
    if not p.is_absolute() and _HUB_ID.fullmatch(path) and p.suffix.lower() not in FILE_KINDS:
        # A recipe's local paths are absolute by now (recipe.resolve_paths); a relative org/name is a hub id,
        # and a folder of that name in the current directory must not stand in for it.
        return Source(path, "hub", split, key)
    try:
        mode = p.stat().st_mode  # follows symlinks: a link to a data file is that file
    except (FileNotFoundError, NotADirectoryError):
        mode = None
    except OSError as err:
        raise UserError(f"{path}: cannot access ({err.strerror or type(err).__name__}) ({key})") from None
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        # Reading a FIFO would wait for a writer forever; a device or socket is no dataset either.
        raise UserError(f"{path}: not a regular file (a FIFO, socket or device) ({key}); give a data file or directory")
    if mode is not None and stat.S_ISREG(mode):
        kind = FILE_KINDS.get(p.suffix.lower())
        if kind is None:
            raise UserError(
                f"{path}: unsupported file type '{p.suffix or '(no extension)'}' ({key}); use .jsonl, .json, "
                ".parquet, .csv, .arrow, a directory written by Dataset.save_to_disk, or a hub dataset name"
            )
        return Source(str(p), kind, split, key)
    if mode is not None:
        saved = (p / "dataset_dict.json").is_file() or (p / "state.json").is_file()
        # A plain directory of data files is loaded exactly like a hub dataset repository.
        return Source(str(p), "saved" if saved else "repo", split, key)
    raise UserError(f"{path}: file not found ({key})")


def _sources(cfg: DataConfig) -> tuple[list[Source], Source | None]:
    train = [classify(d.path, d.split, f"data.datasets[{i}].path") for i, d in enumerate(cfg.datasets)]
    val = classify(cfg.val_path, cfg.val_split, "data.val_path") if cfg.val_path else None
    return train, val


def _identity(src: Source) -> list:
    """What makes a source's content change: path + size + mtime of its files (name + split for the hub)."""
    if src.kind == "hub":
        return [src.kind, src.path, src.split]
    p = Path(src.path).resolve()
    if p.is_file():
        st = p.stat()
        return [src.kind, str(p), src.split, st.st_size, st.st_mtime_ns]
    files = []
    for f in sorted(p.rglob("*")):
        if f.is_file() and ".cache" not in f.relative_to(p).parts:
            st = f.stat()
            files.append([str(f.relative_to(p)), st.st_size, st.st_mtime_ns])
    return [src.kind, str(p), src.split, files]


def fingerprint(recipe: Recipe, tokenizer) -> str:
    """Cache key of the tokenized data: data files, tokenizer, every data setting that matters, seed."""
    train, val = _sources(recipe.data)
    settings = recipe.data.model_dump(mode="json")
    payload = {
        "version": CACHE_VERSION,
        "settings": settings,
        "seed": recipe.train.seed,
        "sources": [_identity(s) for s in train] + ([_identity(val)] if val else []),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        # A cache built for a model with more embeddings must not let a smaller model skip the id check.
        "model_vocab": model_vocab_size(recipe),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


# ------------------------------------------------------------------ reading rows


def _datasets():
    import datasets

    datasets.disable_progress_bars()
    # Its loaders log "Failed to read file ... with error ..." (echoing the file's bytes) before raising; the
    # exception is turned into qlaunch's one line (_load_error), so the log line is only noise on stderr.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    return datasets


class _Where:
    """Row index (0-based) of a source -> 'file:LINE' for JSON lines, 'file record N' for a JSON array,
    'file row N' otherwise. `lines`: the line of each JSON-lines record, as qlaunch's reader found them."""

    def __init__(self, src: Source, lines: list[int] | None = None):
        self.src = src
        self._lines = lines

    def __call__(self, i: int) -> str:
        if self.src.kind == "json":
            if self._lines and i < len(self._lines):
                return f"{self.src.path}:{self._lines[i]}"
            return f"{self.src.path} record {i + 1}"
        if self.src.kind == "hub":
            return f"{self.src.path} (split {self.src.split!r}) row {i + 1}"
        return f"{self.src.path} row {i + 1}"


def _is_json_array(path: Path) -> bool:
    with open(path, "rb") as f:
        while chunk := f.read(4096):
            s = chunk.lstrip()
            if s:
                return s[:1] == b"["
    return False


def _json_msg(err: json.JSONDecodeError) -> str:
    return f"{err.msg.removesuffix(' at')} at column {err.colno}"


# json.loads recurses once per nesting level; a record nested past Python's recursion limit cannot be parsed.
_JSON_TOO_DEEP = "JSON nested too deeply (arrays or objects about 1000 levels deep); a record needs a few levels"


def _json_records(path: Path) -> Iterator[tuple[int | None, dict]]:
    """Every record of a JSON / JSON-lines file, parsed by qlaunch itself one at a time: (line, record).

    The line is None for a JSON array file (one document: it is parsed whole). Any syntax error, non-object,
    non-UTF-8 text or nesting too deep to parse is one line naming the file and line. This is the only reader
    of JSON data: pyarrow's JSON reader crashes the process on a record nested a few hundred thousand levels
    deep, and its pandas fallback re-types columns and loses the line of a late bad row.
    """
    if _is_json_array(path):
        try:
            data = json.loads(read_regular(path, "JSON data file", limit=_MAX_JSON_ARRAY_BYTES).decode("utf-8"))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{err.lineno}: malformed JSON ({_json_msg(err)})") from None
        except RecursionError:
            raise UserError(f"{path}: {_JSON_TOO_DEEP}") from None
        except UnicodeDecodeError as err:
            raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        for k, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise UserError(f"{path} record {k + 1}: expected a JSON object, got {_kind(rec)}")
        yield from ((None, rec) for rec in data)
        return
    fd = open_regular(path, "JSON-lines data file")
    with open(fd, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.rstrip(b"\r\n"))
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{n}: malformed JSON ({_json_msg(err)})") from None
            except RecursionError:
                raise UserError(f"{path}:{n}: {_JSON_TOO_DEEP}") from None
            except UnicodeDecodeError as err:
                raise UserError(f"{path}:{n}: not UTF-8 text ({err.reason})") from None
            if not isinstance(rec, dict):
                raise UserError(f"{path}:{n}: expected one JSON object per line, got {_kind(rec)}")
            yield n, rec


def _json_rows(path: Path, limit: int | None = None) -> tuple[list[dict], list[int], bool]:
    """Up to `limit` records of a JSON / JSON-lines file: (rows, line numbers, complete = read to its end)."""
    rows: list[dict] = []
    lines: list[int] = []
    for n, rec in _json_records(path):
        if limit is not None and len(rows) >= limit:
            return rows, lines, False
        rows.append(rec)
        if n is not None:
            lines.append(n)
    return rows, lines, True


def _json_source_rows(path: Path, lines: list[int]) -> Iterator[tuple[int, dict]]:
    """(row index, record) of a JSON data file, streamed; appends each record's line to `lines` (for _Where)."""
    for i, (n, rec) in enumerate(_json_records(path)):
        if n is not None:
            lines.append(n)
        yield i, rec


def _csv_is_empty(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        return sum(1 for line in f if line.strip()) <= 1  # nothing, or a header only


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


_CSV_COLUMNS = re.compile(r"Expected (\d+) columns?, got (\d+)")  # pyarrow
_CSV_FIELDS = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")  # pandas
_ROW = re.compile(r"\b(?:row|line) (\d+)\b", re.IGNORECASE)


def _cause(err: BaseException, verbatim: bool = False) -> str:
    """What a datasets/pyarrow/pandas failure says, without the bytes of the file its message may quote.

    Invalid UTF-8 is "not UTF-8 text" (their messages quote the byte); a ragged CSV row is its column
    counts (pyarrow quotes the row); anything else is the exception's type and its message up to the first
    colon or quote, where these libraries start quoting data (`verbatim`: the whole message, for the hub,
    whose messages are about names and the network, not a local file's bytes).
    """
    chain = list(_chain(err))
    if any(isinstance(e, UnicodeDecodeError) or "decode byte" in str(e) or "UTF-8" in str(e) for e in chain):
        return "not UTF-8 text"
    cause = chain[1] if len(chain) > 1 and err.__cause__ is not None else chain[0]
    text = " ".join(str(cause).split())
    if m := _CSV_FIELDS.search(text):
        return f"line {m.group(2)} has {m.group(3)} fields, the header has {m.group(1)} columns"
    if m := _CSV_COLUMNS.search(text):
        return f"a row has {m.group(2)} fields, the header has {m.group(1)} columns"
    head = text[:300] if verbatim else re.split(r"[:'\"`]", text, maxsplit=1)[0].strip()[:200]
    return f"{type(cause).__name__}" + (f": {head}" if head else "")


def _parquet_rows(path: Path) -> int | None:
    """The row count a parquet file's footer states; None if it has no readable footer."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # noqa: BLE001 - a corrupt file: the loader's error says so
        return None


def _load_error(src: Source, err: Exception) -> UserError:
    """Turn a datasets/pyarrow loading failure into one line that says where and what."""
    p = Path(src.path)
    if src.kind == "csv" and _csv_is_empty(p):
        return UserError(f"{src.path}: the dataset is empty (no rows)")
    if src.kind == "parquet" and _parquet_rows(p) == 0:
        return UserError(f"{src.path}: the dataset is empty (no rows)")
    what = _cause(err, verbatim=src.kind == "hub")
    if src.kind == "hub":
        return UserError(
            f"{src.path}: could not load hub dataset split {src.split!r} ({src.key}; no local file of that "
            f"name either): {what}"
        )
    if src.kind in ("saved", "repo"):
        return UserError(f"{src.path}: could not load split {src.split!r} ({src.key}): {what}")
    return UserError(f"{src.path}: could not read this {src.kind} file ({src.key}): {what}")


def _pick_split(ds, src: Source):
    if isinstance(ds, dict):  # a DatasetDict (saved with several splits)
        if src.split not in ds:
            raise UserError(
                f"{src.path}: no split {src.split!r} ({src.key}); it has: {', '.join(sorted(ds))} "
                "(set the split in the recipe)"
            )
        return ds[src.split]
    return ds


def _open_arrow(src: Source, ds_lib):
    """An Arrow file or a saved dataset, memory-mapped where it lies (nothing converted or copied)."""
    if src.kind == "arrow":
        return ds_lib.Dataset.from_file(src.path)
    return _pick_split(ds_lib.load_from_disk(src.path), src)


# ------------------------------------------------------------------ a local dataset reads only its own files


def _plain_name(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def _inside(root: Path, path: Path, src: Source, what: str) -> None:
    """PATH, with every symlink followed, is ROOT or below it; else one line naming the escaping file."""
    real = Path(os.path.realpath(path))
    if real != root and root not in real.parents:
        raise UserError(
            f"{src.path}: {what} {shown(str(path))} lies outside the dataset directory ({src.key}); a local "
            "dataset may only read files inside its own directory"
        )


def _saved_files(src: Source) -> list[Path]:
    """The files load_from_disk reads, checked: split folders named by dataset_dict.json and data files named
    by each state.json's _data_files are plain names, inside the directory, regular files."""
    from launcher.sources import read_json_object

    d = Path(src.path)
    root = Path(os.path.realpath(d))
    folders = [d]
    if os.path.lexists(d / "dataset_dict.json"):
        splits = read_json_object(d / "dataset_dict.json", "saved dataset's split list").get("splits")
        if not isinstance(splits, list) or not splits or not all(_plain_name(x) for x in splits):
            raise UserError(
                f"{d / 'dataset_dict.json'}: 'splits' must be a non-empty list of folder names inside {d} ({src.key})"
            )
        folders = [d / x for x in splits]
    files = []
    for folder in folders:
        _inside(root, folder, src, "split folder")
        state_path = folder / "state.json"
        state = read_json_object(state_path, "saved dataset state")
        entries = state.get("_data_files")
        if not isinstance(entries, list) or not entries:
            raise UserError(f"{state_path}: '_data_files' must be a non-empty list of the split's Arrow files")
        for entry in entries:
            name = entry.get("filename") if isinstance(entry, dict) else None
            if not _plain_name(name):
                what = shown(name) if isinstance(name, str) else _kind(name)
                raise UserError(
                    f"{state_path}: _data_files names {what}; a saved dataset's files are plain file names "
                    f"inside its folder ({src.key})"
                )
            files.append(folder / name)
        for extra in ("state.json", "dataset_info.json"):
            if os.path.lexists(folder / extra):
                files.append(folder / extra)
    for f in files:
        _inside(root, f, src, "file")
        os.close(open_regular(f, "saved dataset file"))
    return files


def _repo_files(src: Source, ds_lib) -> list[Path]:
    """The data files datasets would load from a directory of data files (its README.md `configs` may name
    any path), checked: inside the directory, regular files, and JSON ones read through qlaunch's reader."""
    try:
        config = ds_lib.load_dataset_builder(src.path).config
    except Exception as err:  # noqa: BLE001
        raise _load_error(src, err) from None
    data_files = getattr(config, "data_files", None) or {}
    root = Path(os.path.realpath(src.path))
    files = [Path(str(f).removeprefix("file://")) for split in data_files.values() for f in split]
    for f in files:
        _inside(root, f, src, "data file")
        os.close(open_regular(f, "data file"))
    for f in files:
        if f.suffix.lower() in (".json", ".jsonl"):
            for _ in _json_records(f):  # pyarrow's JSON reader must not see a file qlaunch has not read
                pass
    return files


def _check_local(src: Source, ds_lib) -> None:
    if src.kind == "saved":
        _saved_files(src)
    elif src.kind == "repo":
        _repo_files(src, ds_lib)


def load_source(src: Source):
    """The whole source as a datasets.Dataset (memory-mapped Arrow)."""
    ds_lib = _datasets()
    _check_local(src, ds_lib)
    try:
        if src.kind in ("arrow", "saved"):
            ds = _open_arrow(src, ds_lib)
        elif src.kind in ("repo", "hub"):
            ds = ds_lib.load_dataset(src.path, split=src.split)
        else:
            ds = ds_lib.load_dataset(src.kind, data_files=src.path, split="train")
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - every loader failure is about the user's data
        raise _load_error(src, err) from None
    if len(ds) == 0:
        raise UserError(f"{src.path}: the dataset is empty (no rows)")
    return ds


def _dataset_rows(ds, src: Source) -> Iterator[tuple[int, dict]]:
    """(row index, row) of a loaded dataset. Its values are decoded lazily, batch by batch: a failure there
    (bytes that are not UTF-8, a corrupt page) is one line naming the source and the rows it was reading."""
    i = 0
    batches = ds.iter(batch_size=CHUNK_ROWS)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as err:  # noqa: BLE001 - a value the loader cannot decode is the user's data
            rows = f"rows {i + 1}-{i + CHUNK_ROWS}" if src.kind != "hub" else f"(split {src.split!r}) rows {i + 1}-"
            raise UserError(f"{src.path} {rows}: could not read the data ({src.key}): {_cause(err)}") from None
        cols = list(batch)
        n = len(batch[cols[0]]) if cols else 0
        for j in range(n):
            yield i, {c: batch[c][j] for c in cols}
            i += 1


def _peek(src: Source, limit: int) -> tuple[list[dict], _Where, bool] | None:
    """Up to `limit` rows for `check`, writing nothing (no datasets cache). None: cannot peek (hub)."""
    if src.kind == "hub":
        return None
    if src.kind == "json":
        rows, lines, complete = _json_rows(Path(src.path), limit)
        return rows, _Where(src, lines), complete
    ds_lib = _datasets()
    _check_local(src, ds_lib)
    try:
        if src.kind in ("arrow", "saved"):
            ds = _open_arrow(src, ds_lib)
        else:
            # Streaming reads through the same builders (and the same type inference) as training does,
            # without converting the whole file into the datasets cache.
            if src.kind == "repo":
                stream = ds_lib.load_dataset(src.path, split=src.split, streaming=True)
            else:
                stream = ds_lib.load_dataset(src.kind, data_files=src.path, split="train", streaming=True)
            rows = []
            for row in stream:
                if len(rows) >= limit:
                    return rows, _Where(src), False
                rows.append(row)
            return rows, _Where(src), True
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001
        raise _load_error(src, err) from None
    rows = ds.select(range(min(limit, len(ds)))).to_list()
    return rows, _Where(src), len(ds) <= limit


# ------------------------------------------------------------------ validation and rendering


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, (list, tuple)):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


@dataclass
class _Stats:
    rows: int = 0
    truncated: int = 0
    overlong_dropped: int = 0
    no_target: int = 0


Segments = list[tuple[str, bool]]  # (text, trainable)


class _RenderTimeout(Exception):
    pass


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise _RenderTimeout inside the body after `seconds` of wall-clock time (SIGALRM: main thread only;
    elsewhere, e.g. a test's worker thread, no limit). The previous handler and timer are restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise _RenderTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    finally:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:  # even if the alarm fired just now, the previous handler comes back
            signal.signal(signal.SIGALRM, previous)
        if outer:  # someone else's timer was running: give it back what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 1e-3))


class Renderer:
    """Validates one row of the configured format and renders it into trainable / prompt segments."""

    def __init__(self, cfg: DataConfig, tokenizer, model_vocab: int | None = None):
        self.cfg = cfg
        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id
        self.bos = _leading_special_ids(tokenizer) if cfg.format in ("text", "alpaca") else []
        self.vocab = len(tokenizer)
        # Rows of the model's embedding: an id at or past it is an IndexError on every rank, whatever the
        # tokenizer's length (a tokenizer with added tokens the model was never resized for).
        self.model_vocab = model_vocab
        self.template = cfg.chat_template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE

    def required_columns(self) -> list[tuple[str, str]]:
        c = self.cfg
        return {
            "text": [(c.text_column, "data.text_column")],
            "alpaca": [(c.instruction_column, "data.instruction_column"), (c.output_column, "data.output_column")],
            "chat": [(c.messages_column, "data.messages_column")],
            "tokenized": [(c.input_ids_column, "data.input_ids_column")],
        }[c.format]

    def check_columns(self, columns: Iterable[str], src: Source) -> None:
        have = list(columns)
        for col, key in self.required_columns():
            if col not in have:
                raise UserError(
                    f"{src.path}: missing column '{col}' ({key}); its columns are: {', '.join(have) or '(none)'}"
                )

    # -- field validation

    def _string(self, row: dict, col: str, key: str, where: object, lenient: bool, required: bool = True) -> str | None:
        v = row.get(col)
        if lenient and isinstance(v, float) and math.isnan(v):
            v = None  # an empty CSV cell
        if v is None:
            if required:
                raise UserError(f"{where}: column '{col}' is missing or null ({key})")
            return None
        if isinstance(v, str):
            return v
        if lenient and isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)  # CSV has no types: a cell "47" is text that pandas read as a number
        raise UserError(f"{where}: column '{col}' must be a string, got {_kind(v)} ({key})")

    def _int_list(self, v: Any, col: str, key: str, where: object, allow_ignore: bool) -> list[int]:
        if v is None:
            raise UserError(f"{where}: column '{col}' is missing or null ({key})")
        if isinstance(v, np.ndarray):
            v = v.tolist()
        if not isinstance(v, (list, tuple)):
            raise UserError(f"{where}: column '{col}' must be a list of integer token ids, got {_kind(v)} ({key})")
        for k, x in enumerate(v, 1):
            if not isinstance(x, int) or isinstance(x, bool):
                what = (
                    "a boolean" if isinstance(x, bool) else "a fractional number" if isinstance(x, float) else _kind(x)
                )
                raise UserError(
                    f"{where}: column '{col}' must be a list of integer token ids; element {k} is {what} ({key})"
                )
        for x in v:
            if allow_ignore and x == IGNORE:
                continue
            if self.model_vocab is not None and x >= self.model_vocab:
                raise UserError(
                    f"{where}: column '{col}' has token id {x}, outside the model's vocabulary "
                    f"0..{self.model_vocab - 1} (config.json vocab_size = {self.model_vocab}) ({key})"
                )
            if not (0 <= x < self.vocab):
                raise UserError(
                    f"{where}: column '{col}' has token id {x}, outside the tokenizer's 0..{self.vocab - 1} ({key})"
                )
        return list(v)

    # -- rendering

    def render(self, row: dict, where: object, lenient: bool = False) -> Segments | tuple[list[int], list[int]]:
        c = self.cfg
        if c.format == "text":
            return [(self._string(row, c.text_column, "data.text_column", where, lenient), True)]
        if c.format == "alpaca":
            instruction = self._string(row, c.instruction_column, "data.instruction_column", where, lenient)
            extra = self._string(row, c.input_column, "data.input_column", where, lenient, required=False)
            output = self._string(row, c.output_column, "data.output_column", where, lenient)
            if extra and extra.strip():
                prompt = ALPACA_PROMPT.format(instruction=instruction, input=extra)
            else:
                prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
            return [(prompt, c.train_on_prompt), (output, True)]
        if c.format == "chat":
            return self._chat(row.get(c.messages_column), where)
        ids = self._int_list(row.get(c.input_ids_column), c.input_ids_column, "data.input_ids_column", where, False)
        raw = row.get(c.labels_column)
        if raw is None:
            return ids, list(ids)
        labels = self._int_list(raw, c.labels_column, "data.labels_column", where, True)
        if len(labels) != len(ids):
            raise UserError(
                f"{where}: column '{c.labels_column}' has {len(labels)} labels for {len(ids)} input ids "
                "(data.labels_column)"
            )
        return ids, labels

    def _messages(self, v: Any, where: object) -> list[dict]:
        col = self.cfg.messages_column
        if v is None:
            raise UserError(f"{where}: column '{col}' is missing or null (data.messages_column)")
        if not isinstance(v, (list, tuple)) or not v:
            what = "an empty list" if isinstance(v, (list, tuple)) else _kind(v)
            raise UserError(
                f"{where}: column '{col}' must be a non-empty list of {{role, content}} messages, got {what}"
            )
        for k, m in enumerate(v, 1):
            if not isinstance(m, dict):
                raise UserError(f"{where}: message {k} must be an object with role and content, got {_kind(m)}")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                what = shown(role) if isinstance(role, str) else _kind(role)
                raise UserError(f"{where}: message {k} has unknown role {what} (expected one of {', '.join(ROLES)})")
            if not isinstance(content, str):
                raise UserError(f"{where}: message {k} ({role}) content must be a string, got {_kind(content)}")
        return list(v)

    def _apply(self, messages: list[dict], generation: bool, where: object) -> str:
        which = "data.chat_template" if self.cfg.chat_template else "the tokenizer's chat_template"
        try:
            with _time_limit(RENDER_LIMIT_S):
                out = self.tok.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=generation, chat_template=self.template
                )
        except _RenderTimeout:
            raise UserError(
                f"{where}: the chat template ({which}) did not finish rendering one conversation within "
                f"{RENDER_LIMIT_S:g} s (a template renders in milliseconds; does it loop?)"
            ) from None
        except Exception as err:  # noqa: BLE001 - jinja errors, raise_exception() in templates
            raise UserError(
                f"{where}: the chat template ({which}) failed: {' '.join(str(err).split())[:300]}"
            ) from None
        return out if isinstance(out, str) else str(out)

    def _chat(self, value: Any, where: object) -> Segments:
        msgs = self._messages(value, where)
        full = self._apply(msgs, False, where)
        if not full.strip():
            raise UserError(
                f"{where}: the chat template rendered nothing for this conversation "
                "(check data.chat_template or the tokenizer's chat_template)"
            )
        if self.cfg.train_on_prompt:
            return [(full, True)]
        # Each assistant reply is the text between the rendering of the conversation before it (with the
        # generation prompt) and the rendering up to and including it. That needs templates that render
        # prefixes of a conversation as prefixes of the whole; most do, and we refuse rather than guess.
        segs: Segments = []
        pos = 0
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            start = self._apply(msgs[:i], True, where) if i else ""
            end = self._apply(msgs[: i + 1], False, where)
            if not (pos <= len(start) <= len(end) and full.startswith(end) and end.startswith(start)):
                raise UserError(
                    f"{where}: the chat template does not render this conversation prefix by prefix, so the "
                    "assistant replies cannot be located; set data.train_on_prompt = true or data.chat_template"
                )
            segs += [(full[pos : len(start)], False), (full[len(start) : len(end)], True)]
            pos = len(end)
        segs.append((full[pos:], False))
        return [s for s in segs if s[0]]

    def check_ids(self, ids: list[int], where: object) -> None:
        """Ids the tokenizer produced must have a row in the model's embedding."""
        if self.model_vocab is None or not ids:
            return
        top = max(ids)
        if top >= self.model_vocab:
            raise UserError(
                f"{where}: the tokenizer gives token id {top}, but the model has embeddings for ids "
                f"0..{self.model_vocab - 1} only (config.json vocab_size = {self.model_vocab}): the tokenizer "
                "has tokens the model has no embedding for; use the model's own tokenizer (model.tokenizer)"
            )

    def tokenize(self, rendered: list[Segments | tuple[list[int], list[int]]]) -> list[tuple[list[int], list[int]]]:
        """Token ids and labels per rendered row; all text segments of the batch go through one call."""
        texts = [t for r in rendered if isinstance(r, list) for t, _ in r]
        enc = iter(self.tok(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
        out = []
        for r in rendered:
            if isinstance(r, tuple):
                out.append(r)
                continue
            ids: list[int] = list(self.bos)
            labels: list[int] = [IGNORE] * len(self.bos)
            for _, trainable in r:
                piece = list(next(enc))
                ids += piece
                labels += piece if trainable else [IGNORE] * len(piece)
            if self.cfg.format != "chat" and self.eos is not None:
                ids.append(self.eos)
                labels.append(self.eos)
            out.append((ids, labels))
        return out


def _finish(ids: list[int], labels: list[int], cfg: DataConfig, where: object, stats: _Stats):
    """Apply the over-long policy and drop documents with nothing to learn; None when dropped."""
    stats.rows += 1
    if len(ids) > cfg.seq_len:
        if cfg.overlong == "error":
            raise UserError(
                f"{where}: sample has {len(ids)} tokens, more than data.seq_len = {cfg.seq_len} "
                "(data.overlong = 'error'; 'truncate' or 'drop' accept it)"
            )
        if cfg.overlong == "drop":
            stats.overlong_dropped += 1
            return None
        ids, labels = ids[: cfg.seq_len], labels[: cfg.seq_len]
        stats.truncated += 1
    lab = np.asarray(labels, dtype=np.int32)
    if len(lab):
        lab[0] = IGNORE  # nothing predicts a document's first token (see the module docstring)
    if not len(lab) or bool((lab == IGNORE).all()):
        stats.no_target += 1
        return None
    return np.asarray(ids, dtype=np.int32), lab


class _At:
    """A row's location, worked out only when a message needs it (JSON line numbers cost a file scan)."""

    __slots__ = ("where", "i")

    def __init__(self, where: Callable[[int], str], i: int):
        self.where, self.i = where, i

    def __str__(self) -> str:
        return self.where(self.i)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def encode_rows(
    renderer: Renderer, rows: Iterable[tuple[int, dict]], where: Callable[[int], str], lenient: bool, stats: _Stats
) -> Docs:
    """Validate, render, tokenize and filter rows (index, dict) into documents."""
    docs = []
    chunk: list[tuple[int, dict]] = []

    def flush() -> None:
        rendered = [renderer.render(row, _At(where, i), lenient) for i, row in chunk]
        for (i, _), (ids, labels) in zip(chunk, renderer.tokenize(rendered), strict=True):
            renderer.check_ids(ids, _At(where, i))
            doc = _finish(ids, labels, renderer.cfg, _At(where, i), stats)
            if doc is not None:
                docs.append(doc)
        chunk.clear()

    for item in rows:
        chunk.append(item)
        if len(chunk) >= CHUNK_ROWS:
            flush()
    if chunk:
        flush()
    return Docs.from_docs(docs)


# ------------------------------------------------------------------ building


def _no_samples(src: Source, cfg: DataConfig, stats: _Stats) -> UserError:
    why = []
    if stats.overlong_dropped:
        why.append(
            f"{stats.overlong_dropped} longer than data.seq_len = {cfg.seq_len} dropped (data.overlong = 'drop')"
        )
    if stats.no_target:
        why.append(
            f"{stats.no_target} with no token to train on (e.g. a response cut off by truncation, "
            "or a conversation without an assistant message)"
        )
    return UserError(f"{src.path}: no usable samples left of {stats.rows} rows: {'; '.join(why)}")


def tokenize_source(src: Source, renderer: Renderer) -> tuple[Docs, _Stats]:
    """All documents of one source; raises UserError for any bad row, naming its file and line/row."""
    stats = _Stats()
    if src.kind == "json":
        lines: list[int] = []
        first = _json_rows(Path(src.path), CHECK_ROWS)[0]
        if not first:
            raise UserError(f"{src.path}: the dataset is empty (no records)")
        renderer.check_columns(sorted({c for r in first for c in r if r.get(c) is not None} | set(first[0])), src)
        rows = _json_source_rows(Path(src.path), lines)
        docs = encode_rows(renderer, rows, _Where(src, lines), False, stats)
    else:
        ds = load_source(src)
        renderer.check_columns(ds.column_names, src)
        docs = encode_rows(renderer, _dataset_rows(ds, src), _Where(src), src.kind == "csv", stats)
    if not len(docs):
        raise _no_samples(src, renderer.cfg, stats)
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


def model_vocab_size(recipe: Recipe) -> int | None:
    """Rows of the model's input embedding (config.json vocab_size), if its config states them."""
    from launcher.loading import load_config, resolve_model_dir

    config = load_config(recipe, resolve_model_dir(recipe))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "vocab_size", None)
    return value if type(value) is int and value > 0 else None


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
    train_srcs, val_src = _sources(cfg)
    per = []
    stats = _Stats()
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


# ------------------------------------------------------------------ one builder per cache directory


def _atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> None:
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_payload(path: Path) -> dict:
    # mmap: ranks on one machine share the page cache instead of each holding a copy.
    return torch.load(path, mmap=True, weights_only=True)


class _Heartbeat:
    """Touches the lock file while the builder works, so waiters can tell slow from dead."""

    def __init__(self, path: Path, every_s: float):
        self.path, self.every_s = path, every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def _try_lock(lock: Path, rank: int) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "rank": rank, "time": time.time()}))
    return True


def _holder_is_gone(lock: Path) -> bool:
    """The lock was taken by a process of this machine that no longer exists (killed, crashed): no need to
    wait out the heartbeat. A lock of another host, or one not written yet, counts as held."""
    try:
        info = json.loads(lock.read_text())
        host, pid = info["host"], int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def _raise_marker(marker: Path) -> None:
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        info = {"kind": "crash", "message": f"unreadable error marker {marker}"}
    if info.get("kind") == "user":
        raise UserError(info["message"])
    raise RuntimeError(f"preparing the data failed on the process that built it: {info.get('message')}")


def shared_build(
    cache_dir: Path,
    key: str,
    build: Callable[[], dict],
    *,
    rank: int = 0,
    attempt: str | None = None,
    share_errors: bool = True,
    timeout_s: float = WAIT_TIMEOUT_S,
    stale_s: float = STALE_LOCK_S,
    poll_s: float = 0.2,
) -> dict:
    """Build `<key>.pt` once per cache directory and return it (memory-mapped) to every caller.

    Whoever creates `<key>.lock` first (O_EXCL) builds; the others poll for `<key>.pt` or the error marker.
    A lock election instead of "rank 0 builds" works whether or not nodes share the directory: with a
    shared file system one process in the job builds, otherwise one per node. The builder writes the
    result atomically (tmp + rename); if it fails it writes the error marker with its one-line message
    (and re-raises), so waiters raise the same error instead of hanging. A lock whose heartbeat stopped
    for `stale_s` (builder killed) is broken and taken over; `timeout_s` bounds the wait in any case.
    No collectives: a rank that fails here cannot leave the others blocked in one.

    The marker belongs to one `attempt` (one run, one elastic restart; default: this process): the
    processes of that attempt read it, every later one ignores it and builds again. A cache directory is
    shared by every run, and a failure (a crash, a bad row, a full disk) must not fail all later runs.
    `share_errors=False` (a caller no other process waits for) writes no marker at all.
    """
    attempt = attempt or f"{socket.gethostname()}-{os.getpid()}"
    tag = hashlib.sha256(attempt.encode()).hexdigest()[:12]
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{cache_dir}: cannot create the data cache ({err.strerror or err})") from None
    final, marker, lock = (cache_dir / name for name in (f"{key}.pt", f"{key}.{tag}.error", f"{key}.lock"))
    deadline = time.monotonic() + timeout_s
    said = False
    while True:
        if final.exists():
            return _load_payload(final)
        if marker.exists():
            _raise_marker(marker)
        if _try_lock(lock, rank):
            try:
                if final.exists():  # finished between our check and the lock
                    return _load_payload(final)
                with _Heartbeat(lock, max(stale_s / 4, 0.05)):
                    try:
                        payload = build()
                    except Exception as err:
                        if not share_errors:
                            raise
                        kind = "user" if isinstance(err, UserError) else "crash"
                        msg = str(err) if kind == "user" else f"{type(err).__name__}: {err}"
                        body = json.dumps({"kind": kind, "message": " ".join(msg.split()), "rank": rank}).encode()
                        _atomic_write_bytes(marker, lambda f, b=body: f.write(b))
                        raise
                    _atomic_write_bytes(final, lambda f, p=payload: torch.save(p, f))
                for old in cache_dir.glob(f"{key}.*.error"):  # failed attempts' markers: not needed any more
                    old.unlink(missing_ok=True)
                return _load_payload(final)
            finally:
                lock.unlink(missing_ok=True)
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            continue  # the builder just finished or gave up: look again
        if age > stale_s or _holder_is_gone(lock):
            why = "its builder is gone" if age <= stale_s else f"no heartbeat for {age:.0f}s"
            print(f"[data] breaking stale lock {lock} ({why})", flush=True)
            lock.unlink(missing_ok=True)
            continue
        if time.monotonic() > deadline:
            raise UserError(
                f"gave up after {timeout_s:.0f}s waiting for another process to prepare the data cache {final} "
                f"(its lock {lock} is still held); see the other ranks' logs"
            )
        if not said:
            print(f"[data] waiting for another rank to tokenize the data into {final}", flush=True)
            said = True
        time.sleep(poll_s)


def build_data(
    recipe: Recipe, tokenizer, rank: int, world: int, cache_dir: Path | None = None, attempt: str | None = None
) -> tuple[Packed, Packed | None]:
    """Train and validation rows. The same for every rank and world size (ranks pick rows with StepSampler).

    With a cache_dir, one process tokenizes and the rest load its file (see shared_build); without one,
    every caller builds (single process, tests).
    """
    if cache_dir is None:
        payload = build_payload(recipe, tokenizer)
    else:
        key = fingerprint(recipe, tokenizer)
        build = lambda: build_payload(recipe, tokenizer)  # noqa: E731
        # One process alone (the launcher's `prepare`, a one-rank run) has nobody to tell of a failure.
        payload = shared_build(Path(cache_dir), key, build, rank=rank, attempt=attempt, share_errors=world > 1)
    stats = dict(payload["stats"])
    if rank == 0:
        s = stats
        line = (
            f"[data] train: {s['train_documents']} documents -> {s['train_rows']} rows of {recipe.data.seq_len} "
            f"tokens ({100 * s['train_fill']:.0f}% filled); {s['truncated']} truncated, "
            f"{s['overlong_dropped']} dropped as over-long, {s['no_target_dropped']} without a target"
        )
        if payload["val"] is not None:
            line += f"; val: {s['val_documents']} documents -> {s['val_rows']} rows"
        print(line, flush=True)

    def packed(t: dict | None) -> Packed | None:
        return None if t is None else Packed(t["input_ids"], t["labels"], t["position_ids"], stats)

    return packed(payload["train"]), packed(payload["val"])


# ------------------------------------------------------------------ preflight


def _check_tokenizer(recipe: Recipe):
    from launcher.loading import resolve_model_dir

    try:
        return build_tokenizer(recipe, resolve_model_dir(recipe))
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - a tokenizer that cannot load is the user's to fix
        name = recipe.model.tokenizer or recipe.model.path
        raise UserError(f"{name}: the tokenizer could not be loaded ({type(err).__name__}: {err})") from None


def prepare(recipe: Recipe, cache_dir: Path) -> None:
    """Tokenize the whole data into the cache in the launching process, before any run directory exists.

    Every row is validated on the way, so a bad one anywhere in a dataset (not only in the first rows
    `check` reads) is one line naming its file and line before a rank is spawned; the ranks then map the
    finished file instead of building it. Writes only the cache (nothing at all when a row is bad)."""
    tokenizer = _check_tokenizer(recipe)
    created = [d for d in (cache_dir, *cache_dir.parents) if not d.exists()]
    try:
        train, _ = build_data(recipe, tokenizer, 0, 1, cache_dir)
        if len(train) < recipe.train.global_batch:  # StepSampler's rule, found here instead of on every rank
            raise UserError(
                f"data.datasets: the training data packs into {len(train)} rows of data.seq_len = "
                f"{recipe.data.seq_len} tokens, fewer than train.global_batch = {recipe.train.global_batch}; "
                "add data or lower train.global_batch"
            )
    except BaseException:
        for d in created:  # innermost first; only what this call created, and only if still empty
            try:
                d.rmdir()
            except OSError:
                break
        raise


def check(recipe: Recipe, rows: int = CHECK_ROWS) -> None:
    """Cheap validation in the launching process, before any run directory exists.

    Every source: exists, has a supported type, parses, and its first `rows` rows have the format's
    columns with the right types, valid chat roles, a template that renders, and (with the real tokenizer)
    pass the over-long policy. A source read to its end must keep at least one usable sample. Hub
    datasets are only named here; the ranks load them. Writes nothing.
    """
    cfg = recipe.data
    train, val = _sources(cfg)  # all missing files and unsupported types first: the cheapest checks
    renderer = None
    for src in train + ([val] if val else []):
        peeked = _peek(src, rows)
        if peeked is None:
            continue
        got, where, complete = peeked
        if not got:
            raise UserError(f"{src.path}: the dataset is empty (no rows)")
        if renderer is None:
            renderer = Renderer(cfg, _check_tokenizer(recipe), model_vocab_size(recipe))
        columns = {c for r in got for c in r if r.get(c) is not None}
        renderer.check_columns(sorted(columns | set(got[0])), src)
        stats = _Stats()
        docs = encode_rows(renderer, enumerate(got), where, src.kind == "csv", stats)
        if complete and not len(docs):
            raise _no_samples(src, cfg, stats)
        if complete and src is not val and cfg.val_fraction > 0 and val is None:
            carve(docs, cfg.val_fraction, 0, src)


# ------------------------------------------------------------------ sampling


class StepBatches:
    """This rank's micro-batches of each step, built on a host thread one step ahead of the GPU.

    The step loop asks for step s and names the step it will ask for next; that one is collated (and, for a
    GPU, pinned so the copy to the device does not block) while the GPU computes step s. The step loop only
    waits when a batch is not ready yet: that wait is the data time it reports.

    The loss is normalised by the label tokens of the whole global batch. Every rank holds the whole
    (packed) training set and the sampler's global batch, so each rank counts them itself: no collective,
    and no device->host copy that would make the host wait for the GPU at every step start.
    """

    def __init__(self, data: Packed, sampler: StepSampler, pin: bool):
        from concurrent.futures import ThreadPoolExecutor

        self.data, self.sampler, self.pin = data, sampler, pin
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="qlaunch-batches")
        self._ahead: tuple[int, object] | None = None  # (step, Future of build(step))

    def label_tokens(self, step: int) -> int:
        """Tokens with a label, over the global batch of `step` (every rank's micro-batches together)."""
        rows = self.data.labels[torch.as_tensor(self.sampler.global_batch(step), dtype=torch.long)]
        return int((rows[:, 1:] != IGNORE).sum())

    def build(self, step: int) -> tuple[list[dict[str, torch.Tensor]], int]:
        micro = [self.data.collate(idx) for idx in self.sampler.micro_batches(step)]
        if self.pin:
            micro = [{k: v.pin_memory() for k, v in b.items()} for b in micro]
        return micro, self.label_tokens(step)

    def get(self, step: int, then: int | None) -> tuple[list[dict[str, torch.Tensor]], int]:
        """(micro-batches, global label tokens) of `step`; starts building `then` (None: nothing more)."""
        if self._ahead is not None and self._ahead[0] == step:
            out = self._ahead[1].result()
        else:
            out = self.build(step)
        self._ahead = (then, self._pool.submit(self.build, then)) if then is not None else None
        return out


class StepSampler:
    """Global batch of step s = samples perm[s*G:(s+1)*G] (a fresh seeded permutation per epoch).

    Rank r's micro-step a gets positions [(a*W + r)*mb, +mb) of that global batch: disjoint across ranks,
    the same global batch at any world size, and resumable from the step number alone. `next()` walks the
    steps with a cursor that state_dict()/load_state_dict() save and restore (a checkpoint stores it; a
    resumed run, at any world size, then sees exactly the samples the uninterrupted run would have).
    """

    def __init__(self, n: int, global_batch: int, micro_batch: int, world: int, rank: int, seed: int):
        if n < global_batch:
            raise UserError(f"the training data has {n} packed samples, fewer than train.global_batch = {global_batch}")
        self.n, self.G, self.mb, self.W, self.r, self.seed = n, global_batch, micro_batch, world, rank, seed
        self.steps_per_epoch = n // global_batch
        self.accum = global_batch // (micro_batch * world)
        self.step = 0
        self._cached: tuple[int, torch.Tensor] | None = None

    def _perm(self, epoch: int) -> torch.Tensor:
        # Read the cache once and return what was checked: StepBatches' thread and the step loop may ask for
        # different epochs at once, and re-reading self._cached could return the other thread's epoch.
        cached = self._cached
        if cached is None or cached[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            cached = self._cached = (epoch, torch.randperm(self.n, generator=g))
        return cached[1]

    def global_batch(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        return self._perm(epoch)[k * self.G : (k + 1) * self.G].tolist()

    def micro_batches(self, step: int) -> list[list[int]]:
        gb = self.global_batch(step)
        return [gb[(a * self.W + self.r) * self.mb : (a * self.W + self.r + 1) * self.mb] for a in range(self.accum)]

    def next(self) -> list[list[int]]:
        """This rank's micro-batches of the cursor's step; advances the cursor."""
        out = self.micro_batches(self.step)
        self.step += 1
        return out

    def state_dict(self) -> dict:
        return {"step": self.step, "n": self.n, "global_batch": self.G, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for k in ("n", "global_batch", "seed"):
            if state.get(k) != mine[k]:
                what = {"n": "packed training samples", "global_batch": "train.global_batch", "seed": "train.seed"}
                raise UserError(
                    f"cannot resume: the checkpoint was taken with {what[k]} = {state.get(k)}, this run has "
                    f"{mine[k]}; a resumed run would not see the samples the interrupted one would have"
                )
        self.step = int(state["step"])
