"""A run's event stream (rank 0's metrics.jsonl) folded into a state, and the plain line of each event.

Pure and torch-free, below every room that shows progress: the launching terminal's follower (ui/live.py)
prints these lines, and so does rank 0 itself when an outside launcher (`accelerate launch`, torchrun)
started the run and nobody follows it (rank/sinks.py).

Events (all carry `time`; unknown events and fields are ignored):

  loading   phase ("model" | "data" | ...), optional tensor (name), bytes_read, done/total (generic count)
  loaded    seconds, bytes_read, host_rss_gb, gpu_*_gb
  start     total_steps, world, first_step_after_s
  step      step, total_steps, loss, lr, grad_norm, tokens_per_s, tokens_per_s_per_gpu, step_time_s,
            host_rss_gb, gpu_*_gb, rank_host_rss_gb / rank_gpu_reserved_gb (one value per rank)
  eval      step, eval_loss
  preference runs (train.objective = "dpo" | "orpo") add to step: rewards_chosen, rewards_rejected,
            reward_margin, reward_accuracy, logps_chosen, logps_rejected, and for orpo nll_loss,
            log_odds_ratio; to eval the same names prefixed eval_
  checkpointing  step (a write started);  checkpoint  path, step, seconds (a write finished)
  resumed   step, path;  preempted  step, path (stopped on request after a checkpoint)
  diverged  step, loss, grad_norm (as text: NaN and inf are not JSON; the run stops there)
  samples   step, samples ([{prompt, completion}]: train.samples' generations at an evaluation)
  adapter   path;  warning  message;  done
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

MiB = 2**20

_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class RunState:
    """Everything the views show, folded from the metrics events in order (see `update`)."""

    title: str = ""
    layers: int | None = None  # decoder layers, for the loading progress (from plan.json when known)
    phase: str = "starting"
    first_time: float | None = None
    last_time: float | None = None
    load_start: float | None = None
    load_layer: int | None = None
    load_bytes: int | None = None
    load_seconds: float | None = None  # wall time from the first loading event to `loaded`
    read_seconds: float | None = None  # the part spent reading/quantizing weights (loaded.seconds)
    data_start: float | None = None
    data_seconds: float | None = None
    count: tuple[int, int] | None = None  # generic done/total of the current loading phase
    total_steps: int | None = None
    world: int | None = None
    first_step_after_s: float | None = None
    step: dict[str, Any] | None = None
    first_step: dict[str, Any] | None = None  # the first step event (excluded from rates: warm-up)
    eval_loss: float | None = None
    eval_step: int | None = None
    eval: dict[str, Any] | None = None  # the last eval event (a preference run's eval rewards are in it)
    peaks: dict[int, float] = field(default_factory=dict)  # rank -> peak GiB over the run
    peak_kind: str = ""
    checkpoint: dict[str, Any] | None = None
    checkpointing_since: float | None = None
    checkpoints: int = 0
    adapter: str | None = None
    resumed: dict[str, Any] | None = None
    preempted: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    done: bool = False

    # ---- derived numbers

    @property
    def per(self) -> str:
        """What one rank is called in per-rank figures: 'gpu' where the ranks report GPU memory, else 'rank'
        (CPU processes)."""
        return "gpu" if self.peak_kind == "GPU reserved" else "rank"

    def load_rate(self) -> float | None:
        """Bytes/s read by rank 0 while loading (None until bytes are reported)."""
        if self.load_bytes is None or self.load_start is None or self.last_time is None:
            return None
        dt = self.read_seconds if self.read_seconds is not None else self.last_time - self.load_start
        return self.load_bytes / dt if dt > 0 else None

    def eta(self) -> float | None:
        """Seconds left, from the step rate since the first step (which includes warm-up)."""
        s, f = self.step, self.first_step
        if not s or not self.total_steps:
            return None
        left = self.total_steps - s["step"]
        if f is not None and s["step"] > f["step"] and s["time"] > f["time"]:
            rate = (s["step"] - f["step"]) / (s["time"] - f["time"])
            return left / rate
        if s.get("step_time_s"):
            return left * s["step_time_s"]
        return None


def update(st: RunState, e: dict) -> None:
    """Fold one metrics event into the state."""
    ev = e.get("event")
    t = e.get("time")
    if t is not None:
        st.first_time = t if st.first_time is None else st.first_time
        st.last_time = t
    if ev == "samples":  # shown as its own line; nothing of the state changes
        return
    if ev == "loading":
        phase = e.get("phase", "model")
        if phase == "model":
            st.phase = "loading"
            if st.load_start is None:
                st.load_start = t
            m = _LAYER.search(e.get("tensor", ""))
            if m:
                st.load_layer = int(m.group(1)) + 1
            if "bytes_read" in e:
                st.load_bytes = int(e["bytes_read"])
        else:
            if st.phase == "loading" and st.load_seconds is None and st.load_start is not None and t is not None:
                st.load_seconds = t - st.load_start
            st.phase = phase
            if phase == "data" and st.data_start is None:
                st.data_start = t
        st.count = (int(e["done"]), int(e["total"])) if "done" in e and "total" in e else None
    elif ev == "loaded":
        st.read_seconds = e.get("seconds")
        if st.load_start is not None and t is not None:
            st.load_seconds = t - st.load_start
        else:
            st.load_seconds = st.read_seconds
        st.load_bytes = e.get("bytes_read", st.load_bytes)
        st.load_layer = st.layers or st.load_layer
        _peaks(st, e)
    elif ev == "start":
        st.phase = "training"
        st.total_steps = e.get("total_steps")
        st.world = e.get("world")
        st.first_step_after_s = e.get("first_step_after_s")
        if st.data_start is not None and t is not None:
            st.data_seconds = t - st.data_start
        st.count = None
    elif ev == "step":
        st.phase = "training"
        st.step = e
        st.total_steps = e.get("total_steps", st.total_steps)
        if st.first_step is None:
            st.first_step = e
        _peaks(st, e)
    elif ev == "eval":
        st.eval_loss, st.eval_step = e.get("eval_loss"), e.get("step")
        st.eval = e
    elif ev == "checkpointing":
        st.checkpointing_since = t
    elif ev == "checkpoint":
        st.checkpoint = dict(e)
        if "seconds" not in e and st.checkpointing_since is not None and t is not None:
            st.checkpoint["seconds"] = t - st.checkpointing_since
        st.checkpoints += 1
        st.checkpointing_since = None
    elif ev == "resumed":
        st.resumed = e
    elif ev == "preempted":
        st.preempted = e
        st.phase = "preempted"
    elif ev == "adapter":
        st.adapter = e.get("path")
    elif ev == "warning":
        st.warnings.append(str(e.get("message", "")))
    elif ev == "done":
        st.done = True
        st.phase = "done"
        _peaks(st, e)


def _peaks(st: RunState, e: dict) -> None:
    """Per-rank peak memory: GPU reserved when reported, host RSS otherwise; rank 0 alone if no list."""
    for kind, many, one in (
        ("GPU reserved", "rank_gpu_reserved_gb", "gpu_reserved_gb"),
        ("host RSS", "rank_host_rss_gb", "host_rss_gb"),
    ):
        if many in e or one in e:
            if st.peak_kind and st.peak_kind != kind:
                if kind == "host RSS":
                    return  # a GPU run's host numbers do not replace its GPU numbers
                st.peaks.clear()
            st.peak_kind = kind
            values = e[many] if many in e else [e[one]]
            for r, v in enumerate(values):
                st.peaks[r] = max(st.peaks.get(r, 0.0), float(v))
            return


def fmt_duration(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}"


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / MiB:.1f} MiB"


def fmt_peaks(st: RunState) -> str:
    if not st.peaks:
        return ""
    ranks = " ".join(f"r{r} {v:.2f}" for r, v in sorted(st.peaks.items()))
    return f"{ranks} GiB ({st.peak_kind})"


def loading_text(st: RunState) -> str:
    parts = []
    if st.load_layer is not None or st.layers:
        n = st.load_layer or 0
        parts.append(f"layer {n}/{st.layers}" if st.layers else f"layer {n}")
    if st.load_bytes:
        parts.append(f"{fmt_bytes(st.load_bytes)} read")
        rate = st.load_rate()
        if rate:
            parts.append(f"{fmt_bytes(rate)}/s")
    return ", ".join(parts)


def loaded_text(st: RunState) -> str:
    out = f"{st.load_seconds or 0:.1f}s"
    detail = []
    if st.read_seconds is not None:
        detail.append(f"weights {st.read_seconds:.1f}s")
    if st.load_bytes:  # 0 for model.init = "random": nothing is read
        detail.append(f"{fmt_bytes(st.load_bytes)} read by rank 0")
        rate = st.load_rate()
        if rate:
            detail.append(f"{fmt_bytes(rate)}/s")
    return out + (f" ({', '.join(detail)})" if detail else "")


def fmt_reward(v: float) -> str:
    # Four significant digits, not four decimals: early in a run the margin is 1e-4 and would read 0.0000.
    return f"{v:.4g}"


def preference_text(values: dict, prefix: str = "") -> str | None:
    """'margin M  acc A' of a step (prefix "") or eval (prefix "eval_") event; None for an SFT event."""
    margin, acc = values.get(prefix + "reward_margin"), values.get(prefix + "reward_accuracy")
    if margin is None or acc is None:
        return None
    return f"margin {fmt_reward(margin)}  acc {acc:.3f}"


def rewards_text(values: dict) -> str | None:
    """The panel's rewards row of a step event: margin, accuracy, and the chosen and rejected rewards."""
    head = preference_text(values)
    if head is None:
        return None
    chosen, rejected = values.get("rewards_chosen"), values.get("rewards_rejected")
    if chosen is not None and rejected is not None:
        head += f"  chosen {fmt_reward(chosen)}  rejected {fmt_reward(rejected)}"
    return head


def orpo_text(values: dict) -> str | None:
    """ORPO's two loss terms (its loss is nll_loss - weight * log_odds_ratio); None for other objectives."""
    nll, odds = values.get("nll_loss"), values.get("log_odds_ratio")
    if nll is None or odds is None:
        return None
    return f"nll {nll:.4f}  log odds ratio {odds:.4f}"


def format_event(e: dict, st: RunState | None = None) -> str | None:
    """One plain line for an event (None: nothing worth a line). `st` must already include `e`."""
    st = st or RunState()
    ev = e.get("event")
    if ev == "step":
        tps = e.get("tokens_per_s")
        per_gpu = e.get("tokens_per_s_per_gpu", 0)
        speed = f"{tps:.0f} tok/s ({per_gpu:.0f}/{st.per})" if tps is not None else f"{per_gpu:.0f} tok/s/{st.per}"
        prefs = preference_text(e)
        line = (
            f"step {e['step']}/{e['total_steps']}  loss {e['loss']:.4f}  "
            + (f"{prefs}  " if prefs else "")
            + f"lr {e['lr']:.2e}  grad {e.get('grad_norm', 0):.3f}  {speed}"
        )
        mem = fmt_peaks(st)
        if mem:
            line += f"  peak {mem}"
        eta = st.eta()
        if eta is not None and e["step"] < e["total_steps"]:
            line += f"  ETA {fmt_duration(eta)}"
        return line
    if ev == "eval":
        prefs = preference_text(e, "eval_")
        return f"eval  step {e['step']}  loss {e['eval_loss']:.4f}" + (f"  {prefs}" if prefs else "")
    if ev == "samples":
        return samples_line(e)
    if ev == "loading":
        phase = e.get("phase", "model")
        if phase == "model":
            if "tensor" not in e:
                return "loading model ..."
            detail = loading_text(st)
            return f"loading model: {detail}" if detail and _LAYER.search(e["tensor"]) else None
        if phase == "data":
            return "tokenizing data ..."
        if st.count:
            return f"{phase}: {st.count[0]}/{st.count[1]}"
        return f"{phase} ..."
    if ev == "loaded":
        return f"model loaded in {loaded_text(st)}"
    if ev == "start":
        data = f"data ready in {st.data_seconds:.1f}s; " if st.data_seconds is not None else ""
        return (
            f"training {e['total_steps']} steps on {e['world']} rank(s); {data}"
            f"first step {e['first_step_after_s']:.1f}s after spawn"
        )
    if ev == "checkpointing":
        return f"writing checkpoint (step {e.get('step', '?')}) ..."
    if ev == "checkpoint":
        c = st.checkpoint if st.checkpoint and st.checkpoint.get("time") == e.get("time") else e
        took = f" in {c['seconds']:.1f}s" if "seconds" in c else ""
        return f"checkpoint saved{took}: {e['path']}"
    if ev == "resumed":
        return f"resumed from step {e.get('step')}: {e.get('path', '')}"
    if ev == "preempted":
        return f"stopped on request after step {e.get('step')}; checkpoint {e.get('path', '')} (rerun to resume)"
    if ev == "diverged":
        return f"stopped at step {e.get('step')}: loss {e.get('loss')}, gradient norm {e.get('grad_norm')}"
    if ev == "adapter":
        return f"adapter saved: {e['path']}"
    if ev == "warning":
        return f"warning: {e.get('message', '')}"
    if ev == "done":
        wall = (st.last_time - st.first_time) if st.first_time is not None and st.last_time is not None else None
        return f"done: {e.get('steps', st.total_steps)} steps in {fmt_duration(wall)}"
    return None


def samples_line(e: dict, width: int = 48) -> str:
    """One short line of a `samples` event: each prompt and its completion cut to WIDTH characters and
    quoted as Python does (a newline shows as \\n, so the line stays one line); the report shows them whole."""

    def cut(text: str) -> str:
        return repr(text if len(text) <= width else text[: width - 3] + "...")

    shown = "  ".join(f"{cut(s['prompt'])} -> {cut(s['completion'])}" for s in e.get("samples", []))
    return f"samples step {e.get('step', '?')}  {shown}"


def plain_lines(events: Iterable[dict], st: RunState | None = None) -> Iterator[str]:
    st = st or RunState()
    for e in events:
        update(st, e)
        line = format_event(e, st)
        if line:
            yield line
