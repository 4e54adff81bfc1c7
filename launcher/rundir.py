"""The run directory: runs/<name>/<timestamp>/ (a multi-node run: runs/<name>/<id>/, one for all its nodes)
with everything needed to rerun or inspect a run."""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.errors import UserError
from launcher.plan.recipe import Recipe
from launcher.plan.recipe_file import dump_toml, load_recipe

RECIPE_FILE = "recipe.toml"
LAUNCH_FILE = "launch.json"
PLAN_FILE = "plan.json"
METRICS_FILE = "metrics.jsonl"
STOP_FILE = "STOP"  # the launcher creates it when it is asked to stop (SIGTERM/SIGUSR1, Ctrl-C)
PREEMPTED_FILE = "preempted.json"  # rank 0 writes it after the preemption checkpoint
FAILED_FILE = "failed.json"  # the launcher writes it when the ranks stopped on bad input or divergence


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
        return self.path / "logs" if self.node is None else self.path / "logs" / self.node

    @property
    def launch_file(self) -> Path:
        return self.path / (LAUNCH_FILE if self.node is None else f"launch-{self.node}.json")

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def stop_file(self) -> Path:
        return self.path / STOP_FILE

    @property
    def preempted_file(self) -> Path:
        return self.path / PREEMPTED_FILE

    @property
    def failed_file(self) -> Path:
        return self.path / FAILED_FILE

    def rank_log(self, rank: int) -> Path:
        return self.logs / f"rank{rank}.log"

    def load_recipe(self) -> Recipe:
        return load_recipe(self.recipe)

    def load_plan(self) -> dict[str, Any]:
        return json.loads((self.path / PLAN_FILE).read_text())


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
            (path / "logs").mkdir()
            return RunDir(path.resolve())
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
    run.logs.mkdir(parents=True, exist_ok=True)
    stale = list(run.logs.glob("rank*.error.json"))
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


def atomic_write(path: Path, text: str) -> None:
    # A name of its own per writer: nodes sharing a run directory may write side by side.
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
