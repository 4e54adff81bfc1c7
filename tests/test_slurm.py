"""SLURM without a cluster: host-list expansion, reading an allocation's environment, the sbatch script.

The script is compared with tests/golden/slurm_2node.sbatch; regenerate it with QLAUNCH_UPDATE_GOLDEN=1
after an intended change and review the diff. tests/test_slurm_real.py runs such a script on real daemons.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from launcher.errors import UserError
from launcher.launch.slurm import SbatchOptions, expand_nodelist, from_env, job_port, render_sbatch
from tests.conftest import run_cli

GOLDEN = Path(__file__).resolve().parent / "golden"


# ------------------------------------------------------------------ host lists


@pytest.mark.parametrize(
    "text, hosts",
    [
        ("gpu01", ["gpu01"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("a[1-2],b3", ["a1", "a2", "b3"]),
        ("node[8-11]", ["node8", "node9", "node10", "node11"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("gpu[1-2]-ib", ["gpu1-ib", "gpu2-ib"]),
        ("x[3],y[0-1],z", ["x3", "y0", "y1", "z"]),
        ("h1.cluster,h2.cluster", ["h1.cluster", "h2.cluster"]),
    ],
)
def test_expand_nodelist(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize("text", ["", "gpu[01-03", "gpu01]", "gpu[3-1]", "gpu[a-b]", "a,,b", "gpu[]"])
def test_expand_nodelist_rejects_malformed(text):
    with pytest.raises(UserError):
        expand_nodelist(text)


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol (slurm-client) not installed")
@pytest.mark.parametrize("text", ["gpu[01-03,07]", "a[1-2],b3", "n[098-101]", "r[1-2]n[1-2]", "gpu[01-3]", "n[9-10]"])
def test_expand_nodelist_agrees_with_scontrol(text, tmp_path):
    """SLURM's own expansion is the reference (it needs a config file, not a running controller)."""
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=t\nSlurmctldHost=localhost\nNodeName=x\n")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    out = subprocess.run(["scontrol", "show", "hostnames", text], capture_output=True, text=True, timeout=30, env=env)
    assert out.returncode == 0, out.stderr
    assert expand_nodelist(text) == out.stdout.split()


# ------------------------------------------------------------------ the allocation's environment

STEP = {
    "SLURM_JOB_ID": "4711",
    "SLURM_JOB_NODELIST": "gpu[01-03,07]",
    "SLURM_JOB_NUM_NODES": "4",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NODELIST": "gpu[01-03,07]",
    "SLURM_STEP_NUM_NODES": "4",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_NODEID": "2",
    "SLURM_PROCID": "2",
    "SLURMD_NODENAME": "gpu03",
}


def test_from_env_outside_slurm():
    assert from_env({}) is None
    assert from_env({"PATH": "/bin"}) is None


def test_from_env_in_an_srun_step():
    n = from_env(STEP)
    assert n.nodes == ("gpu01", "gpu02", "gpu03", "gpu07")
    assert (n.nnodes, n.node_rank, n.master_addr) == (4, 2, "gpu01")
    assert n.master_port == job_port("4711")


def test_from_env_node_rank_from_node_name_first():
    # SLURMD_NODENAME decides; SLURM_NODEID only when the name is not in the list.
    assert from_env({**STEP, "SLURMD_NODENAME": "gpu07", "SLURM_NODEID": "0"}).node_rank == 3
    assert from_env({**STEP, "SLURMD_NODENAME": "elsewhere", "SLURM_NODEID": "1"}).node_rank == 1


def test_from_env_step_on_fewer_nodes_than_the_job():
    env = {**STEP, "SLURM_STEP_NODELIST": "gpu[02-03]", "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NUM_TASKS": "2"}
    n = from_env(env)
    assert n.nodes == ("gpu02", "gpu03") and n.node_rank == 1 and n.master_addr == "gpu02"


def test_from_env_single_node_batch_script():
    n = from_env({"SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "vm", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0"})
    assert (n.nnodes, n.node_rank, n.master_addr) == (1, 0, "vm")


def test_from_env_multi_node_outside_srun_is_an_error():
    env = {k: v for k, v in STEP.items() if not k.startswith("SLURM_STEP")}
    with pytest.raises(UserError, match="srun"):
        from_env(env)


def test_from_env_several_tasks_per_node_is_an_error():
    with pytest.raises(UserError, match="one task per node"):
        from_env({**STEP, "SLURM_STEP_NUM_TASKS": "32"})


def test_from_env_count_mismatch_is_an_error():
    with pytest.raises(UserError, match="names 4"):
        from_env({**STEP, "SLURM_STEP_NUM_NODES": "3"})


def test_job_port_is_even_below_the_ephemeral_range_and_differs_between_jobs():
    ports = {job_port(str(j)) for j in range(1000, 1100)}
    assert len(ports) == 100
    assert all(p % 2 == 0 and 1024 < p and p + 1 < 32768 for p in ports)


# ------------------------------------------------------------------ the sbatch script

OPTS = SbatchOptions(
    recipe="recipes/llama-8b.toml",
    nodes=2,
    gpus_per_node=8,
    job_name="llama-8b",
    workdir="/shared/qlaunch",
    qlaunch=("/shared/qlaunch/.venv/bin/python", "-m", "launcher.cli"),
    output="runs/llama-8b/slurm-%j.out",
    partition="gpu",
    time="04:00:00",
    account="ml-team",
    overrides=("train.lr=2e-4", "data.seq_len=4096"),
    version="0.1.0",
)


def test_sbatch_golden():
    text = render_sbatch(OPTS)
    path = GOLDEN / "slurm_2node.sbatch"
    if os.environ.get("QLAUNCH_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), "slurm_2node.sbatch differs from its golden file (QLAUNCH_UPDATE_GOLDEN=1)"


def test_sbatch_is_valid_bash_with_the_promised_pieces(tmp_path):
    text = render_sbatch(OPTS)
    f = tmp_path / "job.sbatch"
    f.write_text(text)
    assert subprocess.run(["bash", "-n", str(f)], capture_output=True).returncode == 0
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=1" in text
    assert "#SBATCH --gpus-per-node=8" in text and "#SBATCH --requeue" in text
    assert "#SBATCH --signal=B:USR1@180" in text
    assert "#SBATCH --account=ml-team" in text
    assert "--set train.lr=2e-4 --set data.seq_len=4096" in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text and "--resume auto" in text


@pytest.mark.parametrize("field", ["account", "partition", "job_name", "workdir"])
def test_sbatch_rejects_whitespace_in_sbatch_values(field):
    with pytest.raises(UserError, match="whitespace"):
        render_sbatch(replace(OPTS, **{field: "a b"}))


def test_sbatch_cpu_variant():
    text = render_sbatch(replace(OPTS, request_gpus=False, cpus_per_node=16))
    assert "--gpus-per-node" not in text and "--exclusive" not in text
    assert "#SBATCH --cpus-per-task=16" in text


def _run_script(tmp_path: Path, body_env: dict[str, str], srun_behaviour: str):
    """Run the generated script under bash with fake srun/scontrol on PATH (SLURM's own behaviour is
    covered by test_slurm_real.py); returns (exit code, what scontrol and the tasks recorded)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "calls.log"
    (bin_ / "srun").write_text(f'#!/bin/bash\necho "srun $*" >> {log}\n{srun_behaviour}\n')
    (bin_ / "scontrol").write_text(f'#!/bin/bash\necho "scontrol $*" >> {log}\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(replace(OPTS, workdir=str(tmp_path))))
    env = {"PATH": f"{bin_}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", **body_env}
    p = subprocess.Popen(["bash", str(script)], env=env, cwd=tmp_path)
    return p, log


def test_sbatch_script_passes_the_warning_signal_to_srun_and_requeues(tmp_path):
    # The fake srun stands for the ranks: on SIGUSR1 they checkpoint and qlaunch exits 75.
    got = tmp_path / "calls.log"
    ranks = f"trap 'echo srun-got-USR1 >> {got}; exit 75' USR1\nfor i in $(seq 100); do sleep 0.1; done; exit 0"
    p, log = _run_script(tmp_path, {}, ranks)
    time.sleep(1.0)
    p.send_signal(signal.SIGUSR1)
    assert p.wait(timeout=30) == 0
    calls = log.read_text()
    assert "srun-got-USR1" in calls and "scontrol requeue 42" in calls
    assert "--resume" not in calls.splitlines()[0]  # first start: nothing to resume


def test_sbatch_script_resumes_after_a_requeue_and_passes_failures_through(tmp_path):
    p, log = _run_script(tmp_path, {"SLURM_RESTART_COUNT": "1"}, "exit 3")
    assert p.wait(timeout=30) == 3  # a plain failure is not requeued
    calls = log.read_text()
    assert "run recipes/llama-8b.toml --gpus 8" in calls and "--resume auto" in calls
    assert "scontrol" not in calls


def test_qlaunch_slurm_writes_the_script(tmp_path, recipe_file):
    rec = recipe_file()
    out = tmp_path / "job.sbatch"
    args = ["--nodes", "2", "--gpus-per-node", "2", "--no-request-gpus", "--set", "train.global_batch=8"]
    r = run_cli("slurm", str(rec), *args, "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert f"sbatch {out}" in r.stdout
    text = out.read_text()
    assert "#SBATCH --nodes=2" in text and f"run {rec} --gpus 2 --set train.global_batch=8" in text
    assert os.access(out, os.X_OK)


def test_qlaunch_slurm_validates_the_plan_before_anything_is_queued(tmp_path, recipe_file):
    rec = recipe_file()  # global batch 4 cannot be split over 3 nodes x 2 ranks
    r = run_cli("slurm", str(rec), "--nodes", "3", "--gpus-per-node", "2", "-o", str(tmp_path / "x.sbatch"))
    assert r.returncode == 2 and "global_batch" in r.stderr
    assert not (tmp_path / "x.sbatch").exists()


# ------------------------------------------------------------------ `qlaunch run` inside an allocation


def _slurm_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    return {**env, **STEP, **extra}


def test_run_fills_nodes_rank_and_head_from_slurm(recipe_file):
    rec = recipe_file()
    r = run_cli("run", str(rec), "--set", "train.global_batch=16", "--dry-run", env=_slurm_env())
    assert r.returncode == 0, r.stderr
    assert "SLURM job 4711: node 2 of 4, head node gpu01:" in r.stdout
    port = job_port("4711")
    assert f"--nnodes=4 --node-rank=2 --master-addr=gpu01 --master-port={port}" in r.stdout
    assert "world size: 8 = 4 node(s) x 2" in r.stdout


def test_run_flags_win_over_slurm_and_no_slurm_ignores_it(recipe_file):
    rec = recipe_file()
    r = run_cli(
        "run", str(rec), "--set", "train.global_batch=16", "--node-rank", "0", "--master-addr", "h0",
        "--master-port", "29999", "--dry-run", env=_slurm_env(),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "--nnodes=4 --node-rank=0 --master-addr=h0 --master-port=29999" in r.stdout
    r = run_cli("run", str(rec), "--no-slurm", "--dry-run", env=_slurm_env())
    assert r.returncode == 0, r.stderr
    assert "--standalone" in r.stdout and "SLURM job" not in r.stdout


def test_run_in_a_multi_node_batch_script_without_srun_is_a_user_error(recipe_file):
    env = _slurm_env()
    for k in [k for k in env if k.startswith("SLURM_STEP")]:
        del env[k]
    r = run_cli("run", str(recipe_file()), "--dry-run", env=env)
    assert r.returncode == 2 and "srun" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "changes,expect",
    [
        ({"SLURM_STEP_NUM_NODES": "abc"}, "SLURM_STEP_NUM_NODES = 'abc': not a node count"),
        ({"SLURM_STEP_NUM_NODES": "-4"}, "SLURM_STEP_NUM_NODES = '-4': not a node count"),
        ({"SLURM_STEP_NUM_NODES": "4.0"}, "SLURM_STEP_NUM_NODES = '4.0': not a node count"),
        ({"SLURM_STEP_NUM_NODES": "9" * 5000}, "SLURM_STEP_NUM_NODES = '9999999999999999999999999999999999999...'"),
        ({"SLURM_STEP_NUM_TASKS": "four"}, "SLURM_STEP_NUM_TASKS = 'four': not a task count"),
        ({"SLURMD_NODENAME": "elsewhere", "SLURM_NODEID": "x"}, "SLURM_NODEID = 'x': not a node id"),
        ({"SLURMD_NODENAME": "elsewhere", "SLURM_NODEID": "", "SLURM_PROCID": "1e3"}, "SLURM_PROCID = '1e3': not a"),
        ({"SLURM_STEP_NODELIST": "gpu[01-"}, "SLURM_STEP_NODELIST: "),
        ({"SLURM_JOB_ID": "../../x"}, "SLURM_JOB_ID = '../../x': not a job id"),  # it names the run directory
        ({"SLURM_JOB_ID": "7" * 5000}, "SLURM_JOB_ID = '" + "7" * 37 + "...': not a job id"),
    ],
)
def test_from_env_values_slurm_does_not_write_are_one_line_naming_the_variable(changes, expect):
    """`SLURM_JOB_NUM_NODES=abc` and `SLURM_NODEID=x` gave `ValueError: invalid literal for int()` tracebacks."""
    with pytest.raises(UserError) as err:
        from_env({**STEP, **changes})
    assert str(err.value).startswith(expect) and "\n" not in str(err.value), str(err.value)


def test_from_env_job_variables_outside_a_step_are_checked_too():
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_NUM_NODES": "abc"}
    with pytest.raises(UserError, match=r"^SLURM_JOB_NUM_NODES = 'abc': not a node count .*--no-slurm"):
        from_env(env)
    assert from_env({**env, "SLURM_JOB_NUM_NODES": "1"}).nnodes == 1


def test_run_with_a_slurm_variable_that_is_no_number_is_one_line(tmp_path, recipe_file):
    from tests.conftest import assert_one_line_error

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env.update(SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n1", SLURM_JOB_NUM_NODES="abc")
    r = run_cli("run", str(recipe_file()), cwd=tmp_path, env=env)
    assert_one_line_error(r, ["SLURM_JOB_NUM_NODES = 'abc': not a node count"], tmp_path / "runs")


@pytest.mark.parametrize("text", ["n[1-99999999]", "r[1-1000]n[1-1000]", ",".join(["a[1-60000]", "b[1-60000]"])])
def test_expand_nodelist_refuses_more_hosts_than_a_run_can_have(text):
    """`n[1-99999999]` in SLURM_JOB_NODELIST took minutes and gigabytes to expand."""
    with pytest.raises(UserError, match=r"names more than 65536 hosts"):
        expand_nodelist(text)
    assert len(expand_nodelist("n[1-65536]")) == 65536
