"""Sharded, atomic checkpoints and exact resume.

Layout: RUN/checkpoints/step_00000042/
    dcp/ or deepspeed/  the backend's own sharded files: torch.distributed.checkpoint (LoRA weights +
                    optimizer state, one shard file per rank) or DeepSpeed's (each rank's ZeRO partition)
    rng_rank<N>.pt  that rank's RNG states (tensors only; loaded with weights_only=True)
    meta.json       step, scheduler state, world size, recipe fingerprint, and every file's size
    COMPLETE        written last; a directory without it is not a checkpoint

Atomicity: everything is written into step_N.tmp/, then rank 0 renames it to step_N/ after a barrier
and writes COMPLETE. A crash at any point leaves either the previous checkpoint set or a `.tmp`
directory that is ignored and cleaned up. Resume takes the newest directory whose COMPLETE exists and
whose files have the sizes meta.json recorded; anything else is skipped with a warning. Every rank
reads the same files and makes the same choice, so no collective is needed to agree.
"""

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
from launcher.recipe import Recipe, recipe_to_dict

COMPLETE = "COMPLETE"
META = "meta.json"

# Recipe keys whose change alters the math of a resumed run (anything else — max_steps, logging,
# checkpoint cadence, the number of GPUs — may change between a run and its resume).
MATH_KEYS = (
    "model.path",
    "model.init",
    "model.dtype",
    "quant",
    "lora",
    "data.datasets",
    "data.format",
    "data.seq_len",
    "data.packing",
    "data.overlong",
    "data.train_on_prompt",
    "train.global_batch",
    "train.lr",
    "train.schedule",
    "train.warmup_steps",
    "train.min_lr_ratio",
    "train.weight_decay",
    "train.betas",
    "train.grad_clip",
    "train.seed",
    "parallel.backend",
)


def fingerprint(recipe: Recipe) -> dict[str, Any]:
    d = recipe_to_dict(recipe)
    out = {}
    for key in MATH_KEYS:
        cur: Any = d
        for part in key.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        out[key] = cur
    return out


def math_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [k for k in MATH_KEYS if old.get(k) != new.get(k)]


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def _file_sizes(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_size for p in sorted(d.rglob("*")) if p.is_file() and p.name != META}


def is_complete(d: Path) -> tuple[bool, str]:
    """(usable?, why not) for one checkpoint directory."""
    if not (d / COMPLETE).is_file():
        return False, "no COMPLETE marker (interrupted while saving)"
    try:
        meta = json.loads((d / META).read_text())
    except (OSError, json.JSONDecodeError) as err:
        return False, f"unreadable {META} ({err})"
    for name, size in meta.get("files", {}).items():
        p = d / name
        if not p.is_file():
            return False, f"{name} is missing"
        if p.stat().st_size != size:
            return False, f"{name} has {p.stat().st_size} bytes, {size} were written"
    missing = missing_rank_files(d, meta.get("world_size", 1))
    if missing:
        return False, f"{missing} is missing (a rank's shard never reached this directory)"
    return True, ""


def missing_rank_files(d: Path, world_size: int) -> str | None:
    """The first per-rank file of a checkpoint that is absent, or None.

    The sizes in meta.json only cover what rank 0 could see when it sealed the directory: ranks whose
    files went elsewhere (another node's disk) are absent from that list too, so each rank's own files
    are looked for by name. Shard names: DCP writes __<rank>_<n>.distcp; DeepSpeed ZeRO writes one
    *zero_pp_rank_<rank>_*optim_states.pt per data-parallel rank."""
    dcp_dir = d / "dcp"
    zero = [p.name for p in d.glob("*/*zero_pp_rank_*optim_states.pt")]
    for r in range(int(world_size)):
        if not (d / f"rng_rank{r}.pt").is_file():
            return f"rng_rank{r}.pt"
        if dcp_dir.is_dir() and not any(dcp_dir.glob(f"__{r}_*.distcp")):
            return f"dcp/__{r}_0.distcp"
        if zero and not any(f"zero_pp_rank_{r}_" in n for n in zero):
            return f"rank {r}'s zero_pp_rank_{r} optimizer states"
    return None


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp")
    )


def newest_complete(root: Path, warn=print) -> Path | None:
    for d in reversed(list_checkpoints(root)):
        ok, why = is_complete(d)
        if ok:
            return d
        warn(f"warning: skipping checkpoint {d.name}: {why}")
    return None


def looks_like_checkpoint(p: Path) -> bool:
    """A checkpoint directory (step_N/), as opposed to a run directory, whether usable or not."""
    return (p / COMPLETE).is_file() or (p / META).is_file()


def find_resume_target(arg: str, runs_dir: Path, name: str) -> Path | None:
    """--resume auto | RUN_DIR | CHECKPOINT_DIR -> a complete checkpoint directory (launching process).

    'auto' with no checkpoint yet returns None (start fresh): a job preempted before its first
    checkpoint, then requeued with --resume auto, must start rather than fail."""
    if arg == "auto":
        # Newest by the time it was saved, not by directory name: run directories are named by timestamp
        # or, for multi-node runs, by job id, and the two do not sort together.
        found = [
            d for ck in (runs_dir / name).glob("*/checkpoints") if (d := newest_complete(ck, warn=lambda _m: None))
        ]
        return max(found, key=_saved_at).resolve() if found else None
    p = Path(arg)
    if looks_like_checkpoint(p):
        ok, why = is_complete(p)
        if not ok:
            raise UserError(f"--resume {arg}: not a usable checkpoint ({why})")
        return p.resolve()
    if (p / "checkpoints").is_dir():
        d = newest_complete(p / "checkpoints")
        if d is None:
            raise UserError(f"--resume {arg}: the run has no complete checkpoint")
        return d.resolve()
    raise UserError(
        f"--resume {arg}: not a run directory or checkpoint directory (use auto, RUN_DIR or CHECKPOINT_DIR)"
    )


def _saved_at(d: Path) -> float:
    try:
        return float(json.loads((d / META).read_text())["time"])
    except (OSError, ValueError, KeyError, TypeError):
        return (d / COMPLETE).stat().st_mtime


def check_compatible(ckpt: Path, recipe: Recipe) -> None:
    """Refuse a resume whose recipe changes the math; allow harmless changes."""
    meta = json.loads((ckpt / META).read_text())
    changed = math_changes(meta.get("fingerprint", {}), fingerprint(recipe))
    if changed:
        old = meta["fingerprint"]
        new = fingerprint(recipe)
        detail = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:3])
        raise UserError(
            f"--resume {ckpt}: the recipe changes the math of the run ({detail}); "
            "resume with the original values or start a new run"
        )


# ---------------------------------------------------------------- save / load (collective)


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
    _barrier()
    if rank == 0:
        meta = {
            "step": step,
            "time": time.time(),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "fingerprint": fingerprint(recipe),
            "scheduler": engine.scheduler_state(),
            **extra,
            "files": _file_sizes(tmp),
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
    complete = [d for d in list_checkpoints(root) if is_complete(d)[0]]
    for d in complete[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)
    for d in root.glob("step_*.tmp"):
        shutil.rmtree(d, ignore_errors=True)


def load(ckpt: Path, engine) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this rank's RNG; returns meta.json (step, sampler...)."""
    meta = json.loads((ckpt / META).read_text())
    engine.load_state(ckpt)
    engine.load_scheduler_state(meta["scheduler"])
    rank = _rank()
    same_world = meta.get("world_size") == (dist.get_world_size() if dist.is_initialized() else 1)
    rng_file = ckpt / f"rng_rank{rank}.pt"
    if same_world and rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        py = json.loads((ckpt / f"python_rng_rank{rank}.json").read_text())
        random.setstate((py[0], tuple(py[1]), py[2]))
    return meta
