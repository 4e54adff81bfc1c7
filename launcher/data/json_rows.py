"""qlaunch's own streaming JSON / JSON Lines reader: rows with their line numbers, one-line errors, depth limits."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.errors import UserError
from launcher.safe_files import open_regular, read_regular

if TYPE_CHECKING:  # annotations only: packing and sampling import without pydantic (GPU hosts, tools)
    pass
from launcher.data.source import value_kind

# A JSON array data file is parsed whole; bigger data belongs in JSON lines, which are streamed.
_MAX_JSON_ARRAY_BYTES = 2_000_000_000


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


def json_records(path: Path) -> Iterator[tuple[int | None, dict]]:
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
                raise UserError(f"{path} record {k + 1}: expected a JSON object, got {value_kind(rec)}")
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
                raise UserError(f"{path}:{n}: expected one JSON object per line, got {value_kind(rec)}")
            yield n, rec


def read_json_rows(path: Path, limit: int | None = None) -> tuple[list[dict], list[int], bool]:
    """Up to `limit` records of a JSON / JSON-lines file: (rows, line numbers, complete = read to its end)."""
    rows: list[dict] = []
    lines: list[int] = []
    for n, rec in json_records(path):
        if limit is not None and len(rows) >= limit:
            return rows, lines, False
        rows.append(rec)
        if n is not None:
            lines.append(n)
    return rows, lines, True


def json_source_rows(path: Path, lines: list[int]) -> Iterator[tuple[int, dict]]:
    """(row index, record) of a JSON data file, streamed; appends each record's line to `lines` (for _Where)."""
    for i, (n, rec) in enumerate(json_records(path)):
        if n is not None:
            lines.append(n)
        yield i, rec
