"""Clean failures: which rank failed first, how, its last log lines, where the logs are, and OOM advice."""

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

from launcher.launch.diagnose import failure_summary, is_oom
from launcher.rundir import PLAN_FILE, RunDir, write_files
from tests.conftest import ROOT

TORCHRUN_REPORT = """
Failures:
[1]:
  time      : 2026-11-27_10:39:58
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : {code0} (pid: 11205)
  error_file: <N/A>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-27_10:39:58
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : {code1} (pid: 11206)
  error_file: <N/A>
============================================================
"""


def _wait_for(pred, timeout: float, what: str) -> None:
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_killed_rank_is_named_with_its_signal_and_log(tmp_path):
    """A real 2-rank CPU run; rank 1 is SIGKILLed once training has started."""
    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "run", str(ROOT / "recipes" / "tiny-cpu.toml")]
        + ["--set", "train.max_steps=200", "--set", f'log.runs_dir="{runs}"'],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        metrics = lambda: list(runs.glob("*/*/metrics.jsonl"))  # noqa: E731
        _wait_for(lambda: metrics() and '"event": "step"' in metrics()[0].read_text(), 240, "the first step")
        run = RunDir(metrics()[0].parent)
        first = run.rank_log(1).read_text().splitlines()[0]
        pid = int(re.search(r"\[rank 1\] start pid=(\d+)", first).group(1))
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert "rank 1 failed first (killed by signal SIGKILL)" in err, err
    assert "then stopped: rank 0" in err
    assert f"last lines of {run.rank_log(1)}:" in err
    assert "[rank 1] step 1/200" in err  # the killed rank's own log lines are shown
    assert f"full logs: {run.logs}/" in err
    assert "\x1b" not in out + err  # not a terminal: plain lines only


def _run_dir(tmp_path: Path, recipe_file, micro_batch: int = 2) -> RunDir:
    from launcher.plan.plan import Cluster, make_plan
    from launcher.plan.recipe_file import load_recipe

    rec = load_recipe(recipe_file(), [f"train.micro_batch={micro_batch}"])
    run = RunDir(tmp_path / "run")
    run.logs.mkdir(parents=True)
    plan = make_plan(rec, Cluster())
    write_files(run, rec, {PLAN_FILE: json.dumps(plan.to_dict())})
    return run


def _error(run: RunDir, rank: int, t: float, message: str) -> None:
    (run.logs / f"rank{rank}.error.json").write_text(
        json.dumps({"rank": rank, "time": t, "kind": "crash", "message": message})
    )


def test_oom_gets_planner_suggestions(tmp_path, recipe_file):
    run = _run_dir(tmp_path, recipe_file)
    oom = (
        "OutOfMemoryError: CUDA out of memory. Tried to allocate 1.00 GiB. GPU 1 has a total capacity of "
        "0.01 GiB of which 0 bytes is free."
    )
    run.rank_log(1).write_text("[rank 1] start pid=1 world=2 restart=0\n[rank 1] step 1/2 loss 6.1\n" + oom + "\n")
    _error(run, 1, 100.0, oom)
    # rank 0 fails later, only because its peer vanished mid-collective
    _error(run, 0, 101.0, "RuntimeError: [pair.cc:537] Read error: Connection reset by peer")
    (run.logs / "launcher.log").write_text(TORCHRUN_REPORT.format(code0=1, code1=1))
    text = failure_summary(run)
    assert text.startswith("rank 1 failed first (exit code 1): OutOfMemoryError: CUDA out of memory")
    assert "out of GPU memory: the planner estimates" in text
    assert "GiB per GPU of 0.01 GiB" in text  # the card's size is read from the OOM message
    tips = text.split("  try:\n", 1)[1].split("last lines of", 1)[0]
    assert "--set train.micro_batch=1 (gradient accumulation 2)" in tips
    assert "--set parallel.fsdp.cpu_offload=true" in tips
    assert "--gpus 4" in tips
    assert text.rstrip().endswith(f"full logs: {run.logs}/")


def test_first_failure_is_decided_by_cause_not_by_clock(tmp_path, recipe_file):
    run = _run_dir(tmp_path, recipe_file)
    # rank 0's peer-lost error is written first, rank 1's own error a moment later: rank 1 is the cause.
    _error(run, 0, 10.0, "DistBackendError: NCCL communicator was aborted on rank 0")
    _error(run, 1, 11.0, "ValueError: bad shapes")
    assert failure_summary(run).startswith("rank 1 failed first: ValueError: bad shapes")


def test_signal_death_beats_the_survivors_error(tmp_path, recipe_file):
    run = _run_dir(tmp_path, recipe_file)
    _error(run, 0, 10.0, "RuntimeError: Connection closed by peer")
    (run.logs / "launcher.log").write_text(TORCHRUN_REPORT.format(code0=-15, code1=-11))
    text = failure_summary(run)
    assert text.startswith("rank 1 failed first (killed by signal SIGSEGV)")
    assert "then stopped: rank 0 (SIGTERM)" in text


def test_oom_detection():
    assert is_oom("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert not is_oom("RuntimeError: Connection reset by peer")
