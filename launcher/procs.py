"""Process lifetime shared by the launcher and the ranks: nothing of a run may outlive its launcher.

qlaunch starts torchrun, torchrun starts the ranks (each in a session of its own). If qlaunch is killed
outright (SIGKILL, the OOM killer, a closed SSH session), nothing tells torchrun, and a killed torchrun tells
no rank: they are reparented to init and train on, holding GPUs, for hours. Linux's parent-death signal
(prctl PR_SET_PDEATHSIG) closes both links: torchrun gets SIGKILL when qlaunch dies, and each rank gets
SIGKILL when torchrun dies. A rank's newest complete checkpoint survives that (checkpoints are atomic).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def death_signal_setter(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A function for subprocess.Popen(preexec_fn=...) that makes the child get `sig` when its parent dies.

    prctl is looked up here, in the parent: the child only calls it between fork and exec, where looking up
    symbols (which may take locks other threads of the parent held at fork) is not safe. None off Linux.
    """
    prctl = _prctl()
    if prctl is None:
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)

    return preexec


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Make this process get `sig` when its parent dies. False: the parent is gone already (exit now), or
    the platform cannot do it (then it returns True and nothing is armed)."""
    parent = os.getppid()
    prctl = _prctl()
    if prctl is None:
        return True
    prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    # The parent may have died before the signal was armed: then we have been reparented already.
    return os.getppid() == parent


KILL_GRACE_S = 45.0  # after the watch's SIGTERM: torchrun's own 30 s for its ranks, and a margin


def terminate(proc: subprocess.Popen) -> bool:
    """SIGTERM torchrun; False if it had to be killed with its ranks after KILL_GRACE_S.

    torchrun acts on SIGTERM only between Python calls: in its exit barrier it is blocked in a C++ store
    wait (up to 300 s) and does not see it. Otherwise it stops its ranks within its own grace (30 s), so
    past KILL_GRACE_S kill it, and whatever it started, outright."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=KILL_GRACE_S)
        return True
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        return False


def descendants(pid: int) -> list[int]:
    """pid and every process below it, parents first (Linux /proc; just pid without it). torch elastic
    starts its ranks in sessions of their own, so a process-group signal would miss them."""
    children: dict[int, list[int]] = {}
    try:
        procs = [d for d in Path("/proc").iterdir() if d.name.isdigit()]
    except OSError:
        return [pid]
    for d in procs:
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def kill_tree(proc: subprocess.Popen, wait: bool = True) -> None:
    """SIGKILL proc and every process below it, all collected before anything dies and is reparented."""
    for pid in reversed(descendants(proc.pid)):  # the ranks before torchrun, which could start new ones
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if wait:
        proc.wait()
