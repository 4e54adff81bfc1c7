"""Following a run from the launching terminal: tails rank 0's metrics.jsonl.

A rich live view when stdout is a terminal; plain lines otherwise (CI, `| tee`), so no control codes ever
reach a log file. Both are driven by the same `RunState`, folded from the events only (never the wall
clock, except the elapsed time the live view adds), so a recorded stream renders the same text every time.
The events and their plain lines: launcher/progress.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from launcher.errors import UserError
from launcher.progress import (
    RunState,
    fmt_duration,
    fmt_peaks,
    loaded_text,
    loading_text,
    orpo_text,
    plain_lines,
    preference_text,
    rewards_text,
    update,
)
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


def read_jsonl(path: Path) -> list[dict]:
    """Every complete record of a metrics file (a torn last line, from a killed run, is skipped)."""
    out = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def render(st: RunState, now: float | None = None):
    """The live view's renderable for a state; `now` adds the elapsed time (left out in snapshots)."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    rows: list[tuple[str, Any]] = []
    head = st.title or "qlaunch"
    if now is not None and st.first_time is not None:
        head += f"  (elapsed {fmt_duration(now - st.first_time)})"
    if st.phase == "starting":
        rows.append(("status", Text("starting ranks, waiting for rank 0 ...")))
    if st.load_start is not None:
        if st.load_seconds is None:
            done = st.load_layer or 0
            bar: Any = Text("")
            if st.layers:
                bar = Table.grid(padding=(0, 1))
                bar.add_row(ProgressBar(total=st.layers, completed=done, width=30), Text(loading_text(st)))
            else:
                bar = Text(loading_text(st) or "...")
            rows.append(("loading", bar))
        else:
            rows.append(("loaded", Text(f"model in {loaded_text(st)}")))
    if st.data_start is not None:
        if st.data_seconds is None:
            count = f" {st.count[0]}/{st.count[1]}" if st.count else ""
            rows.append(("data", Text(f"tokenizing ...{count}")))
        else:
            rows.append(("data", Text(f"ready in {st.data_seconds:.1f}s")))
    if st.first_step_after_s is not None:
        rows.append(("first step", Text(f"{st.first_step_after_s:.1f}s after spawn, {st.world} rank(s)")))
    if st.total_steps:
        s = st.step
        done = s["step"] if s else 0
        grid = Table.grid(padding=(0, 1))
        eta = st.eta()
        tail = f"{done}/{st.total_steps}  {100 * done / st.total_steps:3.0f}%"
        if eta is not None and done < st.total_steps:
            tail += f"  ETA {fmt_duration(eta)}"
        grid.add_row(ProgressBar(total=st.total_steps, completed=done, width=40), Text(tail))
        rows.append(("steps", grid))
        if s:
            loss = f"{s['loss']:.4f}"
            if st.eval_loss is not None:
                loss += f"   eval {st.eval_loss:.4f} (step {st.eval_step})"
            rows.append(("loss", Text(loss)))
            rows.extend(_preference_rows(s, st.eval))
            rows.append(("lr", Text(f"{s['lr']:.2e}   grad norm {s.get('grad_norm', 0):.3f}")))
            tps = s.get("tokens_per_s")
            per = s.get("tokens_per_s_per_gpu", 0)
            speed = f"{tps:,.0f} total, " if tps is not None else ""
            step_t = f"   {s['step_time_s']:.2f} s/step" if "step_time_s" in s else ""
            unit = "GPU" if st.per == "gpu" else "rank"
            rows.append(("tokens/s", Text(f"{speed}{per:,.0f} per {unit}{step_t}")))
    if st.peaks:
        rows.append(("peak memory", Text(fmt_peaks(st))))
    if st.checkpointing_since is not None:
        rows.append(("checkpoint", Text("writing ...")))
    elif st.checkpoint:
        took = f" in {st.checkpoint['seconds']:.1f}s" if "seconds" in st.checkpoint else ""
        rows.append(("checkpoint", Text(f"#{st.checkpoints}{took}: {st.checkpoint.get('path', '')}")))
    if st.resumed:
        rows.append(("resumed", Text(f"from step {st.resumed.get('step')}: {st.resumed.get('path', '')}")))
    if st.adapter:
        rows.append(("adapter", Text(st.adapter)))
    if st.preempted:
        rows.append(("status", Text(f"stopped on request after step {st.preempted.get('step')}", style="yellow")))
    for w in st.warnings[-3:]:
        rows.append(("warning", Text(w, style="yellow")))
    if st.done:
        rows.append(("status", Text("done", style="bold green")))
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    return Group(Text(head, style="bold cyan"), table)


def _preference_rows(step: dict, eval_event: dict | None) -> list[tuple[str, Any]]:
    """The panel rows a preference run adds under the loss (none for SFT)."""
    from rich.text import Text

    rows: list[tuple[str, Any]] = []
    rewards = rewards_text(step)
    if rewards:
        rows.append(("rewards", Text(rewards)))
    orpo = orpo_text(step)
    if orpo:
        rows.append(("orpo", Text(orpo)))
    if eval_event:
        evals = preference_text(eval_event, "eval_")
        if evals:
            rows.append(("eval rewards", Text(f"{evals} (step {eval_event.get('step')})")))
    return rows


class _LiveView:
    """Re-rendered by rich on every refresh (its own thread), so the elapsed time moves between events;
    the lock keeps a refresh from reading the state half-updated."""

    def __init__(self, st: RunState):
        self.st = st
        self.lock = threading.Lock()

    def update(self, e: dict) -> None:
        with self.lock:
            update(self.st, e)

    def __rich__(self):
        with self.lock:
            return render(self.st, time.time())


def _state_for(run: RunDir) -> RunState:
    st = RunState()
    try:
        plan = run.load_plan().plan
        st.layers = (plan.memory or {}).get("layers") or None
        st.title = f"{run.path.parent.name}/{run.path.name}  {plan.backend} x {plan.world_size} ({plan.device})"
    except (OSError, UserError):
        st.title = run.path.name
    return st


def follow_plain(run: RunDir, proc: subprocess.Popen, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    for line in plain_lines(tail_jsonl(run.metrics, proc), _state_for(run)):
        print(line, file=out, flush=True)


def follow_live(run: RunDir, proc: subprocess.Popen, console=None) -> None:
    from rich.console import Console
    from rich.live import Live

    console = console or Console()
    view = _LiveView(_state_for(run))
    with Live(view, console=console, refresh_per_second=4, transient=False):
        for e in tail_jsonl(run.metrics, proc):
            view.update(e)


def follow(run: RunDir, proc: subprocess.Popen) -> None:
    """The live view on a terminal, plain lines anywhere else."""
    if sys.stdout.isatty():
        follow_live(run, proc)
    else:
        follow_plain(run, proc)
