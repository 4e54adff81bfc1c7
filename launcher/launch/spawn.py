"""Spawning through torch's elastic launcher, following the run, and summarising failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from launcher.atomic import atomic_write
from launcher.errors import EXIT_ABORTED
from launcher.plan.plan import WATCH_PORT_OFFSET, Cluster, Plan, python_cmd, torchrun_argv
from launcher.plan.recipe import Recipe
from launcher.procs import death_signal_setter, kill_tree, terminate
from launcher.rundir import RunDir

STOP_GRACE_S = 90.0


def launch_spec(recipe: Recipe, plan: Plan, cluster: Cluster, run_dir: str, node: str | None = None) -> dict:
    """argv + the environment qlaunch adds: written to launch.json and shown by --dry-run. `node`: this
    node's name in a shared run directory (the workers' second argument: where their logs go)."""
    return {
        "argv": python_cmd() + torchrun_argv(recipe, plan, cluster, run_dir) + ([node] if node else []),
        "env": dict(plan.env),
        "cwd": os.getcwd(),
        # --- multinode: what the ranks and the node watch do across nodes (the env above has NCCL's part)
        "distributed": distributed_settings(recipe, plan, cluster),
    }


def spawn(run: RunDir, spec: dict, follow) -> int:
    """Run torchrun as a child; `follow(run, proc)` shows progress until it exits. Returns its exit code,
    or EXIT_ABORTED when a second Ctrl-C killed the run."""
    atomic_write(run.launch_file, json.dumps(spec, indent=2) + "\n")
    env = {**os.environ, **spec["env"], "QLAUNCH_SPAWN_TIME": str(time.time()), "PYTHONUNBUFFERED": "1"}
    # The project root on PYTHONPATH so `-m launcher.rank.worker` resolves even when qlaunch is not installed:
    # the package this qlaunch runs from, never the current directory (the plan's env sets PYTHONSAFEPATH).
    root = str(Path(__file__).resolve().parents[2])
    # An empty entry (PYTHONPATH=":x", "x:") means the current directory: dropped, as safe-path mode intends.
    kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([root, *kept])
    with open(run.launcher_log, "ab") as log:
        # The stop handlers come first: a signal arriving while torchrun starts is a stop request the ranks
        # see at their first step boundary, never a qlaunch killed with its child half-started.
        stopper = Stopper(run)
        old = {s: signal.signal(s, stopper.on_signal) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
        try:
            # SLURM signals every process of a job step, torchrun included, and SIGUSR1's default action would
            # kill torchrun while its ranks save their checkpoint (qlaunch then saw a failure, not a
            # preemption). The child inherits "ignore" (signal dispositions survive exec only as ignore or
            # default); the ranks install their own handler (session.StopRequest).
            stopper.proc = subprocess.Popen(
                spec["argv"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                stdin=subprocess.DEVNULL,
                # A session of its own: a Ctrl-C at the terminal goes to the foreground process group, and
                # torchrun would pass it to the ranks as a crash (a KeyboardInterrupt in some collective).
                # qlaunch alone gets it and turns it into a stop request (Stopper).
                start_new_session=True,
                # Killed with qlaunch: a SIGKILLed qlaunch must not leave torchrun and its ranks training.
                preexec_fn=_child_setup,
            )
            if stopper.aborted:  # a second Ctrl-C while torchrun was starting
                kill_tree(stopper.proc, wait=False)
            follow(run, stopper.proc)
            rc = stopper.proc.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    return EXIT_ABORTED if stopper.aborted else rc


_DIE_WITH_PARENT = death_signal_setter()


def _child_setup() -> None:
    """torchrun's first moments (between fork and exec): die with qlaunch, and take SIGUSR1 as ignored (see
    spawn); qlaunch's own handlers must not run in the child."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if _DIE_WITH_PARENT is not None:
        _DIE_WITH_PARENT()


class Stopper:
    """SIGTERM, SIGUSR1 and a first Ctrl-C ask the ranks to checkpoint at the next step boundary and exit
    (qlaunch then exits 75); a second Ctrl-C kills torchrun and every rank at once.

    The request goes through a file the ranks check at every step boundary (session.StopRequest).
    Signalling torchrun instead would make it kill the workers 30 s later, mid-save. If the ranks have not
    finished within STOP_GRACE_S (a hung collective, a long load), torchrun's own shutdown follows."""

    def __init__(self, run: RunDir):
        self.run = run
        self.proc: subprocess.Popen | None = None  # set once torchrun is started
        self.requested = False
        self.aborted = False

    def on_signal(self, signum: int, _frame) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            return
        if signum == signal.SIGINT and self.requested:
            self.aborted = True
            print("qlaunch: second Ctrl-C: killing the ranks now", file=sys.stderr, flush=True)
            if self.proc is not None:
                kill_tree(self.proc, wait=False)
            return
        if self.requested:
            return
        self.requested = True
        self.run.stop_file.touch()
        if signum == signal.SIGINT:
            print(
                "qlaunch: stopping: the ranks save a checkpoint at the next step boundary "
                "(Ctrl-C again to abort at once)",
                file=sys.stderr,
                flush=True,
            )
        fallback = threading.Timer(STOP_GRACE_S, self._fallback)
        fallback.daemon = True  # must not keep qlaunch alive once the ranks are done
        fallback.start()

    def _fallback(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            terminate(self.proc)


def distributed_settings(recipe: Recipe, plan: Plan, cluster: Cluster) -> dict:
    """Cross-rank settings that are not torchrun flags or env, recorded in launch.json."""
    out: dict = {
        "backend": plan.dist_backend,
        "collective_timeout_s": plan.collective_timeout_s,
        "mesh": (
            {"replicate": plan.nnodes, "shard": plan.nproc_per_node}
            if plan.hybrid_shard
            else ({"shard": plan.world_size} if plan.backend == "fsdp" else None)
        ),
    }
    if plan.nnodes > 1 or cluster.rdzv_endpoint:
        if cluster.rdzv_endpoint:
            host, _, port = cluster.rdzv_endpoint.rpartition(":")
            out["node_watch"] = f"{host}:{int(port) + WATCH_PORT_OFFSET}"
        elif recipe.launch.master_port:
            out["node_watch"] = f"{cluster.master_addr}:{recipe.launch.master_port + WATCH_PORT_OFFSET}"
    return out
