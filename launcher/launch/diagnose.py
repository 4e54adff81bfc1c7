"""After a failed run: which rank failed first and why, in one summary (torchrun's exits, rank error files,
out-of-memory advice, a full disk)."""

from __future__ import annotations

import json
import re
import shutil
import signal

from launcher.rundir import RunDir


def failure_summary(run: RunDir, tail: int = 12) -> str:
    """Which rank failed first, how (exit code or signal), its last log lines, and where the full logs are.

    A rank that dies takes the others down with it (their collectives fail, torchrun terminates them), so
    "first" is decided by cause, not only by time: a rank's own error beats a peer-lost error, and a
    rank killed by a signal (SIGKILL, SIGSEGV...) beats the survivors torchrun stopped afterwards.
    """
    launcher_log = run.launcher_log
    text = launcher_log.read_text(errors="replace") if launcher_log.exists() else ""
    exits, root = _torchrun_failures(text)
    errors: dict[int, dict] = {}
    for f in run.rank_error_files():
        try:
            e = json.loads(f.read_text())
            errors[int(e["rank"])] = e
        except (OSError, ValueError, KeyError, TypeError):
            continue
    rank = _first_failure(errors, exits, root)
    if rank is None:
        return f"training failed; see {launcher_log}"
    err = errors.get(rank, {})
    code = exits.get(rank)
    how = ""
    if code is not None:
        how = f"killed by signal {_signal_name(-code)}" if code < 0 else f"exit code {code}"
    message = err.get("message", "")
    lines = [f"rank {rank} failed first" + (f" ({how})" if how else "") + (f": {message}" if message else "")]
    others = sorted(r for r in set(exits) | set(errors) if r != rank)
    if others:
        lines.append("then stopped: " + ", ".join(f"rank {r}" + _how_short(exits.get(r)) for r in others))
    log = run.rank_log(rank)
    log_text = log.read_text(errors="replace") if log.exists() else ""
    if is_oom(message + "\n" + log_text):
        lines += oom_advice(run, log_text)
    elif code == -signal.SIGKILL:
        lines.append(
            "  SIGKILL from outside the process: often the kernel's OOM killer (host memory; see `dmesg`) "
            "or a scheduler enforcing a limit"
        )
    if log_text:
        last = [ln for ln in log_text.splitlines() if ln.strip()][-tail:]
        lines.append(f"last lines of {log}:")
        lines += ["  " + ln for ln in last]
    lines.append(f"full logs: {run.logs}/")
    return "\n".join(lines)


_OOM = re.compile(r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED|out of memory", re.I)

_GPU_TOTAL = re.compile(r"total capacity of ([\d.]+) GiB")


def _torchrun_failures(text: str) -> tuple[dict[int, int], int | None]:
    """({rank: exit code (negative = signal)}, the rank torchrun calls the root cause) from its report."""
    exits: dict[int, int] = {}
    root = None
    for block in re.split(r"\n(?=\[\d+\]:)|(?=Root Cause)", text):
        m = re.search(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", block, re.S)
        if m:
            exits[int(m.group(1))] = int(m.group(2))
            if block.lstrip().startswith("Root Cause"):
                root = int(m.group(1))
    return exits, root


def _first_failure(errors: dict[int, dict], exits: dict[int, int], root: int | None) -> int | None:
    own = [e for e in errors.values() if not is_peer_failure(e.get("message", ""))]
    if own:
        return int(min(own, key=lambda e: e.get("time", 0.0))["rank"])
    # Survivors are stopped with SIGTERM (or exit 1 from a broken collective); any other signal is a cause.
    signalled = [r for r, c in exits.items() if c < 0 and -c not in (signal.SIGTERM, signal.SIGINT) and r not in errors]
    if signalled:
        return root if root in signalled else min(signalled)
    if errors:
        return int(min(errors.values(), key=lambda e: e.get("time", 0.0))["rank"])
    return root if root is not None else (min(exits) if exits else None)


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _how_short(code: int | None) -> str:
    if code is None:
        return ""
    return f" ({_signal_name(-code)})" if code < 0 else f" (exit {code})"


def is_oom(text: str) -> bool:
    return bool(_OOM.search(text))


def oom_advice(run: RunDir, log_text: str) -> list[str]:
    """What the memory planner says about this run, and the changes it suggests (best effort: the model
    config may be unreadable from here, e.g. a hub id without network)."""
    lines = ["  out of GPU memory."]
    try:
        from launcher.launch.prepare import planner_shape
        from launcher.plan import memory
        from launcher.plan.memory_advice import suggestions

        recipe = run.load_recipe()
        plan = run.load_plan().plan
        shape = planner_shape(recipe, required=False)  # read, checked and built as the planner did
        if shape is None:
            raise ValueError("the model's config.json could not be read")
        m = _GPU_TOTAL.search(log_text)
        if m:
            gpu_mem = int(float(m.group(1)) * memory.GiB)
        elif plan.memory:
            gpu_mem = int(plan.memory["gpu_memory_gib"] * memory.GiB)
        else:
            gpu_mem = memory.DEFAULT_GPU_MEMORY
        est = memory.estimate(
            recipe,
            shape,
            plan.world_size,
            plan.micro_batch,
            plan.gradient_checkpointing,
            gpu_mem,
            plan.nproc_per_node,
        )
        # It did not fit, whatever the estimate says: ask for suggestions as if it were at the limit.
        tips = suggestions(recipe, shape, est, force=True)
        lines[0] = (
            f"  out of GPU memory: the planner estimates {est.total / memory.GiB:.1f} GiB per GPU "
            f"of {gpu_mem / memory.GiB:.3g} GiB for this plan (`qlaunch plan` shows the breakdown)."
        )
        if tips:
            lines.append("  try:")
            lines += [f"    {t}" for t in tips]
    except Exception as err:  # noqa: BLE001 - advice is optional; the failure report must still print
        lines.append(f"  (no planner advice: {type(err).__name__}: {err})")
        lines.append(
            "  try a smaller train.micro_batch, train.gradient_checkpointing = true, more GPUs, or CPU offload"
        )
    return lines


def rank_error_of(run: RunDir) -> dict | None:
    """The error record of a rank that stopped on bad input or because training diverged (kind 'user' or
    'diverged': every rank stops with the same message), if that is how the run ended."""
    for f in run.rank_error_files():
        try:
            e = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if e.get("kind") in ("user", "diverged") and isinstance(e.get("message"), str):
            return e
    return None


DISK_LOW_BYTES = 1 << 20


def disk_full(run: RunDir) -> str | None:
    """'no space left on device under RUN (0 MiB free)' when the run's disk is full, or its ranks said so.

    A full disk leaves no trace the usual report could use: the ranks cannot write their logs or error
    records, nor torchrun its report, so the free space of the run's file system is asked directly."""
    try:
        free = shutil.disk_usage(run.path).free
    except OSError:
        return None
    said = False
    for log in [run.launcher_log, *run.rank_logs().values()]:
        try:
            with open(log, "rb") as fh:
                fh.seek(max(0, log.stat().st_size - 65536))
                said = said or b"No space left on device" in fh.read()
        except OSError:
            continue
    if free >= DISK_LOW_BYTES and not said:
        return None
    return f"no space left on the device of {run.path} ({free / 2**20:.1f} MiB free): the ranks could not write"


# Errors a rank gets when another rank (or its node) went away, as opposed to failing by itself.
_PEER_ERROR = re.compile(
    r"closed by peer|reset by peer|broken pipe|remote worker|connection refused|DistNetworkError|"
    r"timed? ?out|timeout|NCCL communicator was aborted|ncclRemoteError|ncclSystemError|recvValue|"
    r"failed to recv|Connection closed|SignalException|Socket Timeout",
    re.I,
)


def is_peer_failure(message: str) -> bool:
    """Did a rank fail because a peer went away (so the real failure is elsewhere)?"""
    return bool(_PEER_ERROR.search(message or ""))


def first_rank_error(run: RunDir) -> dict | None:
    """The earliest rank*.error.json of this node's ranks ({rank, time, message, ...}), if any."""
    first = None
    for f in run.rank_error_files():
        try:
            e = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if first is None or e.get("time", 0) < first.get("time", 0):
            first = e
    return first
