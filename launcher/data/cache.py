"""The shared tokenized-data cache: one builder per fingerprint under a lock (heartbeat, stale-lock takeover),
written atomically; `prepare` fills it in the launcher before any run directory exists."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from launcher.atomic import atomic_write_with
from launcher.errors import UserError

if TYPE_CHECKING:  # annotations only: packing and sampling import without pydantic (GPU hosts, tools)
    from launcher.plan.recipe import Recipe
from launcher.data.pack import Packed
from launcher.data.tokenize import build_payload, fingerprint
from launcher.data.tokenizer import recipe_tokenizer

# Waiting ranks give up after this long, or after the builder's lock file stopped being refreshed for
# STALE_LOCK_S (the builder touches it every STALE_LOCK_S / 4 while it works).
WAIT_TIMEOUT_S = 4 * 3600.0

STALE_LOCK_S = 300.0


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
                        atomic_write_with(marker, lambda f, b=body: f.write(b))
                        raise
                    atomic_write_with(final, lambda f, p=payload: torch.save(p, f))
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


def prepare(recipe: Recipe, cache_dir: Path) -> None:
    """Tokenize the whole data into the cache in the launching process, before any run directory exists.

    Every row is validated on the way, so a bad one anywhere in a dataset (not only in the first rows
    `check` reads) is one line naming its file and line before a rank is spawned; the ranks then map the
    finished file instead of building it. Writes only the cache (nothing at all when a row is bad)."""
    tokenizer = recipe_tokenizer(recipe)
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


# Beside the run directories, shared by every run of this runs_dir (tokenized data, keyed by its inputs).
DATA_CACHE_DIR = ".data-cache"
