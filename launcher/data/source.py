"""A dataset source of a recipe (a local file, a saved dataset, a hub id) and its loader errors as one line."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.errors import UserError

if TYPE_CHECKING:  # annotations only: packing and sampling import without pydantic (GPU hosts, tools)
    pass


# Rows rendered and tokenized per batched tokenizer call.
CHUNK_ROWS = 1024

FILE_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}

HUB_ID_PATTERN = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class Source:
    """One dataset as the recipe names it, classified without reading it."""

    path: str
    kind: str  # json | parquet | csv | arrow | saved | repo | hub
    split: str
    key: str  # the recipe key that named it, for messages


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


def error_cause(err: BaseException, verbatim: bool = False) -> str:
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


def load_error(src: Source, err: Exception) -> UserError:
    """Turn a datasets/pyarrow loading failure into one line that says where and what."""
    p = Path(src.path)
    if src.kind == "csv" and _csv_is_empty(p):
        return UserError(f"{src.path}: the dataset is empty (no rows)")
    if src.kind == "parquet" and _parquet_rows(p) == 0:
        return UserError(f"{src.path}: the dataset is empty (no rows)")
    what = error_cause(err, verbatim=src.kind == "hub")
    if src.kind == "hub":
        return UserError(
            f"{src.path}: could not load hub dataset split {src.split!r} ({src.key}; no local file of that "
            f"name either): {what}"
        )
    if src.kind in ("saved", "repo"):
        return UserError(f"{src.path}: could not load split {src.split!r} ({src.key}): {what}")
    return UserError(f"{src.path}: could not read this {src.kind} file ({src.key}): {what}")


def value_kind(v: Any) -> str:
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
