"""The run directory: runs/<name>/<timestamp>/ with everything needed to rerun or inspect a run."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.recipe import Recipe, dump_toml, load_recipe

RECIPE_FILE = "recipe.toml"
LAUNCH_FILE = "launch.json"
PLAN_FILE = "plan.json"
METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def recipe(self) -> Path:
        return self.path / RECIPE_FILE

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    def rank_log(self, rank: int) -> Path:
        return self.logs / f"rank{rank}.log"

    def load_recipe(self) -> Recipe:
        return load_recipe(self.recipe)

    def load_plan(self) -> dict[str, Any]:
        return json.loads((self.path / PLAN_FILE).read_text())


def new_run_dir(recipe: Recipe, root: str | Path | None = None) -> RunDir:
    """Create a fresh, never-reused directory (timestamp + a counter if two runs start in one second)."""
    base = Path(root or recipe.log.runs_dir) / recipe.name
    base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        path = base / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        (path / "logs").mkdir()
        return RunDir(path.resolve())
    raise RuntimeError(f"could not create a run directory under {base}")


def write_files(run: RunDir, recipe: Recipe, files: dict[str, str]) -> None:
    """Resolved recipe first (the workers read it), then the other rendered files; each written atomically."""
    atomic_write(run.recipe, dump_toml(recipe))
    for name, text in files.items():
        atomic_write(run.path / name, text)


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
