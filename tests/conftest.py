"""Shared fixtures: the shipped tiny model/data, and a way to run the real CLI in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Where the assets are (repo-root assets/ links there): resolved recipes name this real path.
ASSETS = ROOT / "launcher" / "bundled" / "assets"
TINY_MODEL = ASSETS / "tiny-llama"
TINY_DATA = ASSETS / "tiny-data"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process group's or a server's store)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A small but complete recipe; tests write variants of it with `write_recipe`.
BASE_RECIPE = f"""
name = "t"
[model]
path = "{TINY_MODEL}"
[quant]
bits = 4
[lora]
rank = 8
alpha = 16
[data]
datasets = [{{ path = "{TINY_DATA / "train.jsonl"}" }}]
format = "alpaca"
seq_len = 64
[train]
max_steps = 2
micro_batch = 2
global_batch = 4
lr = 1e-3
[launch]
gpus = 2
"""


@pytest.fixture
def recipe_file(tmp_path):
    """Write BASE_RECIPE (or a given text) into tmp_path/recipe.toml and return its path."""

    def write(text: str = BASE_RECIPE, name: str = "recipe.toml") -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p

    return write


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None):
    """Run `qlaunch ARGS` as a user would; returns CompletedProcess with text stdout/stderr."""
    e = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        cwd=cwd or ROOT,
        env=e,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(r: subprocess.CompletedProcess, expect: list[str], runs_dir: Path) -> str:
    """Exit 2, exactly one 'qlaunch: error:' line containing every fragment, no traceback, no run dir."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert len(lines) == 1 and lines[0].startswith("qlaunch: error: "), r.stderr
    for frag in expect:
        assert frag in lines[0], (frag, lines[0])
    assert not runs_dir.exists(), "a run directory was written"
    return lines[0]


def sigterm_after_step(
    args: list[str], runs_root: Path, step: int = 2, wait_s: float = 300, sig: int | None = None, group: bool = False
):
    """Start `qlaunch ARGS`, wait until rank 0 has logged `step` under runs_root, send SIGTERM (or `sig`) to
    qlaunch, or with `group` to every process of the run at once (as SLURM signals a job step).

    Returns (returncode, stdout, stderr, seconds from the signal to exit); the process never outlives it."""
    import json
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "launcher.cli", *args]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=group
    )
    try:
        deadline = time.time() + wait_s
        while time.time() < deadline:
            logs = list(runs_root.glob("*/*/metrics.jsonl"))
            recs = [json.loads(x) for x in logs[0].read_text().splitlines()] if logs else []
            if any(m["event"] == "step" and m["step"] >= step for m in recs):
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        t0 = time.time()
        if group:
            os.killpg(proc.pid, sig or signal.SIGTERM)
        else:
            proc.send_signal(sig or signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        return proc.returncode, out, err, time.time() - t0
    finally:
        if group:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # ranks orphaned by a failed run must not outlive the test
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
