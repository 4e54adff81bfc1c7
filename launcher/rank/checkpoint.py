"""Saving and loading a checkpoint from the ranks: the engine's state, RNG states, meta.json and checksums,
sealed as complete only when every rank has written; pruning old ones."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from launcher.errors import UserError
from launcher.plan.recipe import Recipe
from launcher.rank.checkpoint_dir import (
    CHECKSUMS,
    COMPLETE,
    META,
    checked_meta,
    collect_digests,
    file_sizes,
    fingerprint,
    is_complete,
    list_checkpoints,
    rng_states,
    step_dir,
    write_own_digests,
)


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(root: Path, step: int, engine, recipe: Recipe, extra: dict[str, Any], keep_last: int) -> Path:
    """Every rank writes its own shard into step_N.tmp; rank 0 seals it. Returns the final directory."""
    rank = _rank()
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    engine.save_state(tmp)  # collective: the backend's own sharded files, each rank its part
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    (tmp / f"python_rng_rank{rank}.json").write_text(json.dumps(random.getstate(), default=list))
    if rank != 0:
        write_own_digests(tmp, rank)
    _barrier()
    if rank == 0:
        digests = collect_digests(tmp)
        meta = {
            "step": step,
            "time": time.time(),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "fingerprint": fingerprint(recipe),
            "scheduler": engine.scheduler_state(),
            **extra,
            "files": file_sizes(tmp),
            CHECKSUMS: digests,
        }
        (tmp / META).write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        (final / COMPLETE).write_text("ok\n")
        _fsync_dir(root)
        prune(root, keep_last)
    _barrier()
    return final


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and stale .tmp directories."""
    complete = [d for d in list_checkpoints(root) if is_complete(d, checksums=False)[0]]
    for d in complete[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)
    for d in root.glob("step_*.tmp"):
        shutil.rmtree(d, ignore_errors=True)


def _resource_failure(err: BaseException) -> bool:
    """Out of memory or a lost peer: a failure of the machine or the group, not of the checkpoint."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(err, (MemoryError, torch.OutOfMemoryError, dist.DistError)):
        return True
    if isinstance(err, CheckpointException):
        inner = (f[0] if isinstance(f, tuple) else f for f in err.failures.values())
        return any(isinstance(e, BaseException) and _resource_failure(e) for e in inner)
    return False


def _failure_names(err: BaseException) -> str:
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(err, CheckpointException):
        inner = {type(f[0] if isinstance(f, tuple) else f).__name__ for f in err.failures.values()}
        return f"{type(err).__name__}: {', '.join(sorted(inner))}"
    return type(err).__name__


def load(ckpt: Path, engine) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this rank's RNG; returns meta.json (step, sampler...)."""
    # The launching process checked this directory; the ranks check again what they can cheaply (a rank
    # of an elastic restart, or a later change to the directory, must not load links or unlisted files).
    ok, why = is_complete(ckpt, checksums=False)
    if not ok:
        raise UserError(f"checkpoint {ckpt}: not a usable checkpoint ({why})")
    meta = checked_meta(ckpt, set(engine.scheduler_state()))
    rank = _rank()
    same_world = meta.get("world_size") == (dist.get_world_size() if dist.is_initialized() else 1)
    rng = rng_states(ckpt, meta, rank) if same_world else None
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        engine.load_state(ckpt)
    except UserError:
        raise
    except (Exception, CheckpointException) as err:
        if _resource_failure(err):
            raise
        # Only the exception's type: its message can quote bytes of the file (a pickle, a shape).
        raise UserError(
            f"checkpoint {ckpt}: its weights or optimizer state do not load into this run ({_failure_names(err)}); "
            "the checkpoint is damaged or was not written by this recipe"
        ) from None
    engine.load_scheduler_state(meta["scheduler"])
    if rng is not None:
        states, py = rng
        torch.set_rng_state(states["torch"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state(states["cuda"])
        random.setstate(py)
    return meta
