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
import sys
from collections.abc import Callable

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
