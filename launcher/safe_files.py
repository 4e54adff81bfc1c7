"""Reading untrusted files safely: only regular files (no links, FIFOs or devices), bounded sizes, exact reads,
JSON objects with their kind named in errors."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from launcher.errors import UserError

MAX_READ_BYTES = 1 << 30  # Linux returns at most ~2 GiB per read call; ask for 1 GiB at a time

MAX_JSON_BYTES = 100_000_000  # config.json, the index, qlaunch_quant.json: real ones are kilobytes


def shown(name: str, limit: int = 80) -> str:
    """A name taken from a parsed file, safe on one line: quoted, non-printables escaped, cut to `limit`."""
    text = ascii(name[:limit])
    return text if len(name) <= limit else text[:-1] + "...'"


def plain_file_name(name: object) -> bool:
    """A name taken from an untrusted file that can only mean a file directly inside one directory: a
    string of 1 to 255 printable characters, no '/', '\\' or NUL, not '.' or '..'."""
    return (
        type(name) is str
        and 0 < len(name) <= 255
        and name not in (".", "..")
        and name.isprintable()
        and not any(c in name for c in "/\\\0")
    )


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"


def open_regular(path: Path, what: str) -> int:
    """A read-only descriptor of PATH (symlinks followed) if it is a regular file, else one line naming it.

    stat first, so a device or FIFO is never opened at all; O_NONBLOCK and fstat on the open descriptor
    still hold if the name is swapped for a FIFO in between (its open would wait for a writer forever).
    """
    try:
        if not stat.S_ISREG(mode := os.stat(path).st_mode):
            raise UserError(f"{path}: the {what} is {_kind(mode)}; it must be a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found (a dangling symlink?)") from None
    except OSError as err:
        raise UserError(f"{path}: cannot open the {what} ({err.strerror})") from None
    if not stat.S_ISREG(mode := os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{path}: the {what} is {_kind(mode)}; it must be a regular file")
    return fd


def pread_exact(fd: int, n: int, offset: int) -> bytes:
    parts, done = [], 0
    while done < n:
        chunk = os.pread(fd, min(n - done, MAX_READ_BYTES), offset + done)
        if not chunk:
            break
        parts.append(chunk)
        done += len(chunk)
    return b"".join(parts)


def read_regular(path: Path, what: str, limit: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise UserError(f"{path}: the {what} is larger than {limit // 1_000_000} MB; this is not a {what}")
        return pread_exact(fd, size, 0)
    except OSError as err:
        raise UserError(f"{path}: cannot read the {what} ({err.strerror})") from None
    finally:
        os.close(fd)


def json_kind(value: object) -> str:
    kinds = (
        (dict, "an object"),
        (list, "an array"),
        (str, "a string"),
        (bool, "a boolean"),
        ((int, float), "a number"),
    )
    return next((k for t, k in kinds if isinstance(value, t)), "null")


def read_json_object(path: Path, what: str) -> dict:
    """A regular file holding UTF-8 JSON whose top level is an object; one line naming the file otherwise."""
    raw = read_regular(path, what)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: the {what} is not UTF-8 text (invalid byte at offset {err.start})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        # err.msg is json's fixed wording ("Expecting value", ...): it quotes nothing of the text.
        raise UserError(
            f"{path}: the {what} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
        ) from None
    except RecursionError:
        raise UserError(f"{path}: the {what} is nested too deeply to parse (no real {what} is)") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: the {what} must be a JSON object, not {json_kind(value)}")
    return value
