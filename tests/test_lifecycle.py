"""A run's life at its edges, through real `qlaunch run` processes (2 gloo ranks): where the ranks' code
comes from, Ctrl-C, a killed launcher, a diverged loss, bad data deep in a file, a full or read-only disk."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.procs import descendants
from tests.conftest import BASE_RECIPE, ROOT, TINY_DATA, TINY_MODEL, assert_one_line_error, run_cli

pytestmark = pytest.mark.slow

LONG = BASE_RECIPE.replace("max_steps = 2", "max_steps = 400")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    """`qlaunch ARGS` in a process group of its own, as a shell starts a foreground job (so a signal to the
    group is what a Ctrl-C at the terminal sends)."""
    return subprocess.Popen(
        [sys.executable, "-P", "-m", "launcher.cli", *args],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _metrics(root: Path) -> list[dict]:
    logs = list(root.glob("*/*/metrics.jsonl"))
    return [json.loads(x) for x in logs[0].read_text().splitlines()] if logs else []


def _wait(pred, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not pred():
        assert proc.poll() is None, f"qlaunch exited before {what}: " + "".join(proc.communicate())
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _rank_pids(root: Path) -> list[int]:
    pids = []
    for log in root.glob("*/*/logs/rank*.log"):
        m = re.search(r"start pid=(\d+)", log.read_text())
        if m:
            pids.append(int(m.group(1)))
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _reap(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def test_ranks_import_only_the_installed_package_not_the_current_directory(tmp_path, recipe_file):
    """A launcher/ folder where qlaunch is started must not replace the package on the ranks (python -m
    puts the current directory first on sys.path)."""
    planted = tmp_path / "cwd" / "launcher"
    planted.mkdir(parents=True)
    (planted / "__init__.py").write_text("")
    marker = tmp_path / "PLANTED-CODE-RAN"
    (planted / "rank").mkdir()
    (planted / "rank" / "__init__.py").write_text("")
    (planted / "rank" / "worker.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    rec = recipe_file(BASE_RECIPE.replace("max_steps = 2", "max_steps = 1"))
    r = subprocess.run(
        [sys.executable, "-P", "-m", "launcher.cli", "run", str(rec), "--set", f'log.runs_dir="{tmp_path / "runs"}"'],
        cwd=planted.parent,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert not marker.exists(), "a rank imported launcher.rank.worker from the current directory"
    assert r.returncode == 0, r.stdout + r.stderr


def test_ctrl_c_checkpoints_exits_75_and_the_printed_command_resumes_the_same_run(tmp_path, recipe_file):
    """The terminal sends SIGINT to the whole foreground group. The first one takes the preemption path
    (checkpoint at the next step boundary, exit 75); the resume command it prints, copied verbatim, needs no
    recipe and keeps the first run's --set overrides (the run directory's resolved recipe)."""
    root = tmp_path / "runs"
    rec = recipe_file(BASE_RECIPE.replace("max_steps = 2", "max_steps = 30"))
    args = ["run", str(rec), "--set", f'log.runs_dir="{root}"', "--set", "train.lr=5e-4", "--set", "train.seed=3"]
    proc = _start(args, tmp_path)
    try:
        _wait(lambda: any(m["event"] == "step" for m in _metrics(root)), proc, 300, "the first step")
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, out + err
    assert "Traceback" not in out + err
    assert "stopping: the ranks save a checkpoint at the next step boundary" in err
    run = next(root.glob("*/*/preempted.json")).parent
    info = json.loads((run / "preempted.json").read_text())
    assert (Path(info["checkpoint"]) / "COMPLETE").is_file()
    command = err.split("continue with: ", 1)[1].splitlines()[0]
    assert command == f"qlaunch run --resume {run}"
    r = subprocess.run(
        [sys.executable, "-P", "-m", "launcher.cli", *shlex.split(command)[1:]],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    resumed = [p.parent for p in root.glob("*/*/metrics.jsonl") if p.parent != run]
    assert len(resumed) == 1
    events = [json.loads(x) for x in (resumed[0] / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "resumed"] == [info["step"]]
    assert [e["total_steps"] for e in events if e["event"] == "start"] == [30]
    steps = [e for e in events if e["event"] == "step"]
    assert steps[0]["step"] == info["step"] + 1 and steps[-1]["step"] == 30
    text = (resumed[0] / "recipe.toml").read_text()
    assert "lr = 0.0005" in text and "seed = 3" in text


def test_second_ctrl_c_kills_the_ranks_at_once(tmp_path, recipe_file):
    root = tmp_path / "runs"
    proc = _start(["run", str(recipe_file(LONG)), "--set", f'log.runs_dir="{root}"'], tmp_path)
    pids: list[int] = []
    try:
        # While the ranks are still loading: they cannot reach a step boundary and save within the test.
        _wait(lambda: len(_rank_pids(root)) == 2, proc, 300, "both ranks to start")
        pids = _rank_pids(root)
        assert not any(m["event"] == "step" for m in _metrics(root))
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.3)
        t0 = time.time()
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        seconds = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _reap(pids)
    assert proc.returncode == 130, out + err
    assert seconds < 10
    assert "Traceback" not in out + err
    assert "aborted by a second Ctrl-C" in err
    assert not [p for p in pids if _alive(p)]


def test_sigkill_of_qlaunch_takes_torchrun_and_the_ranks_with_it(tmp_path, recipe_file):
    root = tmp_path / "runs"
    proc = _start(["run", str(recipe_file(LONG)), "--set", f'log.runs_dir="{root}"'], tmp_path)
    tree: list[int] = []
    try:
        _wait(lambda: any(m["event"] == "step" for m in _metrics(root)), proc, 300, "the first step")
        tree = [p for p in descendants(proc.pid) if p != proc.pid]  # torchrun and both ranks
        assert len(tree) >= 3 and set(_rank_pids(root)) <= set(tree)
        proc.kill()
        proc.wait()
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(p) for p in tree):
            time.sleep(0.1)
        left = [p for p in tree if _alive(p)]
    finally:
        _reap(tree)
        proc.communicate()
    assert not left, f"still running after their launcher was killed: {left}"


def _model_with_nan_weights(tmp_path: Path) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    d = tmp_path / "model"
    shutil.copytree(TINY_MODEL, d)
    sd = load_file(str(d / "model.safetensors"))
    sd["model.norm.weight"] = torch.full_like(sd["model.norm.weight"], float("nan"))
    save_file(sd, str(d / "model.safetensors"))
    return d


def test_nan_loss_stops_the_run_at_that_step_without_an_adapter(tmp_path, recipe_file):
    root = tmp_path / "runs"
    rec = recipe_file(LONG.replace(str(TINY_MODEL), str(_model_with_nan_weights(tmp_path))))
    r = run_cli("run", str(rec), "--set", f'log.runs_dir="{root}"', cwd=tmp_path)
    assert r.returncode == 3, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stdout + r.stderr, r.stderr
    assert lines[0].startswith("qlaunch: error: training diverged at step 1: the loss is nan;")
    assert "no checkpoint was saved before it" in lines[0]
    (run,) = [p.parent for p in root.glob("*/*/recipe.toml")]
    assert not (run / "adapter").exists()
    assert json.loads((run / "failed.json").read_text())["kind"] == "diverged"
    assert [m["step"] for m in _metrics(root) if m["event"] == "diverged"] == [1]


def test_exploding_lr_keeps_the_last_good_checkpoint(tmp_path, recipe_file):
    """lr = 1e30: step 1 is finite (the loss is computed before the update), then the weights blow up. The
    run stops at the first non-finite step; the checkpoints before it stay, nothing after it is written."""
    root = tmp_path / "runs"
    rec = recipe_file(BASE_RECIPE.replace("max_steps = 2", "max_steps = 6"))
    r = run_cli(
        "run", str(rec), "--set", f'log.runs_dir="{root}"', "--set", "train.lr=1e30",
        "--set", "train.grad_clip=1e30", "--set", "checkpoint.every_steps=1", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 3, r.stdout + r.stderr
    (run,) = [p.parent for p in root.glob("*/*/recipe.toml")]
    (bad,) = [m["step"] for m in _metrics(root) if m["event"] == "diverged"]
    assert bad >= 2
    saved = sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*") if (p / "COMPLETE").exists())
    assert saved and saved[-1] == bad - 1
    assert f"training diverged at step {bad}:" in r.stderr
    assert f"the last good checkpoint is {run / 'checkpoints' / f'step_{bad - 1:08d}'}" in r.stderr
    assert not (run / "adapter").exists()


def test_a_bad_row_deep_in_a_dataset_is_found_before_spawning(tmp_path, recipe_file):
    """Beyond the rows a quick check reads: the whole data is tokenized before a run directory exists."""
    rows = [json.loads(x) for x in (TINY_DATA / "train.jsonl").read_text().splitlines()]
    path = tmp_path / "big.jsonl"
    lines = [json.dumps(rows[i % len(rows)]) for i in range(2600)]
    lines[2499] = '{"instruction": "x", "output": 7}'
    path.write_text("\n".join(lines) + "\n")
    rec = recipe_file(BASE_RECIPE.replace(str(TINY_DATA / "train.jsonl"), str(path)))
    r = run_cli("run", str(rec), "--set", f'log.runs_dir="{tmp_path / "runs"}"', cwd=tmp_path)
    assert_one_line_error(r, [f"{path}:2500", "column 'output' must be a string"], tmp_path / "runs")


def test_run_without_a_recipe_needs_a_run_directory_to_resume(tmp_path):
    r = run_cli("run", cwd=tmp_path)
    assert_one_line_error(r, ["missing argument 'RECIPE'", "only --resume RUN_DIR"], tmp_path / "runs")
    r = run_cli("run", "--resume", "auto", cwd=tmp_path)
    assert_one_line_error(r, ["missing argument 'RECIPE'", "only --resume RUN_DIR"], tmp_path / "runs")
    r = run_cli("run", "--resume", str(tmp_path), cwd=tmp_path)
    assert_one_line_error(r, [f"--resume {tmp_path}: no recipe.toml in {tmp_path}"], tmp_path / "runs")


# ---------------------------------------------------------------- disks (a private tmpfs in a mount namespace)


def _in_mount_namespace(script: str, timeout: int = 600) -> dict:
    """Run a Python script as root of a new user + mount namespace (its own tmpfs mounts vanish with it);
    it prints one JSON object last. Skips where the kernel or the sandbox does not allow that."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run([unshare, "-rm", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no user/mount namespaces here: {probe.stderr.strip()}")
    r = subprocess.run(
        [unshare, "-rm", sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0 and r.stdout.strip(), r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


QLAUNCH = f"[{sys.executable!r}, '-P', '-m', 'launcher.cli']"


def test_read_only_runs_dir_is_one_line(tmp_path, recipe_file):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    rec = recipe_file()
    out = _in_mount_namespace(f"""
import json, subprocess
subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", {str(mnt)!r}], check=True)
r = subprocess.run({QLAUNCH} + ["run", {str(rec)!r}, "--set", 'log.runs_dir="{mnt}/runs"'],
                   capture_output=True, text=True, cwd={str(tmp_path)!r})
print(json.dumps({{"rc": r.returncode, "out": r.stdout, "err": r.stderr}}))
""")
    lines = [ln for ln in out["err"].splitlines() if ln.strip()]
    assert out["rc"] == 2, out
    assert len(lines) == 1 and "Traceback" not in out["err"] + out["out"], out
    assert f"{mnt}/runs" in lines[0] and "Read-only file system" in lines[0]


def test_disk_full_during_training_is_named(tmp_path, recipe_file):
    """The disk fills up while the ranks train: they can write neither logs nor error records, so the report
    must come from the launcher: one line naming the run directory's device and the cause."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    rec = recipe_file(LONG)
    out = _in_mount_namespace(f"""
import glob, json, os, subprocess, time
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", {str(mnt)!r}], check=True)
p = subprocess.Popen({QLAUNCH} + ["run", {str(rec)!r}, "--set", 'log.runs_dir="{mnt}/runs"'],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd={str(tmp_path)!r})
deadline = time.time() + 300
while time.time() < deadline and p.poll() is None:
    logs = glob.glob({str(mnt)!r} + "/runs/*/*/metrics.jsonl")
    if logs and '"event": "step"' in open(logs[0]).read():
        break
    time.sleep(0.2)
try:
    with open({str(mnt)!r} + "/fill", "wb") as f:
        while True:
            f.write(b"\\0" * (1 << 20))
            f.flush()
except OSError:
    pass
try:
    out, err = p.communicate(timeout=180)
except subprocess.TimeoutExpired:
    p.kill()
    out, err = p.communicate()
print(json.dumps({{"rc": p.returncode, "out": out, "err": err}}))
""")
    lines = [ln for ln in out["err"].splitlines() if ln.strip()]
    assert out["rc"] not in (0, 2), out
    assert len(lines) == 1 and "Traceback" not in out["err"], out
    assert lines[0].startswith(f"qlaunch: error: no space left on the device of {mnt}/runs/"), lines
    assert "continue with: qlaunch run --resume" in lines[0]


def test_sigterm_while_the_launcher_tokenizes_is_one_line_and_leaves_no_lock(tmp_path, recipe_file):
    """SIGTERM (or SLURM's SIGUSR1) before any rank exists: exit 75 with one line; the data-cache lock is
    released (a later run must not wait for a dead builder) and no run directory is left."""
    rows = [json.loads(x) for x in (TINY_DATA / "train.jsonl").read_text().splitlines()]
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps(rows[i % len(rows)]) + "\n" for i in range(150_000)))
    root = tmp_path / "runs"
    rec = recipe_file(BASE_RECIPE.replace(str(TINY_DATA / "train.jsonl"), str(big)))
    proc = _start(["run", str(rec), "--set", f'log.runs_dir="{root}"'], tmp_path)
    try:
        _wait(lambda: list(root.glob(".data-cache/*.lock")), proc, 300, "the data-cache lock")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, out + err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == ["qlaunch: stopped by SIGTERM before any rank started; nothing was trained; run it again to start"]
    assert not list(root.glob(".data-cache/*.lock"))
    assert not list(root.glob("t/*"))


def test_sigterm_as_the_run_directory_appears_is_a_clean_stop(tmp_path, recipe_file):
    """Around spawn there is no moment where SIGTERM kills qlaunch outright: either nothing was started (the
    begun run directory is removed) or the ranks got the stop request (they checkpoint and exit). Exit 75."""
    root = tmp_path / "runs"
    proc = _start(["run", str(recipe_file(LONG)), "--set", f'log.runs_dir="{root}"'], tmp_path)
    try:
        _wait(lambda: list(root.glob("t/*/recipe.toml")), proc, 300, "the run directory")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, out + err
    assert "Traceback" not in out + err
    runs = list(root.glob("t/*"))
    if runs:  # the ranks were started: they stopped at their first step boundary with a checkpoint
        info = json.loads((runs[0] / "preempted.json").read_text())
        assert (Path(info["checkpoint"]) / "COMPLETE").is_file()
    else:
        assert "stopped by SIGTERM before any rank started" in err
