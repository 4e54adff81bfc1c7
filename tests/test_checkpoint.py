"""Checkpoints, exact resume and fault tolerance, through real `qlaunch run` processes (2 gloo ranks)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import BASE_RECIPE, ROOT, run_cli, sigterm_after_step

pytestmark = pytest.mark.slow

RECIPE = BASE_RECIPE.replace("max_steps = 2", "max_steps = 8").replace("lr = 1e-3", "lr = 2e-3")


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def step_losses(run: Path) -> dict[int, float]:
    """step -> loss; after an elastic restart the re-run steps overwrite the first attempt's."""
    return {m["step"]: m["loss"] for m in metrics(run) if m["event"] == "step"}


def only_run(root: Path) -> Path:
    runs = sorted(root.glob("*/*/recipe.toml"))
    assert len(runs) == 1, runs
    return runs[0].parent


def _kill_tree(proc: subprocess.Popen) -> None:
    """Leave nothing running if the test fails midway (torchrun's workers live in their own sessions)."""
    if proc.poll() is None:
        subprocess.run(["pkill", "-9", "-P", str(proc.pid)], check=False)
        proc.kill()
        proc.wait()


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("rec") / "r.toml"
    p.write_text(RECIPE)
    return p


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, recipe_path) -> Path:
    """8 steps, checkpoint every 4 (so step 4 can be resumed from), nothing interrupted."""
    root = tmp_path_factory.mktemp("full")
    r = run_cli("run", str(recipe_path), "--set", f'log.runs_dir="{root}"', "--set", "checkpoint.every_steps=4")
    assert r.returncode == 0, r.stdout + r.stderr
    return only_run(root)


def test_resume_from_step_k_reproduces_the_uninterrupted_run(tmp_path, recipe_path, uninterrupted):
    ckpt = uninterrupted / "checkpoints" / "step_00000004"
    assert (ckpt / "COMPLETE").is_file()
    r = run_cli("run", str(recipe_path), "--set", f'log.runs_dir="{tmp_path}"', "--resume", str(ckpt))
    assert r.returncode == 0, r.stdout + r.stderr
    resumed = only_run(tmp_path)
    want, got = step_losses(uninterrupted), step_losses(resumed)
    assert sorted(got) == [5, 6, 7, 8]
    assert [got[s] for s in got] == [want[s] for s in got]  # bitwise on CPU: same data, same arithmetic
    a, b = adapter(uninterrupted), adapter(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_a_rank_elastic_restart_finishes_with_the_same_adapter(tmp_path, recipe_path, uninterrupted):
    """kill -9 of rank 1 after the step-2 checkpoint: torch elastic restarts the group, the ranks resume
    from their newest complete checkpoint, and the final adapter is bitwise the uninterrupted one."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "launcher.cli", "run", str(recipe_path), "--set", f'log.runs_dir="{tmp_path}"']
    cmd += ["--set", "checkpoint.every_steps=2", "--set", "launch.max_restarts=1", "--set", "train.max_steps=8"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    killed = False
    try:
        while time.time() < deadline and proc.poll() is None and not killed:
            runs = list(tmp_path.glob("*/*/metrics.jsonl"))
            if runs and any(m["event"] == "checkpoint" for m in metrics(runs[0].parent)):
                log = (runs[0].parent / "logs" / "rank1.log").read_text()
                pid = int(re.search(r"start pid=(\d+)", log).group(1))
                os.kill(pid, signal.SIGKILL)
                killed = True
            time.sleep(0.2)
        out, _ = proc.communicate(timeout=300)
    finally:
        _kill_tree(proc)
    assert killed, out
    assert proc.returncode == 0, out
    run = only_run(tmp_path)
    assert any(m["event"] == "resumed" for m in metrics(run)), "the restarted ranks did not resume"
    a, b = adapter(uninterrupted), adapter(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert step_losses(run) == step_losses(uninterrupted)


def test_sigterm_saves_a_checkpoint_exits_75_and_resume_continues(tmp_path, recipe_path):
    root = tmp_path / "runs"
    args = ["run", str(recipe_path), "--set", f'log.runs_dir="{root}"', "--set", "train.max_steps=400"]
    rc, out, err, seconds = sigterm_after_step(args, root)
    assert seconds < 60
    assert rc == 75, out + err
    run = only_run(root)
    info = json.loads((run / "preempted.json").read_text())
    assert "--resume" in err and str(run) in err
    stopped = info["step"]
    assert (Path(info["checkpoint"]) / "COMPLETE").is_file()
    r = run_cli("run", str(recipe_path), "--set", f'log.runs_dir="{tmp_path / "again"}"', "--resume", str(run),
                "--set", f"train.max_steps={stopped + 2}")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    resumed = only_run(tmp_path / "again")
    assert [m["step"] for m in metrics(resumed) if m["event"] == "resumed"] == [stopped]
    assert sorted(step_losses(resumed)) == [stopped + 1, stopped + 2]


def test_sigusr1_to_every_process_of_the_run_checkpoints_and_exits_75(tmp_path, recipe_path):
    """SLURM's time-limit warning reaches qlaunch, torchrun and the ranks at once (the whole job step):
    torchrun must survive it while the ranks save, so the run ends as a preemption, not a failure."""
    import signal

    root = tmp_path / "runs"
    args = ["run", str(recipe_path), "--set", f'log.runs_dir="{root}"', "--set", "train.max_steps=400"]
    rc, out, err, seconds = sigterm_after_step(args, root, sig=signal.SIGUSR1, group=True)
    assert rc == 75, out + err
    info = json.loads((only_run(root) / "preempted.json").read_text())
    assert (Path(info["checkpoint"]) / "COMPLETE").is_file()


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path, recipe_path, uninterrupted):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(uninterrupted, run)
    newest = run / "checkpoints" / "step_00000008"
    shard = next((newest / "dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:10])  # truncated file, marker still present
    r = run_cli("run", str(recipe_path), "--set", f'log.runs_dir="{tmp_path / "out"}"', "--resume", str(run))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning: skipping checkpoint step_00000008" in r.stdout and "bytes" in r.stdout
    resumed = only_run(tmp_path / "out")
    assert [m["step"] for m in metrics(resumed) if m["event"] == "resumed"] == [4]
    # A checkpoint whose COMPLETE marker is missing (interrupted save) is ignored the same way.
    (run / "checkpoints" / "step_00000004" / "COMPLETE").unlink()
    r = run_cli("run", str(recipe_path), "--set", f'log.runs_dir="{tmp_path / "out2"}"', "--resume", str(run))
    assert r.returncode == 2 and "no complete checkpoint" in r.stderr


def test_resume_refuses_a_math_change_and_allows_a_harmless_one(tmp_path, recipe_path, uninterrupted):
    r = run_cli("run", str(recipe_path), "--set", f'log.runs_dir="{tmp_path}"', "--resume", str(uninterrupted),
                "--set", "lora.rank=16")  # fmt: skip
    assert r.returncode == 2
    assert "changes the math of the run (lora: " in r.stderr and "'rank': 8" in r.stderr
    assert not tmp_path.joinpath("t").exists()
    r = run_cli("run", str(recipe_path), "--set", f'log.runs_dir="{tmp_path}"', "--resume", str(uninterrupted),
                "--set", "train.max_steps=9")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(step_losses(only_run(tmp_path))) == [9]
