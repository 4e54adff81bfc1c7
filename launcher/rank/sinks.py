"""Where rank 0's metrics go besides metrics.jsonl (TensorBoard, Weights & Biases), and the per-rank
numbers rank 0 reports on behalf of every rank.

Both extras are optional: when a recipe asks for one whose package is missing, the run says so once (a
`warning` event, shown by the live view, and a line in rank 0's log) and carries on without it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TextIO

from launcher.rundir import TENSORBOARD_DIR

# What a preference objective (dpo, orpo) reports besides the loss, in step events and, prefixed eval_, in eval
# events (launcher/rank/objective.py); nll_loss and log_odds_ratio are ORPO's only. SFT runs have none.
# Kept here, not in objective.py, so that the UI reads the names without importing torch.
PAIR_FIELDS = (
    "rewards_chosen",
    "rewards_rejected",
    "reward_margin",
    "reward_accuracy",
    "logps_chosen",
    "logps_rejected",
)
ORPO_FIELDS = ("nll_loss", "log_odds_ratio")
PREFERENCE_FIELDS = PAIR_FIELDS + ORPO_FIELDS

# metrics field -> scalar tag (TensorBoard) / key (W&B); one namespace per kind of number.
STEP_SCALARS = {
    "loss": "train/loss",
    **{name: f"train/{name}" for name in PREFERENCE_FIELDS},
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "perf/tokens_per_s",
    "tokens_per_s_per_gpu": "perf/tokens_per_s_per_gpu",
    "step_time_s": "perf/step_time_s",
    "gpu_reserved_gb": "memory/gpu_reserved_gb",
    "gpu_alloc_gb": "memory/gpu_alloc_gb",
    "host_rss_gb": "memory/host_rss_gb",
}

# The same numbers over the validation set: eval_loss is eval/loss, eval_reward_margin is eval/reward_margin.
EVAL_SCALARS = {f"eval_{name}": f"eval/{name}" for name in ("loss", *PREFERENCE_FIELDS)}

RANK_LISTS = ("rank_gpu_reserved_gb", "rank_host_rss_gb")


class Sink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> tuple[int | None, dict[str, float]]:
    """(step, {tag: value}) of a metrics record; empty for events that carry no plotted number."""
    ev = record.get("event")
    if ev == "step":
        out = {tag: float(record[k]) for k, tag in STEP_SCALARS.items() if record.get(k) is not None}
        for key in RANK_LISTS:
            for r, v in enumerate(record.get(key) or []):
                out[f"memory/rank{r}_{key[5:]}"] = float(v)
        return int(record["step"]), out
    if ev == "eval":
        return int(record["step"]), {
            tag: float(record[k]) for k, tag in EVAL_SCALARS.items() if record.get(k) is not None
        }
    if ev == "loaded":  # the terminal's "model loaded in" figure, and its "weights" part
        wall = record.get("wall_s", record["seconds"])  # metrics of runs before wall_s have the part only
        return 0, {"time/load_s": float(wall), "time/load_weights_s": float(record["seconds"])}
    if ev == "start" and record.get("first_step_after_s") is not None:
        return 0, {"time/first_step_after_s": float(record["first_step_after_s"])}
    return None, {}


def texts(record: dict[str, Any]) -> tuple[int | None, dict[str, str]]:
    """(step, {tag: Markdown}) of a `samples` record, one tag per prompt (samples/0, samples/1, ...) so that
    TensorBoard's text tab shows each prompt's completions step by step; empty for other events."""
    if record.get("event") != "samples":
        return None, {}
    return int(record["step"]), {f"samples/{i}": sample_markdown(s) for i, s in enumerate(record["samples"])}


def sample_markdown(sample: dict[str, str]) -> str:
    """Prompt and completion as Markdown code blocks (4-space indent: no text inside can close them)."""

    def block(text: str) -> str:
        return "\n".join("    " + line for line in (text or " ").split("\n"))

    return f"**prompt**\n\n{block(sample['prompt'])}\n\n**completion**\n\n{block(sample['completion'])}"


class TensorBoardSink:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(log_dir), flush_secs=10)

    def write(self, record: dict[str, Any]) -> None:
        step, values = scalars(record)
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, global_step=step, walltime=record.get("time"))
        step, markdown = texts(record)
        for tag, text in markdown.items():
            self.writer.add_text(tag, text, global_step=step, walltime=record.get("time"))
        if record.get("event") in ("eval", "samples", "done", "checkpoint"):
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, run_dir: Path, name: str, config: dict[str, Any]):
        import wandb

        # Offline unless the user chose otherwise (WANDB_MODE) or is logged in: a run never blocks on a
        # network it may not have; `wandb sync RUN/wandb/offline-*` uploads later.
        mode = os.environ.get("WANDB_MODE")
        if not mode:
            logged_in = bool(os.environ.get("WANDB_API_KEY"))
            if not logged_in:
                try:
                    logged_in = bool(wandb.api.api_key)
                except Exception:  # noqa: BLE001 - any doubt means offline
                    logged_in = False
            mode = "online" if logged_in else "offline"
        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "qlaunch"),
            name=f"{name}-{run_dir.name}",
            dir=str(run_dir),
            config=config,
            mode=mode,
        )

    def write(self, record: dict[str, Any]) -> None:
        step, values = scalars(record)
        if values:
            self.run.log(values, step=step)
        if record.get("event") in ("adapter", "checkpoint") and record.get("path"):
            self.run.summary[record["event"]] = record["path"]

    def close(self) -> None:
        self.run.finish()


class TerminalSink:
    """The plain progress lines `qlaunch run` prints, written by rank 0 itself to a terminal nobody follows."""

    def __init__(self, out: TextIO, run_dir: Path, layers: int | None):
        from launcher.progress import RunState

        self.out, self.state = out, RunState(layers=layers)
        print(f"qlaunch: {run_dir} (every rank's own output: {run_dir / 'logs'})", file=out, flush=True)

    def write(self, record: dict[str, Any]) -> None:
        from launcher.progress import format_event, update

        update(self.state, record)
        line = format_event(record, self.state)
        if line:
            print(line, file=self.out, flush=True)

    def close(self) -> None:
        self.out.flush()


def open_sinks(
    recipe, run_dir: Path, warn: Callable[[str], None], terminal: TextIO | None = None, layers: int | None = None
) -> list[Sink]:
    """The sinks the recipe's [log] section asks for (a missing optional package costs one warning), and the
    progress lines on `terminal` when one is given (a run no qlaunch follows)."""
    out: list[Sink] = [TerminalSink(terminal, run_dir, layers)] if terminal is not None else []
    said = warn

    def warn(msg: str) -> None:
        print(f"warning: {msg}", flush=True)  # rank 0's log
        said(msg)

    if recipe.log.tensorboard:
        try:
            out.append(TensorBoardSink(run_dir / TENSORBOARD_DIR))
        except ImportError:
            warn("log.tensorboard = true but the tensorboard package is not installed; no event files are written")
    if recipe.log.wandb:
        try:
            from launcher.plan.recipe import recipe_to_dict

            out.append(WandbSink(run_dir, recipe.name, recipe_to_dict(recipe)))
        except ImportError:
            warn("log.wandb = true but the wandb package is not installed; not logging to Weights & Biases")
    return out


def gather_per_rank(values: dict[str, float], device) -> dict[str, list[float]]:
    """Every rank's value of each key, as `rank_<key>` lists (a collective: every rank must call it at
    the same point). Used for peak memory, which differs per rank and which only rank 0 writes."""
    import torch
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float32, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        rows = torch.stack(parts).cpu().tolist()
    else:
        rows = [t.cpu().tolist()]
    return {f"rank_{k}": [round(r[i], 4) for r in rows] for i, k in enumerate(keys)}
