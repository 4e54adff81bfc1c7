"""A checkpoint directory on disk: its layout, completeness and checksums, the one to resume, and the
compatibility and load checks (read by the launcher before spawning and by every rank).

Layout: RUN/checkpoints/step_00000042/
    dcp/ or deepspeed/  the backend's own sharded files: torch.distributed.checkpoint (LoRA weights +
                    optimizer state, one shard file per rank) or DeepSpeed's (each rank's ZeRO partition)
    rng_rank<N>.pt  that rank's RNG states (tensors only; loaded with weights_only=True)
    python_rng_rank<N>.json  that rank's Python `random` state
    meta.json       step, scheduler state, world size, recipe fingerprint, every file's size and sha256
    COMPLETE        written last; a directory without it is not a checkpoint

Atomicity: everything is written into step_N.tmp/, then rank 0 renames it to step_N/ after a barrier
and writes COMPLETE. A crash at any point leaves either the previous checkpoint set or a `.tmp`
directory that is ignored and cleaned up. Resume takes the newest directory whose COMPLETE exists and
whose files have the sizes and checksums meta.json recorded (checkpoints written before checksums were
recorded: sizes only), that holds nothing but regular files and directories (no link, FIFO or device, and
no link as the directory itself), and, with checksums recorded, no file meta.json does not list; anything
else is skipped with a warning. Every rank reads the same files and makes
the same choice, so no collective is needed to agree.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import re
import stat
import warnings
from pathlib import Path
from typing import Any

import torch

from launcher.errors import UserError
from launcher.plan.recipe import Recipe, recipe_to_dict
from launcher.rundir import CHECKPOINTS_DIR
from launcher.safe_files import plain_file_name

COMPLETE = "COMPLETE"

META = "meta.json"

CHECKSUMS = "sha256"  # meta.json key: relative path -> hex digest of every file

_DIGESTS = ".sha256_rank{rank}.json"  # a rank's digests of its own files, merged into meta.json by rank 0

_MAX_WORLD = 1 << 20

_MAX_SMALL_FILE = 64 << 20  # meta.json, the RNG files: a few KB each

# Recipe keys that provably do not change the function a resumed run computes: everything else does (a key
# added to the recipe later counts as math until it is listed here). "x.*" is a whole section.
HARMLESS_KEYS = (
    "name",
    "train.max_steps",  # extending (or shortening) the run
    "train.epochs",
    "train.eval_every",
    "train.micro_batch",  # same global batch, same function: only the split into micro-steps changes
    "train.gradient_checkpointing",
    "train.compile",
    "checkpoint.*",
    "launch.*",  # GPUs, nodes, restarts, ports (DeepSpeed checks its world size when it loads)
    "log.*",
    "parallel.fsdp.*",  # resharding, offload and hybrid sharding move the same numbers around
    "parallel.deepspeed.offload_optimizer",
    "parallel.deepspeed.offload_params",
    "parallel.deepspeed.persistence_threshold",
)


def harmless(key: str) -> bool:
    return any(key == h or (h.endswith(".*") and key.startswith(h[:-1])) for h in HARMLESS_KEYS)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"lora": {"rank": 8}} -> {"lora.rank": 8}; lists (data.datasets) stay whole values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def fingerprint(recipe: Recipe) -> dict[str, Any]:
    """Every recipe key that changes the math, flattened (kept in meta.json)."""
    return {k: v for k, v in flatten(recipe_to_dict(recipe)).items() if not harmless(k)}


def math_changes(old: dict[str, Any], recipe: Recipe) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for each math key the recipe changes.

    Only the keys the saved fingerprint has are compared: checkpoints written before the fingerprint was
    the whole recipe hold a few keys and whole sections ("lora": {...}), which flatten to the same keys.
    A saved key the recipe no longer has cannot be matched by the user and is not compared."""
    new = flatten(recipe_to_dict(recipe))
    return [(k, v, new[k]) for k, v in flatten(old).items() if not harmless(k) and k in new and new[k] != v]


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def _checkpoint_files(d: Path) -> list[str]:
    """Relative paths of the files that make up a checkpoint (not meta.json, COMPLETE or digest files)."""
    names = (str(p.relative_to(d)) for p in sorted(d.rglob("*")) if p.is_file())
    return [n for n in names if n not in (META, COMPLETE) and not n.startswith(".sha256_rank")]


def file_sizes(d: Path) -> dict[str, int]:
    return {name: (d / name).stat().st_size for name in _checkpoint_files(d)}


def sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# A file a rank writes itself: DCP's __<rank>_<n>.distcp, DeepSpeed's *zero_pp_rank_<rank>_*, the RNG files.
_RANK_FILE = re.compile(
    r"(?:^|/)(?:__(\d+)_\d+\.distcp|rng_rank(\d+)\.pt|python_rng_rank(\d+)\.json|[^/]*zero_pp_rank_(\d+)_[^/]*)$"
)


def file_owner(name: str) -> int:
    """The rank that wrote (and hashes) a checkpoint file; shared files are rank 0's."""
    m = _RANK_FILE.search(name)
    return int(next(g for g in m.groups() if g is not None)) if m else 0


def write_own_digests(d: Path, rank: int) -> None:
    """Each rank but 0 hashes the files it wrote, so the cost is spread over the ranks (rank 0: the rest)."""
    own = {name: sha256(d / name) for name in _checkpoint_files(d) if file_owner(name) == rank}
    (d / _DIGESTS.format(rank=rank)).write_text(json.dumps(own))


def collect_digests(d: Path) -> dict[str, str]:
    """Rank 0, after the barrier: the other ranks' digests (their files removed), and its own for the rest."""
    found: dict[str, str] = {}
    for f in sorted(d.glob(_DIGESTS.format(rank="*"))):
        found.update(json.loads(f.read_text()))
        f.unlink()
    return {name: found.get(name) or sha256(d / name) for name in _checkpoint_files(d)}


def _plain_relative(name: Any) -> bool:
    # What checkpoint.save records; anything else (absolute, '..', odd characters) is refused unread.
    return (
        isinstance(name, str)
        and re.fullmatch(r"[\w.-]+(/[\w.-]+)*", name) is not None
        and all(plain_file_name(part) for part in name.split("/"))
    )


def _regular_file(d: Path, name: str) -> str | None:
    """Why d/name is not a regular file of the checkpoint, or None."""
    p = d / name
    try:
        st = os.lstat(p)
    except OSError:
        return f"{name} is missing"
    if not stat.S_ISREG(st.st_mode):
        return f"{name} is not a regular file (a link, a directory or a device)"
    if not p.resolve().is_relative_to(d.resolve()):
        return f"{name} lies outside the checkpoint directory (through a link)"
    return None


class _NotRegular(OSError):
    """A checkpoint file that is a link, a FIFO, a device or a directory (never opened, never read)."""


def _read_own_file(d: Path, name: str, limit: int | None = None) -> bytes:
    """The bytes of d/name if it is a regular file of the checkpoint directory itself.

    A checkpoint is read only where it was written: no link (to a file or through a directory), and
    nothing that is not a regular file — a FIFO's open would wait for a writer forever, so it is stat'ed
    first and opened non-blocking, and the open descriptor is checked again."""
    why = _regular_file(d, name)
    if why:
        raise _NotRegular(why)
    fd = os.open(d / name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _NotRegular(f"{name} is not a regular file (a link, a directory or a device)")
        if limit is not None and st.st_size > limit:
            raise _NotRegular(f"{name} is larger than {limit} bytes (qlaunch writes far less)")
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read()
    finally:
        os.close(fd)


def _read_meta(d: Path) -> tuple[dict[str, Any] | None, str]:
    try:
        meta = json.loads(_read_own_file(d, META, _MAX_SMALL_FILE))
    except _NotRegular as err:
        return None, str(err)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        return None, f"unreadable {META} ({type(err).__name__})"
    if not isinstance(meta, dict):
        return None, f"{META} is not a JSON object"
    files, sums, world = meta.get("files", {}), meta.get(CHECKSUMS, {}), meta.get("world_size", 1)
    if not isinstance(files, dict) or not all(_plain_relative(k) and type(v) is int for k, v in files.items()):
        return None, f"{META}: 'files' is not a map of file names inside the checkpoint to sizes"
    if not isinstance(sums, dict) or not all(_plain_relative(k) and isinstance(v, str) for k, v in sums.items()):
        return None, f"{META}: '{CHECKSUMS}' is not a map of file names inside the checkpoint to digests"
    if type(world) is not int or not 0 < world <= _MAX_WORLD:
        return None, f"{META}: 'world_size' is not a positive integer"
    return meta, ""


def _stray_entry(d: Path, listed: set[str] | None) -> str | None:
    """Why the directory holds something a resume must not read, or None: a link or anything but a regular
    file or directory anywhere in it, or (`listed`: the files meta.json has checksums for) a file it does
    not list, which a rank would otherwise load unverified."""
    for top, dirs, names in os.walk(d, followlinks=False):
        rel = Path(top).relative_to(d)
        for name in sorted(dirs):
            if os.path.islink(Path(top) / name):
                return f"{rel / name} is a link (a checkpoint is read only where it was written)"
        for name in sorted(names):
            key = str(rel / name)
            why = _regular_file(d, key)
            if why:
                return why
            if listed is not None and key not in (META, COMPLETE) and key not in listed:
                return f"{key} is not listed in {META} (a file without a recorded checksum is never loaded)"
    return None


def is_complete(d: Path, checksums: bool = True) -> tuple[bool, str]:
    """(usable?, why not) for one checkpoint directory; `checksums=False` checks sizes only (cheap)."""
    if d.is_symlink():
        return False, "the checkpoint directory is a link (a checkpoint is read only where it was written)"
    if not os.path.lexists(d / COMPLETE):
        return False, "no COMPLETE marker (interrupted while saving)"
    why = _regular_file(d, COMPLETE)
    if why:
        return False, why
    meta, why = _read_meta(d)
    if meta is None:
        return False, why
    for name in {**meta.get("files", {}), **meta.get(CHECKSUMS, {})}:
        why = _regular_file(d, name)
        if why:
            return False, why
    for name, size in meta.get("files", {}).items():
        actual = (d / name).stat().st_size
        if actual != size:
            return False, f"{name} has {actual} bytes, {size} were written"
    why = _stray_entry(d, set(meta[CHECKSUMS]) if meta.get(CHECKSUMS) else None)
    if why:
        return False, why
    missing = missing_rank_files(d, meta.get("world_size", 1))
    if missing:
        return False, f"{missing} is missing (a rank's shard never reached this directory)"
    if not (d / "dcp").is_dir() and not (d / "deepspeed").is_dir():
        return False, "neither dcp/ nor deepspeed/ is there (the weights and optimizer state are missing)"
    if (d / "dcp").is_dir() and not (d / "dcp" / ".metadata").is_file():
        return False, "dcp/.metadata is missing"
    if checksums:
        for name, digest in meta.get(CHECKSUMS, {}).items():
            if sha256(d / name) != digest:
                return False, f"{name} does not match the checksum recorded when it was saved (corrupted since)"
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


def first_usable(candidates: list[Path], warn=print, label=lambda d: d.name) -> tuple[Path | None, list[str]]:
    """The first usable checkpoint of `candidates` (newest first), and 'NAME (why)' for each one skipped
    before it; each skipped one is also warned about."""
    skipped = []
    for d in candidates:
        ok, why = is_complete(d)
        if ok:
            return d, skipped
        warn(f"warning: skipping checkpoint {label(d)}: {why}")
        skipped.append(f"{label(d)} ({why})")
    return None, skipped


def newest_complete(root: Path, warn=print) -> Path | None:
    return first_usable(list(reversed(list_checkpoints(root))), warn)[0]


def _listing(skipped: list[str]) -> str:
    return "; ".join(skipped[:3]) + (f"; and {len(skipped) - 3} more" if len(skipped) > 3 else "")


def looks_like_checkpoint(p: Path) -> bool:
    """A checkpoint directory (step_N/), as opposed to a run directory, whether usable or not."""
    return (p / COMPLETE).is_file() or (p / META).is_file()


def find_resume_target(arg: str, runs_dir: Path, name: str, warn=print) -> Path | None:
    """--resume auto | RUN_DIR | CHECKPOINT_DIR -> a complete checkpoint directory (launching process).

    'auto' with no checkpoint yet returns None (start fresh): a job preempted before its first
    checkpoint, then requeued with --resume auto, must start rather than fail. Checkpoints that exist but
    are all unusable are an error: starting at step 0 would silently discard the run."""
    if arg == "auto":
        # Newest by the time it was saved, not by directory name: run directories are named by timestamp
        # or, for multi-node runs, by job id, and the two do not sort together.
        found = [d for ck in (runs_dir / name).glob(f"*/{CHECKPOINTS_DIR}") for d in list_checkpoints(ck)]
        if not found:
            return None
        newest_first = sorted(found, key=_saved_at, reverse=True)
        d, skipped = first_usable(newest_first, warn, label=lambda d: f"{d.parent.parent.name}/{d.name}")
        if d is None:
            raise UserError(
                f"--resume auto: {len(found)} checkpoint(s) of {name} under {runs_dir / name}, none usable: "
                f"{_listing(skipped)}; resume from a run or checkpoint directory, or start without --resume"
            )
        return d.resolve()
    p = Path(arg)
    if looks_like_checkpoint(p):
        if p.is_symlink():
            raise UserError(
                f"--resume {arg}: the checkpoint directory is a link; qlaunch reads a checkpoint only where it "
                f"lies (name {p.resolve()} itself if you trust it)"
            )
        ok, why = is_complete(p)
        if not ok:
            raise UserError(f"--resume {arg}: not a usable checkpoint ({why})")
        return p.resolve()
    if (p / CHECKPOINTS_DIR).is_dir():
        if (p / CHECKPOINTS_DIR).is_symlink():
            raise UserError(
                f"--resume {arg}: {p / CHECKPOINTS_DIR} is a link; a run's checkpoints are read only where it wrote "
                "them (resume from the checkpoint directory itself)"
            )
        d, skipped = first_usable(list(reversed(list_checkpoints(p / CHECKPOINTS_DIR))), warn)
        if d is None:
            detail = _listing(skipped) if skipped else "it saved none; set checkpoint.every_steps"
            raise UserError(f"--resume {arg}: the run has no complete checkpoint ({detail})")
        return d.resolve()
    raise UserError(
        f"--resume {arg}: not a run directory or checkpoint directory (use auto, RUN_DIR or CHECKPOINT_DIR)"
    )


def _saved_at(d: Path) -> float:
    try:
        return float(json.loads(_read_own_file(d, META, _MAX_SMALL_FILE))["time"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        pass
    for p in (d / COMPLETE, d):
        try:
            return p.stat().st_mtime
        except OSError:
            pass
    return 0.0


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# Every fingerprint qlaunch ever wrote has these (the oldest as whole sections: "lora": {...}); one without
# them cannot be compared with the recipe, and comparing nothing would call every change compatible.
_FINGERPRINT_CORE = ("model.path", "lora.", "train.lr", "train.seed", "parallel.backend")


def _fingerprint_gap(saved: Any) -> str | None:
    if not isinstance(saved, dict):
        return f"{META} has no recipe fingerprint object"
    keys = flatten(saved)
    gaps = [k.rstrip(".") for k in _FINGERPRINT_CORE if not any(f == k or f.startswith(k) for f in keys)]
    return f"{META}'s recipe fingerprint lacks {', '.join(gaps)}" if gaps else None


def check_compatible(ckpt: Path, recipe: Recipe) -> None:
    """Refuse a resume whose recipe changes the math; allow the harmless keys (HARMLESS_KEYS)."""
    meta, why = _read_meta(ckpt)
    if meta is None:
        raise UserError(f"--resume {ckpt}: {why}")
    gap = _fingerprint_gap(meta.get("fingerprint"))
    if gap:
        raise UserError(
            f"--resume {ckpt}: {gap}, so it cannot be checked against the recipe; "
            "resume only from a checkpoint qlaunch wrote, or start a new run"
        )
    changed = math_changes(meta["fingerprint"], recipe)
    if changed:
        detail = "; ".join(f"{k}: {_short(old)} -> {_short(new)}" for k, old, new in changed[:3])
        more = f"; and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise UserError(
            f"--resume {ckpt}: the recipe changes the math of the run ({detail}{more}); "
            "resume with the original values or start a new run"
        )


def _lr_schedule_keys() -> set[str]:
    """The keys of qlaunch's LambdaLR state as meta.json keeps it (they vary with the torch version)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    state = torch.optim.lr_scheduler.LambdaLR(opt, lambda _step: 1.0).state_dict()
    return set(state) - {"lr_lambdas"}


def _number(v: Any) -> bool:
    return type(v) in (int, float, bool) and (type(v) is not float or math.isfinite(v))


def checked_meta(ckpt: Path, schedule_keys: set[str]) -> dict[str, Any]:
    """meta.json as load() uses it: a step number and the lr schedule's own counters, nothing else in them."""
    meta, why = _read_meta(ckpt)
    if meta is None or type(meta.get("step")) is not int or meta["step"] < 0:
        raise UserError(f"checkpoint {ckpt}: {why or f'{META} has no step number'}")
    scheduler = meta.get("scheduler")
    # LambdaLR.load_state_dict copies every key into the scheduler object: only its own keys may come in,
    # holding numbers or lists of numbers (one per parameter group).
    if (
        not isinstance(scheduler, dict)
        or set(scheduler) != schedule_keys
        or not all(_number(v) or (type(v) is list and all(map(_number, v))) for v in scheduler.values())
    ):
        raise UserError(f"checkpoint {ckpt}: {META} 'scheduler' is not the state of qlaunch's lr schedule")
    return meta


def _rank_file(ckpt: Path, meta: dict[str, Any], name: str) -> bytes:
    """A small per-rank file, read once (so what is checked is what is loaded) and verified if listed."""
    sums = meta.get(CHECKSUMS) or {}
    if sums and name not in sums:
        raise UserError(
            f"checkpoint {ckpt}: {name} is not listed in {META} (a file without a recorded checksum is never loaded)"
        )
    try:
        data = _read_own_file(ckpt, name, _MAX_SMALL_FILE)
    except _NotRegular as err:
        raise UserError(f"checkpoint {ckpt}: {err}") from None
    except OSError as err:
        raise UserError(f"checkpoint {ckpt}: cannot read {name} ({err.strerror or type(err).__name__})") from None
    if sums and hashlib.sha256(data).hexdigest() != sums[name]:
        raise UserError(f"checkpoint {ckpt}: {name} does not match the checksum recorded when it was saved")
    return data


def rng_states(ckpt: Path, meta: dict[str, Any], rank: int) -> tuple[dict[str, torch.Tensor], tuple]:
    """Rank `rank`'s (torch RNG states, Python random state), each checked by a throwaway generator."""
    pt, py = (_rank_file(ckpt, meta, n) for n in (f"rng_rank{rank}.pt", f"python_rng_rank{rank}.json"))
    try:
        with warnings.catch_warnings():  # torch warns about a crafted file's pickle protocol: not one line
            warnings.simplefilter("ignore")
            rng = torch.load(io.BytesIO(pt), weights_only=True)
        if not isinstance(rng, dict) or "torch" not in rng or not set(rng) <= {"torch", "cuda"}:
            raise ValueError("not a map of RNG states")
        if not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in rng.values()):
            raise TypeError("an RNG state is not a byte tensor")
        torch.Generator().set_state(rng["torch"])
        state = json.loads(py)
        state = (state[0], tuple(state[1]), state[2])
        random.Random().setstate(state)
    except Exception as err:  # noqa: BLE001 - weights_only refusals, malformed JSON, wrong shapes: its message may quote bytes
        raise UserError(
            f"checkpoint {ckpt}: rank {rank}'s RNG state is not one qlaunch wrote ({type(err).__name__})"
        ) from None
    return rng, state


def check_loadable(ckpt: Path) -> None:
    """What the ranks will read, checked before any is spawned (they check it again when they load):
    meta.json's step and schedule, every rank's RNG files, the DCP metadata and every entry of its shards."""
    meta = checked_meta(ckpt, _lr_schedule_keys())
    for r in range(meta["world_size"]):
        rng_states(ckpt, meta, r)
    if (ckpt / "dcp").is_dir():
        from launcher.rank import safe_dcp

        safe_dcp.check_entries(ckpt / "dcp")  # the metadata, then every entry of every shard
