"""Spawning through torch's elastic launcher, following the run, and summarising failures."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from launcher.plan import Cluster, Plan, python_cmd, torchrun_argv
from launcher.recipe import Recipe
from launcher.rundir import LAUNCH_FILE, RunDir, atomic_write


def launch_spec(recipe: Recipe, plan: Plan, cluster: Cluster, run_dir: str) -> dict:
    """argv + the environment qlaunch adds: written to launch.json and shown by --dry-run."""
    return {
        "argv": python_cmd() + torchrun_argv(recipe, plan, cluster, run_dir),
        "env": dict(plan.env),
        "cwd": os.getcwd(),
    }


def spawn(run: RunDir, spec: dict, follow) -> int:
    """Run torchrun as a child; `follow(run, proc)` shows progress until it exits. Returns its exit code."""
    atomic_write(run.path / LAUNCH_FILE, json.dumps(spec, indent=2) + "\n")
    env = {**os.environ, **spec["env"], "QLAUNCH_SPAWN_TIME": str(time.time()), "PYTHONUNBUFFERED": "1"}
    # The project root on PYTHONPATH so `-m launcher.worker` resolves even when qlaunch is not installed.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(run.logs / "launcher.log", "ab") as log:
        proc = subprocess.Popen(spec["argv"], stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)

        def forward(signum, _frame):
            # torchrun forwards SIGTERM to every worker (preemption); SIGINT reaches it through the tty.
            if proc.poll() is None:
                proc.send_signal(signum)

        old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            follow(run, proc)
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            rc = proc.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    return rc


def failure_summary(run: RunDir, tail: int = 12) -> str:
    """Which rank failed first, how, its last log lines, and where the full logs are."""
    first = None
    for f in run.logs.glob("rank*.error.json"):
        try:
            e = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if first is None or e["time"] < first["time"]:
            first = e
    how = ""
    launcher_log = run.logs / "launcher.log"
    text = launcher_log.read_text(errors="replace") if launcher_log.exists() else ""
    m = re.search(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", text, re.S)
    if first is None and m:
        first = {"rank": int(m.group(1)), "message": ""}
    if m and first is not None and int(m.group(1)) == first["rank"]:
        code = int(m.group(2))
        how = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    if first is None:
        return f"training failed; see {launcher_log}"
    rank = first["rank"]
    lines = [
        f"rank {rank} failed first"
        + (f" ({how})" if how else "")
        + (f": {first['message']}" if first["message"] else "")
    ]
    log = run.rank_log(rank)
    if log.exists():
        last = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-tail:]
        lines.append(f"last lines of {log}:")
        lines += ["  " + ln for ln in last]
    lines.append(f"full logs: {run.logs}/")
    return "\n".join(lines)


def user_error_of(run: RunDir) -> str | None:
    """A worker's one-line user error (e.g. a bad data file found at load time), if that is what failed."""
    for f in sorted(run.logs.glob("rank*.error.json")):
        try:
            e = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if e.get("kind") == "user":
            return e["message"]
    return None
