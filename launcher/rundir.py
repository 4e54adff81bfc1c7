"""The run directory: runs/<name>/<timestamp>/ (a multi-node run: runs/<name>/<id>/, one for all its nodes)
with everything needed to rerun or inspect a run."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.atomic import atomic_write
from launcher.errors import UserError
from launcher.plan.plan import Plan
from launcher.plan.recipe import Recipe
from launcher.plan.recipe_file import dump_toml, load_recipe
from launcher.safe_files import json_kind, read_json_object

RECIPE_FILE = "recipe.toml"
LAUNCH_FILE = "launch.json"
PLAN_FILE = "plan.json"
METRICS_FILE = "metrics.jsonl"
STOP_FILE = "STOP"  # the launcher creates it when it is asked to stop (SIGTERM/SIGUSR1, Ctrl-C)
PREEMPTED_FILE = "preempted.json"  # rank 0 writes it after the preemption checkpoint
FAILED_FILE = "failed.json"  # the launcher writes it when the ranks stopped on bad input or divergence
LOGS_DIR = "logs"  # the launcher's and the ranks' logs (a multi-node run: logs/<node>/)
LAUNCHER_LOG = "launcher.log"  # torchrun's output, in the logs folder
NODES_LOG = "nodes.log"  # the node watch's notes (multi-node), in the logs folder
RANK_LOG = "rank{rank}.log"  # each rank's own output, in the logs folder
RANK_ERROR_FILE = "rank{rank}.error.json"  # a failed rank's error record, in the logs folder
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"  # the final LoRA adapter
PROFILE_DIR = "profile"  # log.profile_steps / log.memory_steps reports
TENSORBOARD_DIR = "tensorboard"  # log.tensorboard event files
PLOTS_DIR = "plots"  # `qlaunch report --plots` output
# Written by `qlaunch run` / `qlaunch config` but named where they are rendered (launcher.plan.configs, a
# layer below this one): deepspeed_config.json, accelerate_config.yaml.

_RANK_LOG_NAME = re.compile(r"rank(\d+)\.log")


@dataclass(frozen=True)
class RunPlan:
    """plan.json: the Plan, and what the launcher settled for this run at its start besides planning."""

    plan: Plan
    resume_from: Path | None = None  # the checkpoint --resume chose; the ranks load it at start
    data_cache: Path | None = None  # the tokenized-data cache folder; None = the runs folder's .data-cache

    def to_json(self) -> str:
        extras = {"resume_from": self.resume_from, "data_cache": self.data_cache}
        text = {key: str(path) if path else None for key, path in extras.items()}
        return json.dumps({**self.plan.to_dict(), **text}, indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> RunPlan:
        """The inverse of to_json's object. A plan.json without the extras (`qlaunch config` writes none,
        an older run may lack one) loads with them None."""
        extras: dict[str, Path | None] = {}
        for key in ("resume_from", "data_cache"):
            value = data.get(key)
            if value is not None and not isinstance(value, str):
                raise UserError(f"{where}: {key!r} must be a string or null, not {json_kind(value)}")
            extras[key] = Path(value) if value else None
        plan = Plan.from_dict({k: v for k, v in data.items() if k not in extras}, where)
        return cls(plan, **extras)


@dataclass(frozen=True)
class RunDir:
    """`node`: this node's name inside a run directory that several nodes share (multi-node runs), so
    that each node's launcher log, launch record and ranks' logs stay apart: logs/<node>/, and
    launch-<node>.json. None for a single node."""

    path: Path
    node: str | None = None

    @property
    def recipe(self) -> Path:
        return self.path / RECIPE_FILE

    @property
    def logs(self) -> Path:
        return self.path / LOGS_DIR if self.node is None else self.path / LOGS_DIR / self.node

    @property
    def launch_file(self) -> Path:
        return self.path / (LAUNCH_FILE if self.node is None else f"launch-{self.node}.json")

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER_DIR

    @property
    def profile(self) -> Path:
        return self.path / PROFILE_DIR

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def plots(self) -> Path:
        return self.path / PLOTS_DIR

    @property
    def stop_file(self) -> Path:
        return self.path / STOP_FILE

    @property
    def preempted_file(self) -> Path:
        return self.path / PREEMPTED_FILE

    @property
    def failed_file(self) -> Path:
        return self.path / FAILED_FILE

    @property
    def launcher_log(self) -> Path:
        return self.logs / LAUNCHER_LOG

    @property
    def nodes_log(self) -> Path:
        return self.logs / NODES_LOG

    def rank_log(self, rank: int) -> Path:
        return self.logs / RANK_LOG.format(rank=rank)

    def rank_logs(self) -> dict[int, Path]:
        """{global rank: its log} of the ranks that ran on this node (each writes its log from its first line)."""
        found = ((_RANK_LOG_NAME.fullmatch(f.name), f) for f in self.logs.glob(RANK_LOG.format(rank="*")))
        return {int(m.group(1)): f for m, f in found if m}

    def rank_error_file(self, rank: int) -> Path:
        return self.logs / RANK_ERROR_FILE.format(rank=rank)

    def rank_error_files(self, every_node: bool = False) -> list[Path]:
        """This node's ranks' error records, sorted; `every_node`: those of all nodes of a shared run
        directory too (logs/<node>/...), as `qlaunch report` wants them."""
        pattern = RANK_ERROR_FILE.format(rank="*")
        if every_node:
            root = self.path / LOGS_DIR
            return sorted(root.rglob(pattern)) if root.is_dir() else []
        return sorted(self.logs.glob(pattern))

    def create_folders(self) -> None:
        """The folders a run directory starts with (its own path included): the logs folder of this node."""
        self.logs.mkdir(parents=True, exist_ok=True)

    def load_recipe(self) -> Recipe:
        return load_recipe(self.recipe)

    def load_plan(self) -> RunPlan:
        path = self.path / PLAN_FILE
        return RunPlan.from_dict(read_json_object(path, "plan"), str(path))


def new_run_dir(recipe: Recipe, root: str | Path | None = None) -> RunDir:
    """Create a fresh, never-reused directory (timestamp + a counter if two runs start in one second)."""
    base = Path(root or recipe.log.runs_dir) / recipe.name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        base.mkdir(parents=True, exist_ok=True)
        for i in range(1000):
            path = base / (stamp if i == 0 else f"{stamp}-{i}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            run = RunDir(path.resolve())
            run.create_folders()
            return run
    except OSError as err:
        raise UserError(
            f"log.runs_dir = {str(base.parent)!r}: cannot create a run directory ({_os_cause(err)})"
        ) from None
    raise UserError(f"{base}: 1000 run directories were started in this second; try again")


def _os_cause(err: OSError) -> str:
    """'Read-only file system', 'No space left on device': the cause of an OSError, without its path."""
    return err.strerror or type(err).__name__


def shared_run_dir(path: Path, node: str, writer: bool, resuming: bool) -> RunDir:
    """The one run directory of a multi-node run, named the same on every node (see launch/placement.py).

    The writer (node 0) refuses a directory that already holds a run unless it is resuming it (a SLURM
    requeue comes back with the same job id and --resume auto): the name is deterministic, so a second,
    unrelated run with the same id must not mix its checkpoints into the first one's. Files left by
    the previous attempt that would mislead this one (the stop request, the preemption note, error
    reports) are removed: the writer's shared ones, each node its own."""
    path = Path(path).resolve()
    if writer and (path / PLAN_FILE).is_file() and not resuming:
        raise UserError(
            f"run directory {path} already holds a run: continue it with --resume auto, or give this run "
            "another name (--rdzv-id ID or --run-dir DIR)"
        )
    run = RunDir(path, node)
    run.create_folders()
    stale = run.rank_error_files()
    if writer:
        stale += [path / STOP_FILE, path / PREEMPTED_FILE, path / FAILED_FILE]
    for f in stale:
        f.unlink(missing_ok=True)
    return run


def write_files(run: RunDir, recipe: Recipe, files: dict[str, str]) -> None:
    """Resolved recipe first (the workers read it), then the other rendered files; each written atomically."""
    atomic_write(run.recipe, dump_toml(recipe))
    for name, text in files.items():
        atomic_write(run.path / name, text)
