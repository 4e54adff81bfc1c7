"""Writing a file whole or not at all: into a temporary name beside it, flushed to disk, then renamed over it.
Readers (other ranks, other nodes, a later run) see the old file or the new one, never a part."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write_with(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """`write(f)` fills an open binary file that replaces PATH once it is complete."""
    # A name of its own per writer: nodes sharing a directory (a run directory, the data cache) and threads
    # of one process may write the same file side by side. Hidden, so a listing never shows a half file.
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, text: str) -> None:
    atomic_write_with(path, lambda f: f.write(text.encode()))
