"""Following a run from the launching terminal: tails rank 0's metrics.jsonl.

Plain lines when stdout is not a terminal (CI, `| tee`): no control codes ever reach a log file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from launcher.rundir import RunDir


def tail_jsonl(path: Path, proc: subprocess.Popen, poll: float = 0.2) -> Iterator[dict]:
    """Yield records as they are appended, until the process exits and the file is drained."""
    pos = 0
    buf = ""
    while True:
        done = proc.poll() is not None
        if path.exists():
            with open(path) as fh:
                fh.seek(pos)
                chunk = fh.read()
                pos = fh.tell()
            buf += chunk
            *lines, buf = buf.split("\n")
            for line in lines:
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        continue
        if done:
            return
        time.sleep(poll)


def format_event(e: dict) -> str | None:
    ev = e.get("event")
    if ev == "step":
        mem = (
            f" gpu {e['gpu_reserved_gb']:.1f}GiB"
            if "gpu_reserved_gb" in e
            else f" rss {e.get('host_rss_gb', 0):.2f}GiB"
        )
        return (
            f"step {e['step']}/{e['total_steps']}  loss {e['loss']:.4f}  lr {e['lr']:.2e}  "
            f"grad {e.get('grad_norm', 0):.3f}  {e['tokens_per_s_per_gpu']:.0f} tok/s/gpu{mem}"
        )
    if ev == "eval":
        return f"eval  step {e['step']}  loss {e['eval_loss']:.4f}"
    if ev == "loaded":
        return f"model loaded in {e['seconds']:.1f}s ({e['bytes_read'] / 2**20:.1f} MiB read by rank 0)"
    if ev == "start":
        return f"training {e['total_steps']} steps on {e['world']} rank(s); first step {e['first_step_after_s']:.1f}s after spawn"
    if ev == "adapter":
        return f"adapter saved: {e['path']}"
    if ev == "checkpoint":
        return f"checkpoint saved: {e['path']}"
    if ev == "done":
        return "done"
    return None


def follow_plain(run: RunDir, proc: subprocess.Popen, out=None) -> None:
    out = out or sys.stdout
    for e in tail_jsonl(run.metrics, proc):
        line = format_event(e)
        if line:
            print(line, file=out, flush=True)


def follow(run: RunDir, proc: subprocess.Popen) -> None:
    follow_plain(run, proc)
