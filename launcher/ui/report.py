"""`qlaunch report RUN_DIR`: PNG plots of a run's metrics and a summary table, after (or during) the run.

Reads only the run directory (metrics.jsonl, checkpoints/, adapter/, logs/), so it works on a copy of a
run dir on a laptop as well as on the training host.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.errors import UserError
from launcher.progress import fmt_duration
from launcher.rank.sinks import PREFERENCE_FIELDS
from launcher.rundir import METRICS_FILE, RunDir
from launcher.safe_files import open_regular

# What `qlaunch report` reads of each event, and what it must be. metrics.jsonl may come from a crashed run
# (its last line cut short) or a tampered copy: an event that breaks these rules is skipped and counted,
# never a traceback. Loss and lr may be NaN or infinite (a diverged run logs them); times may not.
INT, NUMBER, TEXT, NUMBERS = "an integer", "a number", "a string", "a list of numbers"
SAMPLES = "a list of {prompt, completion} strings"

COMMON_FIELDS: dict[str, tuple[str, bool]] = {
    "event": (TEXT, True),
    "time": (NUMBER, True),
    "total_steps": (INT, False),
}

EVENT_FIELDS: dict[str, dict[str, tuple[str, bool]]] = {
    "step": {
        "step": (INT, True),
        "loss": (NUMBER, True),
        "lr": (NUMBER, True),
        "tokens_per_s": (NUMBER, False),
        "tokens_per_s_per_gpu": (NUMBER, False),
        "gpu_reserved_gb": (NUMBER, False),
        "host_rss_gb": (NUMBER, False),
        "rank_gpu_reserved_gb": (NUMBERS, False),
        "rank_host_rss_gb": (NUMBERS, False),
        **{name: (NUMBER, False) for name in PREFERENCE_FIELDS},  # dpo / orpo runs only
    },
    "eval": {
        "step": (INT, True),
        "eval_loss": (NUMBER, True),
        **{f"eval_{name}": (NUMBER, False) for name in PREFERENCE_FIELDS},
    },
    "loading": {"phase": (TEXT, False)},
    "loaded": {"seconds": (NUMBER, False), "bytes_read": (NUMBER, False)},
    "start": {"first_step_after_s": (NUMBER, False)},
    "checkpoint": {"path": (TEXT, True)},
    "adapter": {"path": (TEXT, True)},
    "samples": {"step": (INT, True), "samples": (SAMPLES, True)},
}

_MAX_INT = 2**63  # beyond any step or byte count; also what a float can take without overflowing

_MAX_TIME = 1e12  # seconds since 1970: ~31,700 years; keeps differences of times finite


def _fits(value: Any, kind: str) -> bool:
    if isinstance(value, bool):
        return False
    if kind == INT:
        return isinstance(value, int) and abs(value) < _MAX_INT
    if kind == NUMBER:
        return isinstance(value, float) or (isinstance(value, int) and abs(value) < _MAX_INT)
    if kind == NUMBERS:
        return isinstance(value, list) and all(_fits(v, NUMBER) for v in value)
    if kind == SAMPLES:
        return isinstance(value, list) and all(
            isinstance(v, dict) and isinstance(v.get("prompt"), str) and isinstance(v.get("completion"), str)
            for v in value
        )
    return isinstance(value, str)


def event_problem(event: Any) -> str | None:
    """Why a parsed metrics line is not an event this report can use (None: it is)."""
    if not isinstance(event, dict):
        return "not a JSON object"
    rules = {**COMMON_FIELDS, **EVENT_FIELDS.get(event.get("event"), {})}  # type: ignore[arg-type]
    for key, (kind, required) in rules.items():
        if key not in event:
            if required:
                return f"no {key}"
        elif not _fits(event[key], kind):
            return f"{key} is not {kind}"
    t = event["time"]
    if not (math.isfinite(t) and abs(t) < _MAX_TIME):
        return "time is not a finite time"
    return None


def parse_events(text: str) -> tuple[list[dict], int]:
    """(the usable events of a metrics.jsonl text, in order; how many non-blank lines were skipped)."""
    events, skipped = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except (ValueError, RecursionError):  # torn, not JSON, a number of 5000 digits, nested too deeply
            skipped += 1
            continue
        if event_problem(event) is None:
            events.append(event)
        else:
            skipped += 1
    return events, skipped


def read_events(path: Path) -> tuple[list[dict], int]:
    """parse_events of a metrics file (a regular file: a FIFO in its place must not block the report)."""
    fd = open_regular(path, "metrics file")
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read()
    except OSError as err:
        raise UserError(f"{path}: cannot read the metrics file ({err.strerror})") from None
    finally:
        os.close(fd)
    return parse_events(raw.decode("utf-8", errors="replace"))  # a bad byte spoils its own line only


def find_run(path: str | Path) -> RunDir:
    """A run directory, or the newest run under a runs/<name>/ directory."""
    p = Path(path)
    if (p / METRICS_FILE).is_file():
        return RunDir(p)
    if p.is_dir():
        runs = sorted(d for d in p.iterdir() if (d / METRICS_FILE).is_file())
        if runs:
            return RunDir(runs[-1])
    raise UserError(f"{path}: no {METRICS_FILE} here (give a run directory such as runs/<name>/<timestamp>)")


@dataclass
class Series:
    """The numbers a run reported, one list per quantity (x = optimizer step)."""

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    tps: list[float] = field(default_factory=list)
    tps_gpu: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    mem: dict[int, list[float]] = field(default_factory=dict)  # rank -> peak GiB at each step
    mem_kind: str = ""
    per: str = "rank"  # one rank in per-rank figures: "GPU" where the ranks report GPU memory
    # A preference run's numbers: field (eval ones prefixed eval_) -> (steps, values); empty for SFT.
    prefs: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)


def preference_series(events: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """(steps, values) of each preference number the run reported: the train ones from step events, the
    eval_ ones from eval events; only the fields that are there (none for an SFT run)."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for e in events:
        prefix = {"step": "", "eval": "eval_"}.get(e.get("event"))  # type: ignore[arg-type]
        if prefix is None:
            continue
        for name in PREFERENCE_FIELDS:
            if e.get(prefix + name) is not None:
                steps, values = out.setdefault(prefix + name, ([], []))
                steps.append(int(e["step"]))
                values.append(float(e[prefix + name]))
    return out


def series(events: list[dict]) -> Series:
    s = Series()
    gpu = any("gpu_reserved_gb" in e or "rank_gpu_reserved_gb" in e for e in events if e.get("event") == "step")
    many, one = ("rank_gpu_reserved_gb", "gpu_reserved_gb") if gpu else ("rank_host_rss_gb", "host_rss_gb")
    s.mem_kind = "peak GPU memory reserved" if gpu else "peak host memory (RSS)"
    s.per = "GPU" if gpu else "rank"
    for e in events:
        ev = e.get("event")
        if ev == "step":
            s.steps.append(int(e["step"]))
            s.loss.append(float(e["loss"]))
            s.lr.append(float(e["lr"]))
            s.tps.append(float(e.get("tokens_per_s", 0.0)))
            s.tps_gpu.append(float(e.get("tokens_per_s_per_gpu", 0.0)))
            values = e.get(many) or ([e[one]] if one in e else [])
            for r, v in enumerate(values):
                s.mem.setdefault(r, []).append(float(v))
        elif ev == "eval":
            s.eval_steps.append(int(e["step"]))
            s.eval_loss.append(float(e["eval_loss"]))
    s.prefs = preference_series(events)
    return s


def _last(prefs: dict[str, tuple[list[int], list[float]]], name: str) -> tuple[int, float] | None:
    steps, values = prefs.get(name, ([], []))
    return (steps[-1], values[-1]) if steps else None


def preference_summary(prefs: dict[str, tuple[list[int], list[float]]]) -> str | None:
    """The summary row of a preference run: the last margin and accuracy, train and eval; None for SFT."""
    parts = []
    for prefix, what in (("", "train"), ("eval_", "eval")):
        margin, acc = _last(prefs, prefix + "reward_margin"), _last(prefs, prefix + "reward_accuracy")
        if margin and acc:
            parts.append(f"{what} margin {margin[1]:.4g}, accuracy {acc[1]:.3f} at step {acc[0]}")
    return "; ".join(parts) or None


def summarize(events: list[dict], run: RunDir) -> list[tuple[str, str]]:
    """(label, value) rows of the summary table; pure apart from listing the run's checkpoints."""
    s = series(events)
    by = {}
    for e in events:
        by.setdefault(e.get("event"), []).append(e)
    rows: list[tuple[str, str]] = []
    total = next((e["total_steps"] for e in reversed(events) if "total_steps" in e), None)
    if "done" in by:
        status = "completed"
    elif "preempted" in by:
        status = f"stopped on request at step {by['preempted'][-1].get('step')} (resumable)"
    else:
        # rglob: a multi-node run keeps each node's logs in logs/<node>/.
        errors = run.rank_error_files(every_node=True)
        status = "failed (see logs/)" if errors else "incomplete (running, or killed)"
    rows.append(("status", status))
    rows.append(("steps", f"{s.steps[-1] if s.steps else 0} of {total if total is not None else '?'}"))
    if s.loss:
        rows.append(("final loss", f"{s.loss[-1]:.4f} (first {s.loss[0]:.4f}, min {min(s.loss):.4f})"))
    if s.eval_loss:
        best = min(range(len(s.eval_loss)), key=s.eval_loss.__getitem__)
        # A token cross-entropy's perplexity; a preference loss (DPO, ORPO) has none.
        ppl = f" (perplexity {perplexity(s.eval_loss[-1])})" if not s.prefs else ""
        rows.append(
            (
                "eval loss",
                f"{s.eval_loss[-1]:.4f}{ppl} at step {s.eval_steps[-1]} "
                f"(best {s.eval_loss[best]:.4f} at {s.eval_steps[best]})",
            )
        )
    rewards = preference_summary(s.prefs)
    if rewards:
        rows.append(("rewards", rewards))
    # The first logged step carries compile/warm-up time; leave it out when there are others.
    tps = s.tps[1:] or s.tps
    tps_gpu = s.tps_gpu[1:] or s.tps_gpu
    if tps:
        rows.append(
            (
                "throughput",
                f"{statistics.median(tps):,.0f} tok/s total, {statistics.median(tps_gpu):,.0f} tok/s per {s.per} (median)",
            )
        )
    if s.mem:
        peaks = {r: max(v) for r, v in s.mem.items()}
        per = " ".join(f"r{r} {v:.2f}" for r, v in sorted(peaks.items()))
        rows.append(("peak memory", f"{max(peaks.values()):.2f} GiB {s.mem_kind}; per rank: {per}"))
    if "loaded" in by:
        e = by["loaded"][0]
        load_start = next((x["time"] for x in by.get("loading", []) if x.get("phase", "model") == "model"), None)
        wall = e["time"] - load_start if load_start is not None else e.get("seconds", 0.0)
        rows.append(
            (
                "model load",
                f"{wall:.1f}s (weights {e.get('seconds', 0.0):.1f}s"
                + (f", {e['bytes_read'] / 2**20:.1f} MiB read by rank 0)" if e.get("bytes_read") else ")"),
            )
        )
    if "start" in by:
        rows.append(("first step", f"{by['start'][0].get('first_step_after_s', 0.0):.1f}s after spawn"))
    if events:
        rows.append(("wall time", fmt_duration(events[-1]["time"] - events[0]["time"])))
    ckpts = by.get("checkpoint", [])
    on_disk = sorted(p.name for p in run.checkpoints.iterdir()) if run.checkpoints.is_dir() else []
    if ckpts or on_disk:
        last = ckpts[-1]["path"] if ckpts else str(run.checkpoints / on_disk[-1])
        rows.append(("checkpoints", f"{len(ckpts)} written, {len(on_disk)} on disk; last {last}"))
    else:
        rows.append(("checkpoints", "none"))
    if "adapter" in by:
        rows.append(("adapter", by["adapter"][-1]["path"]))
    if "samples" in by:
        rows += sample_rows(by["samples"][-1])
    return rows


def sample_rows(event: dict) -> list[tuple[str, str]]:
    """The last samples event's prompts and completions, whole (train.samples), one row each."""
    last = event["samples"]
    return [
        (f"sample {i + 1} (step {event['step']})", f"{s['prompt']!r} -> {s['completion']!r}")
        for i, s in enumerate(last)
    ]


def perplexity(loss: float) -> str:
    """exp(loss), or 'overflow' beyond what a float holds."""
    return f"{math.exp(loss):,.2f}" if loss < 700 else "overflow"


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average with its start-up bias divided out, so the
    first points are not pulled towards 0."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot(s: Series, out_dir: Path, name: str = "") -> list[Path]:
    """loss.png, (preference runs) rewards.png and reward_accuracy.png, lr.png, throughput.png, memory.png
    (only those with data) in out_dir. NAME (the run's) heads every title and is the PNGs' Title metadata;
    legends sit beside the axes, never over the lines."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig, file: str) -> None:
        for ax in fig.axes:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize="small")
        fig.tight_layout()
        path = out_dir / file
        fig.savefig(path, dpi=110, metadata={"Title": f"{name}: {file.removesuffix('.png')}" if name else file})
        plt.close(fig)
        written.append(path)

    def titled(title: str) -> str:
        return f"{name}: {title}" if name else title

    def axes(title: str, ylabel: str):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.set_title(titled(title))
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        return fig, ax

    if s.steps:
        fig, ax = axes("loss", "loss")
        ax.plot(s.steps, s.loss, label="train loss", color="tab:blue", linewidth=1.0, alpha=0.35)
        ax.plot(s.steps, smoothed(s.loss), label="train loss, smoothed", color="tab:blue", linewidth=1.8)
        if s.eval_loss:
            ax.plot(s.eval_steps, s.eval_loss, "o-", label="eval loss", color="tab:orange", linewidth=1.5)
        save(fig, "loss.png")
        _plot_preference(s.prefs, plt, axes, save, titled)

        fig, ax = axes("learning rate", "lr")
        ax.plot(s.steps, s.lr, color="tab:green", linewidth=1.5)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        save(fig, "lr.png")

        fig, ax = axes("throughput", "tokens / s")
        ax.plot(s.steps, s.tps, label="total", color="tab:purple", linewidth=1.5)
        ax.plot(s.steps, s.tps_gpu, label=f"per {s.per}", color="tab:red", linewidth=1.5)
        ax.set_ylim(bottom=0)
        save(fig, "throughput.png")

    if s.mem:
        fig, ax = axes(s.mem_kind, "GiB")
        for r, values in sorted(s.mem.items()):
            ax.plot(s.steps[: len(values)], values, label=f"rank {r}", linewidth=1.5)
        ax.set_ylim(bottom=0)
        save(fig, "memory.png")
    return written


# The rewards panel's two plots: (title, its (field, label, colour) lines); eval values get the same colour,
# dashed with markers.
REWARD_PLOTS = (
    (
        "rewards: chosen vs rejected",
        (("rewards_chosen", "chosen", "tab:green"), ("rewards_rejected", "rejected", "tab:red")),
    ),
    ("reward margin (chosen - rejected)", (("reward_margin", "margin", "tab:blue"),)),
)


def _plot_preference(prefs: dict[str, tuple[list[int], list[float]]], plt, axes, save, titled) -> None:
    """rewards.png (chosen vs rejected rewards above, their margin below) and reward_accuracy.png (how often
    the chosen reward is the higher one), train and eval; nothing for an SFT run."""
    if any(name in prefs for _, lines in REWARD_PLOTS for name, _, _ in lines):
        # The margin gets its own axis: it is often 100x smaller than the rewards and would lie flat on zero.
        fig, axs = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
        for ax, (title, lines) in zip(axs, REWARD_PLOTS, strict=True):
            ax.set_title(titled(title))
            ax.set_ylabel("reward")
            ax.grid(True, alpha=0.3)
            for name, label, colour in lines:
                for prefix, style, what in (("", "-", "train"), ("eval_", "o--", "eval")):
                    if prefix + name in prefs:
                        steps, values = prefs[prefix + name]
                        ax.plot(steps, values, style, label=f"{what} {label}", color=colour, linewidth=1.5)
        axs[-1].axhline(0.0, color="grey", linewidth=0.8)  # the margin's sign: which answer the policy prefers
        axs[-1].set_xlabel("step")
        save(fig, "rewards.png")
    if "reward_accuracy" in prefs or "eval_reward_accuracy" in prefs:
        fig, ax = axes("reward accuracy (chosen reward > rejected reward)", "fraction of pairs")
        ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")  # chance: a policy that cannot tell the two apart
        for prefix, style, what, colour in (("", "-", "train", "tab:blue"), ("eval_", "o-", "eval", "tab:orange")):
            if prefix + "reward_accuracy" in prefs:
                steps, values = prefs[prefix + "reward_accuracy"]
                ax.plot(steps, values, style, label=f"{what} accuracy", color=colour, linewidth=1.5)
        ax.set_ylim(-0.02, 1.02)
        save(fig, "reward_accuracy.png")


def report(
    path: str | Path, warn: Callable[[str], None] | None = None
) -> tuple[RunDir, list[tuple[str, str]], list[Path]]:
    """The run, its summary rows and the plots written; `warn` gets one line if malformed lines were skipped."""
    run = find_run(path)
    events, skipped = read_events(run.metrics)
    if not events:
        detail = f" ({skipped} malformed line(s), none an event qlaunch writes)" if skipped else ""
        raise UserError(f"{run.metrics}: no metrics recorded yet{detail}")
    if skipped and warn is not None:
        warn(
            f"warning: {run.metrics}: skipped {skipped} malformed line(s) (a killed run's last line is often "
            "cut short; other lines were not written by qlaunch)"
        )
    rows = summarize(events, run)
    with warnings.catch_warnings():  # a tampered value (lr = 1e308) overflows numpy's axis arithmetic: harmless
        warnings.simplefilter("ignore")
        plots = plot(series(events), run.plots, run.path.parent.name)
    return run, rows, plots


def render(run: RunDir, rows: list[tuple[str, str]], plots: list[Path]) -> Any:
    from rich.table import Table

    table = Table(title=f"run {run.path}", title_justify="left", show_header=False, show_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    shown = f"{plots[0].parent}/: " + ", ".join(p.name for p in plots) if plots else "none (no steps recorded)"
    table.add_row("plots", shown)
    return table
