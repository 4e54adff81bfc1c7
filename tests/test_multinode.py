"""Multi-node: planning (pure), the node watch (in process, on loopback sockets), and real runs where two
`qlaunch run` processes act as two nodes of 2 CPU ranks each.

The process tests compare against one node of 4 ranks: the same global batch over the same 4 ranks must
give the same loss trajectory (invariant 3), whether the ranks sit on one node or two, sharded plainly or
hybrid (HSDP). The last test puts the two nodes in two network namespaces; it skips without root and
iproute2.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.errors import UserError
from launcher.launch.diagnose import is_peer_failure
from launcher.launch.nodewatch import NodeWatch, describe_node, node_blame
from launcher.launch.spawn import distributed_settings
from launcher.plan.plan import Cluster, check_elastic_nodes, make_plan, multinode_env, parse_nnodes, torchrun_argv
from launcher.plan.recipe_file import load_recipe
from launcher.procs import descendants
from launcher.rundir import RunDir
from tests.conftest import BASE_RECIPE, ROOT, free_port

# ================================================================== planning (pure)


@pytest.mark.parametrize("text, want", [("2", (None, 2)), ("1:4", (1, 4)), ("3:3", (None, 3)), ("1", (None, 1))])
def test_parse_nnodes(text, want):
    assert parse_nnodes(text) == want


@pytest.mark.parametrize("text", ["x", "3:2", "0", "0:2", "1:", ":2", "1:2:3"])
def test_parse_nnodes_rejects(text):
    with pytest.raises(UserError, match="--nnodes"):
        parse_nnodes(text)


def test_elastic_range_must_split_the_batch_at_every_node_count():
    check_elastic_nodes(12, 1, 2, 2, 3)  # 4 and 6 ranks both divide 12
    check_elastic_nodes(6, 1, 2, None, 3)  # not elastic: only the planned count matters (checked elsewhere)
    with pytest.raises(UserError, match="with 2 node"):
        check_elastic_nodes(6, 1, 2, 1, 3)  # 2 | 6, 4 does not


def _recipe(tmp_path: Path, *sets: str):
    p = tmp_path / "r.toml"
    p.write_text(BASE_RECIPE)
    return load_recipe(p, list(sets))


def test_torchrun_argv_static_and_elastic(tmp_path):
    rec = _recipe(tmp_path, "launch.nnodes=2", "train.global_batch=8", "launch.master_port=29555")
    static = Cluster(node_rank=1, master_addr="10.0.0.1")
    argv = torchrun_argv(rec, make_plan(rec, static), static, "RUN")
    assert "--nnodes=2" in argv and "--node-rank=1" in argv and "--master-addr=10.0.0.1" in argv
    assert "--master-port=29555" in argv and "--standalone" not in argv
    elastic = Cluster(rdzv_endpoint="head:29400", rdzv_id="job7", min_nodes=1)
    argv = torchrun_argv(rec, make_plan(rec, elastic), elastic, "RUN")
    assert "--nnodes=1:2" in argv and "--rdzv-backend=c10d" in argv and "--rdzv-endpoint=head:29400" in argv
    assert "--rdzv-id=job7" in argv and not any(a.startswith("--node-rank") for a in argv)


def test_multinode_nccl_defaults_only_where_they_matter(tmp_path):
    assert multinode_env("cpu", 2) == {} and multinode_env("cuda", 1) == {}
    env = multinode_env("cuda", 2)
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3" and env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    rec = _recipe(tmp_path, "launch.nnodes=2", "train.global_batch=8")
    plan = make_plan(rec, Cluster(cuda_devices=2))
    assert plan.env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"  # lands in launch.json's env


def test_hybrid_plan_and_launch_record(tmp_path):
    one = _recipe(tmp_path, "parallel.fsdp.hybrid=true")
    assert make_plan(one, Cluster()).hybrid_shard is False  # one node: nothing to replicate across
    rec = _recipe(tmp_path, "parallel.fsdp.hybrid=true", "launch.nnodes=2", "train.global_batch=8")
    cluster = Cluster(node_rank=0, master_addr="h")
    plan = make_plan(rec, cluster)
    assert plan.hybrid_shard is True
    d = distributed_settings(rec, plan, cluster)
    assert d["mesh"] == {"replicate": 2, "shard": 2}
    assert d["node_watch"] == f"h:{rec.launch.master_port + 1}" and d["collective_timeout_s"] >= 60


# ================================================================== the shared run directory (pure)


def _fake_checkpoint(d: Path, world: int) -> Path:
    """A checkpoint directory laid out as checkpoint.save leaves it (contents are placeholders)."""
    (d / "dcp").mkdir(parents=True)
    (d / "dcp" / ".metadata").write_bytes(b"m")
    for r in range(world):
        (d / "dcp" / f"__{r}_0.distcp").write_bytes(b"x" * (r + 1))
        (d / f"rng_rank{r}.pt").write_bytes(b"r")
    files = {str(p.relative_to(d)): p.stat().st_size for p in sorted(d.rglob("*")) if p.is_file()}
    (d / "meta.json").write_text(json.dumps({"step": 2, "time": 1.0, "world_size": world, "files": files}))
    (d / "COMPLETE").write_text("ok\n")
    return d


def test_checkpoint_missing_a_ranks_shard_is_not_complete(tmp_path):
    from launcher.rank.checkpoint_dir import is_complete, newest_complete

    good = _fake_checkpoint(tmp_path / "ck" / "step_00000002", 4)
    assert is_complete(good) == (True, "")
    # What node 0 sealed while node 1's ranks wrote elsewhere: their files are in neither the
    # directory nor meta.json's list, so the recorded sizes alone would pass.
    bad = _fake_checkpoint(tmp_path / "ck" / "step_00000004", 4)
    meta = json.loads((bad / "meta.json").read_text())
    (bad / "dcp" / "__3_0.distcp").unlink()
    del meta["files"]["dcp/__3_0.distcp"]
    (bad / "meta.json").write_text(json.dumps(meta))
    ok, why = is_complete(bad)
    assert not ok and "dcp/__3_0.distcp is missing" in why
    warnings = []
    assert newest_complete(tmp_path / "ck", warn=warnings.append) == good
    assert "step_00000004" in warnings[0]
    (good / "rng_rank2.pt").unlink()  # listed in meta.json: caught by the recorded files
    assert not is_complete(good)[0]


def test_resume_auto_takes_the_newest_checkpoint_by_time_not_by_directory_name(tmp_path):
    from launcher.rank.checkpoint_dir import find_resume_target

    old = _fake_checkpoint(tmp_path / "t" / "20261127-120000" / "checkpoints" / "step_00000002", 2)
    new = _fake_checkpoint(tmp_path / "t" / "12345" / "checkpoints" / "step_00000002", 2)  # a SLURM job id
    for d, t in ((old, 1.0), (new, 2.0)):
        meta = json.loads((d / "meta.json").read_text())
        (d / "meta.json").write_text(json.dumps({**meta, "time": t}))
    assert find_resume_target("auto", tmp_path, "t") == new.resolve()


def test_shared_run_dir_is_not_reused_by_another_run(tmp_path):
    from launcher.rundir import PLAN_FILE, shared_run_dir

    run = shared_run_dir(tmp_path / "job7", "node0", writer=True, resuming=False)
    assert run.logs == tmp_path / "job7" / "logs" / "node0" and run.launch_file.name == "launch-node0.json"
    (run.path / PLAN_FILE).write_text("{}")
    (run.path / "STOP").touch()  # left by the preempted attempt
    (run.path / "preempted.json").write_text("{}")
    (run.logs / "rank0.error.json").write_text("{}")
    with pytest.raises(UserError, match="already holds a run"):
        shared_run_dir(tmp_path / "job7", "node0", writer=True, resuming=False)
    # Another node of the same run only adds its own folder; it never judges or clears shared files.
    node1 = shared_run_dir(tmp_path / "job7", "node1", writer=False, resuming=False)
    assert node1.path == run.path and node1.logs.is_dir() and (run.path / "STOP").exists()
    # The requeued job (same id, --resume): the previous attempt's stop request and reports are gone.
    shared_run_dir(tmp_path / "job7", "node0", writer=True, resuming=True)
    assert not (run.path / "STOP").exists() and not (run.path / "preempted.json").exists()
    assert not (run.logs / "rank0.error.json").exists()


# ================================================================== failure attribution (pure)


def test_peer_failures_are_told_apart_from_real_ones():
    assert is_peer_failure("RuntimeError: [pair.cc:553] Connection closed by peer [127.0.0.1]:7060")
    assert is_peer_failure("RuntimeError: [pair.cc:537] Read error [10.0.0.2]:41: Connection reset by peer")
    assert is_peer_failure("DistBackendError: NCCL communicator was aborted on rank 3")
    assert not is_peer_failure("ZeroDivisionError: division by zero")
    assert not is_peer_failure("torch.OutOfMemoryError: CUDA out of memory")


PEER_ERR = "rank 0: RuntimeError: Connection closed by peer [127.0.0.1]:7060"


def test_blame_names_the_lost_node():
    peers = [
        {"id": "a", "node_rank": 1, "host": "gpu02", "ranks": [2, 3], "status": "lost", "reason": "gone", "time": 5.0}
    ]
    msg = node_blame(peers, PEER_ERR)
    assert msg.startswith("node 1 (host gpu02, ranks 2-3) failed") and "gone" in msg


def test_blame_prefers_the_earliest_real_failure():
    peers = [
        {"id": "a", "node_rank": 1, "ranks": [2, 3], "status": "exited", "rc": 1, "first": PEER_ERR, "time": 1.0},
        {
            "id": "b",
            "node_rank": 2,
            "ranks": [4, 5],
            "status": "exited",
            "rc": 1,
            "time": 2.0,
            "first": "rank 5: ValueError: bad",
        },
        {"id": "c", "node_rank": 3, "ranks": [6, 7], "status": "exited", "rc": 0, "time": 0.5},
    ]
    msg = node_blame(peers, PEER_ERR)
    assert msg.startswith("node 2 (ranks 4-5) failed first") and "rank 5: ValueError: bad" in msg


def test_no_blame_when_this_node_failed_by_itself_or_nobody_else_did():
    lost = [{"id": "a", "node_rank": 1, "status": "lost", "time": 1.0}]
    assert node_blame(lost, "ZeroDivisionError: division by zero") is None
    assert node_blame([{"id": "a", "node_rank": 1, "status": "exited", "rc": 0}], PEER_ERR) is None


def test_describe_node_without_a_known_node_rank():
    assert describe_node({"ranks": [4, 5], "host": "h"}) == "the node running ranks 4-5 (host h)"
    assert describe_node({"node_rank": 0, "ranks": []}) == "node 0"


# ================================================================== the node watch, in process


def _run_dir(tmp_path: Path, name: str, ranks: list[int]) -> RunDir:
    run = RunDir(tmp_path / name)
    run.logs.mkdir(parents=True)
    for r in ranks:
        (run.logs / f"rank{r}.log").write_text("")
    return run


def _wait_for(pred, timeout: float, what: str):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _peer(watch: NodeWatch, node_rank: int) -> dict | None:
    return next((p for p in watch.snapshot() if p.get("node_rank") == node_rank), None)


def test_watch_reports_a_failed_node_and_a_vanished_one(tmp_path):
    port = free_port()
    addr = ("127.0.0.1", port)
    host = NodeWatch(_run_dir(tmp_path, "n0", [0, 1]), addr, True, 0, 30, stop_on_loss=False).start()
    run1 = _run_dir(tmp_path, "n1", [2, 3])
    n1 = NodeWatch(run1, addr, False, 1, 30, stop_on_loss=False).start()
    n2 = NodeWatch(_run_dir(tmp_path, "n2", [4, 5]), addr, False, 2, 30, stop_on_loss=False).start()
    try:
        _wait_for(lambda: _peer(host, 1) and _peer(host, 2), 10, "both nodes to connect")
        # Node 1's rank 3 fails by itself; its qlaunch reports that before exiting.
        (run1.logs / "rank3.error.json").write_text(json.dumps({"rank": 3, "time": 1.0, "message": "ValueError: x"}))
        n1.finish(1, wait_s=0)
        _wait_for(lambda: _peer(host, 1)["status"] == "exited", 10, "node 1's exit report")
        assert _peer(host, 1)["first"] == "rank 3: ValueError: x" and _peer(host, 1)["ranks"] == [2, 3]
        # Node 2 vanishes without a word (its connection drops).
        n2.close()
        _wait_for(lambda: _peer(host, 2)["status"] == "lost", 10, "node 2 to count as lost")
        msg = node_blame(host.snapshot(), PEER_ERR)
        assert msg.startswith("node 1 (") and "rank 3: ValueError: x" in msg  # node 1 failed first
        # The host's own end reaches the remaining client.
        host.finish(1, wait_s=0)
    finally:
        for w in (host, n1, n2):
            w.close()


def test_watch_client_notices_the_host_going_away(tmp_path):
    addr = ("127.0.0.1", free_port())
    host = NodeWatch(_run_dir(tmp_path, "n0", [0, 1]), addr, True, 0, 30, stop_on_loss=False).start()
    n1 = NodeWatch(_run_dir(tmp_path, "n1", [2, 3]), addr, False, 1, 30, stop_on_loss=False).start()
    try:
        _wait_for(lambda: _peer(n1, 0), 10, "the host's first heartbeat")
        host.close()
        _wait_for(lambda: _peer(n1, 0)["status"] == "lost", 10, "the host to count as lost")
        assert node_blame(n1.snapshot(), PEER_ERR).startswith("node 0 (")
    finally:
        host.close(), n1.close()


def test_watch_silent_node_is_lost_and_local_ranks_are_stopped(tmp_path):
    """A node whose connection stays open but says nothing (cut off from the network: no FIN ever
    arrives) is lost after node_timeout; a run that cannot continue then stops its own ranks."""
    addr = ("127.0.0.1", free_port())
    host = NodeWatch(_run_dir(tmp_path, "n0", [0, 1]), addr, True, 0, 2.0, stop_on_loss=True).start()
    ranks = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    host.attach(ranks)
    mute = socket.create_connection(addr)
    try:
        hello = {
            "t": "hello",
            "peer": {"id": "mute/1", "node_rank": 1, "host": "h", "ranks": [2, 3], "status": "running"},
        }
        mute.sendall((json.dumps(hello) + "\n").encode())
        _wait_for(lambda: _peer(host, 1), 10, "the mute node's hello")
        lost = _wait_for(lambda: (p := _peer(host, 1)) and p["status"] == "lost" and p, 15, "silence to be noticed")
        assert "no heartbeat" in lost["reason"]
        assert ranks.wait(timeout=15) == -signal.SIGTERM  # stopped after another node_timeout
        assert host.stopped_for.startswith("node 1")
    finally:
        mute.close(), host.close()
        if ranks.poll() is None:
            ranks.kill()


# Stands in for torchrun in its exit barrier: deaf to SIGTERM, with a rank of its own in its own session.
DEAF_AGENT = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
rank = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"], start_new_session=True)
print(rank.pid, flush=True)
time.sleep(60)
"""


def _gone(pid: int) -> bool:
    """Exited (a zombie not yet reaped by its new parent counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def test_watch_stops_local_ranks_when_another_node_reports_its_ranks_failed(tmp_path, monkeypatch):
    """A node whose ranks failed says so and leaves cleanly (no lost connection), while this node may be
    waiting on it where no error ever comes (torchrun's exit barrier: 300 s). After the node timeout its
    ranks are stopped; a torchrun that ignores SIGTERM is killed with everything it started."""

    monkeypatch.setattr("launcher.procs.KILL_GRACE_S", 1.0)
    addr = ("127.0.0.1", free_port())
    notes: list[str] = []
    host = NodeWatch(_run_dir(tmp_path, "n0", [0, 1]), addr, True, 0, 1.0, stop_on_loss=True, log=notes.append)
    host.start()
    agent = subprocess.Popen([sys.executable, "-c", DEAF_AGENT], stdout=subprocess.PIPE, text=True)
    rank = int(agent.stdout.readline())
    host.attach(agent)
    run1 = _run_dir(tmp_path, "n1", [2, 3])
    n1 = NodeWatch(run1, addr, False, 1, 30, stop_on_loss=False).start()
    try:
        _wait_for(lambda: _peer(host, 1), 10, "node 1 to connect")
        (run1.logs / "rank3.error.json").write_text(json.dumps({"rank": 3, "time": 1.0, "message": "ValueError: x"}))
        n1.finish(1, wait_s=0)
        assert agent.wait(timeout=20) == -signal.SIGKILL  # SIGTERM after 1 s, ignored; killed 1 s later
        _wait_for(lambda: _gone(rank), 10, "its rank to be killed too")
        assert host.stopped_for.startswith("node 1")
        assert any(
            n.startswith("node watch: node 1 (")
            and n.endswith("its ranks failed (exit status 1): rank 3: ValueError: x")
            for n in notes
        ), notes
    finally:
        host.close(), n1.close()
        for pid in (agent.pid, rank):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ================================================================== real runs: two nodes on loopback

NODE_RECIPE = BASE_RECIPE.replace("micro_batch = 2", "micro_batch = 1").replace(
    "lr = 1e-3", 'lr = 1e-3\nschedule = "constant"\nwarmup_steps = 0'
)
STEPS = 3


def _write_recipe(tmp_path: Path, runs: Path) -> Path:
    p = tmp_path / "recipe.toml"
    p.write_text(NODE_RECIPE + f'\n[log]\nruns_dir = "{runs}"\n')
    return p


def _port_pair() -> int:
    """A port p with p+1 also free (torchrun's store on p, the node watch on p+1), below the ephemeral
    range so that no outgoing connection takes it meanwhile."""
    import random

    for _ in range(200):
        p = random.randrange(20000, 32000, 2)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("", p))
                b.bind(("", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def _start(args: list[str], log: Path, prefix: list[str] | None = None, env: dict | None = None) -> subprocess.Popen:
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    with open(log, "w") as fh:
        return subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "launcher.cli", "run", *args],
            cwd=ROOT,
            env=e,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def _kill_node(proc: subprocess.Popen) -> None:
    pids = descendants(proc.pid)  # a "node" dies only when all of them do
    for p in pids:  # freeze first so nothing reacts (or respawns) while the rest are being killed
        try:
            os.kill(p, signal.SIGSTOP)
        except ProcessLookupError:
            pass
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _cleanup(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            _kill_node(p)


def _run_dir_of(log: Path) -> Path:
    m = re.search(r"run directory: (\S+)", log.read_text())
    assert m, log.read_text()
    return Path(m.group(1))


def _losses(run_dir: Path) -> list[float]:
    if not (run_dir / "metrics.jsonl").exists():
        return []
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["loss"] for r in rows if r.get("event") == "step"]


def _trajectory(run_dir: Path) -> list[float]:
    """Loss and gradient norm of every step: the norm catches a gradient reduced at the wrong scale,
    which Adam's scale invariance would hide from the loss."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [v for r in rows if r.get("event") == "step" for v in (r["loss"], r["grad_norm"])]


def _steps_done(log: Path, procs: list[subprocess.Popen]) -> int:
    """Steps node 0 has logged; fails at once (with the logs) if a node has already exited."""
    for p in procs:
        if p.poll() is not None:
            logs = "\n".join(f"--- {f.name}\n{f.read_text()[-4000:]}" for f in sorted(log.parent.glob("node*.log")))
            raise AssertionError(f"a node exited early (rc {p.returncode}):\n{logs}")
    return len(_losses(_run_dir_of(log))) if "run directory" in log.read_text() else 0


def _report(logs: list[Path]) -> str:
    """Each node's output, then the end of every log in the run directories it names: rank logs, the
    torchrun log (launcher.log) and the node watch's notes (nodes.log)."""
    out, dirs = [], []
    for log in logs:
        text = log.read_text(errors="replace") if log.exists() else "(no output)"
        out.append(f"--- {log.name}\n{text[-4000:]}")
        m = re.search(r"run directory: (\S+)", text)
        if m and m.group(1) not in dirs:
            dirs.append(m.group(1))
    for d in dirs:
        for f in sorted(Path(d).glob("logs/**/*.log")):
            out.append(f"--- {f}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-30:]))
    return "\n".join(out)


def _wait(procs: list[subprocess.Popen], timeout: float, logs: list[Path] | None = None) -> list[int]:
    """Exit codes; past the timeout an AssertionError saying which node is still running and, given the
    node logs, what every rank and torchrun logged (a bare TimeoutExpired left nothing to go on)."""
    t0 = time.time()
    for p in procs:
        try:
            p.wait(timeout=max(1.0, timeout - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            state = ", ".join(
                f"node {i}: " + ("running" if q.poll() is None else f"rc {q.returncode}") for i, q in enumerate(procs)
            )
            raise AssertionError(
                f"still running after {timeout:.0f}s ({state})\n" + (_report(logs) if logs else "")
            ) from None
    return [p.returncode for p in procs]


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    """The reference: one node, 4 ranks, plain FSDP."""
    tmp = tmp_path_factory.mktemp("one_node")
    recipe = _write_recipe(tmp, tmp / "runs")
    log = tmp / "node.log"
    p = _start([str(recipe), "--gpus", "4", "--set", f"train.max_steps={STEPS}"], log)
    try:
        assert _wait([p], 300) == [0], log.read_text()
    finally:
        _cleanup(p)
    traj = _trajectory(_run_dir_of(log))
    assert len(traj) == 2 * STEPS
    return traj


def _two_nodes(tmp_path: Path, extra: list[str], rdzv: bool = False, port: int | None = None, tag: str = "node"):
    """Two `qlaunch run` processes, 2 ranks each, the same command but for the node rank."""
    recipe = _write_recipe(tmp_path, tmp_path / "runs")
    port = port or _port_pair()
    common = [str(recipe), "--gpus", "2", "--nnodes", "2", *extra]
    if rdzv:
        where = [["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "t"]] * 2
    else:
        where = [["--node-rank", str(r), "--master-addr", "127.0.0.1", "--master-port", str(port)] for r in (0, 1)]
    logs = [tmp_path / f"{tag}{r}.log" for r in (0, 1)]
    procs = [_start(common + w, log) for w, log in zip(where, logs, strict=True)]
    return procs, logs


@pytest.mark.slow
def test_two_nodes_train_like_one(tmp_path, one_node):
    procs, logs = _two_nodes(tmp_path, ["--set", f"train.max_steps={STEPS}"])
    try:
        assert _wait(procs, 300, logs) == [0, 0], _report(logs)
    finally:
        _cleanup(*procs)
    d0, d1 = _run_dir_of(logs[0]), _run_dir_of(logs[1])
    assert d0 == d1  # one run directory for the whole run, each node's logs in their own folder
    assert _trajectory(d0) == pytest.approx(one_node, rel=1e-5)
    assert (d0 / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (d1 / "logs" / "node1").glob("rank*.log")) == ["rank2.log", "rank3.log"]
    assert "node 1: ranks 2-3 running" in logs[1].read_text()
    spec = json.loads((d0 / "launch-node0.json").read_text())
    assert "--node-rank=0" in spec["argv"] and spec["distributed"]["node_watch"].startswith("127.0.0.1:")


@pytest.mark.slow
def test_two_nodes_hybrid_sharding_over_elastic_rendezvous_trains_like_one(tmp_path, one_node):
    """HSDP (replicate across the 2 nodes, shard within each) over a c10d rendezvous: same losses."""
    procs, logs = _two_nodes(
        tmp_path, ["--set", f"train.max_steps={STEPS}", "--set", "parallel.fsdp.hybrid=true"], rdzv=True
    )
    try:
        assert _wait(procs, 300, logs) == [0, 0], _report(logs)
    finally:
        _cleanup(*procs)
    head, other = (_run_dir_of(log) for log in logs)
    assert head == other and head.name == "t"  # named by the rendezvous id, shared by both nodes
    assert _trajectory(head) == pytest.approx(one_node, rel=1e-4)
    # The rendezvous chose which node has rank 0; each node is named by host and process.
    rank0_log = next(head.glob("logs/*/rank0.log"))
    spec = json.loads((head / f"launch-{rank0_log.parent.name}.json").read_text())
    assert spec["distributed"]["mesh"] == {"replicate": 2, "shard": 2}
    assert "hybrid sharding: replicate x2 (nodes), shard x2" in rank0_log.read_text()
    assert "--rdzv-backend=c10d" in spec["argv"]


@pytest.mark.slow
def test_killed_node_is_named_on_node_0(tmp_path, one_node):
    procs, logs = _two_nodes(tmp_path, ["--set", "train.max_steps=500"])
    try:
        # Kill node 1 (qlaunch, torchrun and its ranks) once node 0 has logged STEPS steps.
        _wait_for(lambda: _steps_done(logs[0], procs) >= STEPS, 300, "node 0 to train")
        _kill_node(procs[1])
        t_kill = time.time()
        rc = _wait([procs[0]], 120)[0]
        took = time.time() - t_kill
    finally:
        _cleanup(*procs)
    out = logs[0].read_text()
    assert rc != 0, out
    assert re.search(r"node 1 \(host \S+, ranks 2-3\) failed at [\d:]+: its qlaunch went away", out), out
    assert took < 60, f"node 0 took {took:.0f}s to give up"
    # The steps both nodes trained together were the reference's.
    assert _trajectory(_run_dir_of(logs[0]))[: 2 * STEPS] == pytest.approx(one_node, rel=1e-5)


@pytest.mark.slow
def test_two_nodes_checkpoint_into_one_run_dir_and_resume_there(tmp_path, one_node):
    """Both nodes write one checkpoint (all 4 ranks' shards, in the run directory they share); a second
    start of the same run (a SLURM requeue: same id, --resume auto on both nodes) resumes in that
    directory and continues exactly like the uninterrupted reference. Starting it without --resume is
    refused: a run directory is never reused by a different run."""
    port = _port_pair()
    ckpt = ["--set", "checkpoint.every_steps=2"]
    procs, logs = _two_nodes(tmp_path, [*ckpt, "--set", "train.max_steps=2"], port=port, tag="first")
    try:
        assert _wait(procs, 300, logs) == [0, 0], _report(logs)
    finally:
        _cleanup(*procs)
    run = _run_dir_of(logs[0])
    assert _run_dir_of(logs[1]) == run and run.name == f"127.0.0.1-{port}"
    step2 = run / "checkpoints" / "step_00000002"
    assert (step2 / "COMPLETE").is_file() and not list(run.glob("checkpoints/*.tmp"))
    assert sorted(p.name for p in (step2 / "dcp").glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]
    assert sorted(p.name for p in step2.glob("rng_rank*.pt")) == [f"rng_rank{r}.pt" for r in range(4)]
    assert json.loads((step2 / "meta.json").read_text())["world_size"] == 4

    again = _start([str(tmp_path / "recipe.toml"), "--gpus", "2", "--nnodes", "2", "--node-rank", "0",
                    "--master-port", str(port)], tmp_path / "again.log")  # fmt: skip
    try:
        assert _wait([again], 120) == [2]
    finally:
        _cleanup(again)
    assert "already holds a run: continue it with --resume auto" in (tmp_path / "again.log").read_text()

    procs, logs = _two_nodes(
        tmp_path, [*ckpt, "--set", f"train.max_steps={STEPS}", "--resume", "auto"], port=port, tag="resumed"
    )
    try:
        assert _wait(procs, 300, logs) == [0, 0], _report(logs)
    finally:
        _cleanup(*procs)
    assert _run_dir_of(logs[0]) == run and _run_dir_of(logs[1]) == run
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["step"] for r in rows if r["event"] == "resumed"] == [2]
    # Steps 1-2 from the first start, step 3 after the resume: together, the uninterrupted trajectory.
    assert _trajectory(run) == pytest.approx(one_node, rel=1e-5)
    assert (run / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").is_file()


# ================================================================== real runs: two network namespaces

NS = ("qlnodeA", "qlnodeB")
ADDR = ("10.231.7.1", "10.231.7.2")
VETH = ("qlvethA", "qlvethB")


def _netns_unavailable() -> str | None:
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = subprocess.run(["ip", "netns", "add", "qlprobe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns add` failed here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "qlprobe"], capture_output=True)
    return None


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_namespaces():
    """Two namespaces joined by a veth pair, 10.231.7.1 <-> .2, each with its own loopback; removed
    afterwards whatever happens (deleting a namespace also deletes its end of the veth pair)."""
    why = _netns_unavailable()
    if why:
        pytest.skip(why)
    for ns in NS:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # leftovers of an aborted run
    try:
        for ns in NS:
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "link", "add", VETH[0], "netns", NS[0], "type", "veth", "peer", "name", VETH[1], "netns", NS[1])
        for ns, veth, addr in zip(NS, VETH, ADDR, strict=True):
            _sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", veth)
            _sh("ip", "-n", ns, "link", "set", veth, "up")
        yield
    finally:
        for ns in NS:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.slow
def test_two_namespaces_train_like_one_and_a_cut_link_names_the_node(tmp_path, one_node, two_namespaces):
    """Each node in its own network namespace with its own address: the same losses as one node; then
    the link between them goes down (no FIN, no RST: only silence) and node 0 names node 1."""
    recipe = _write_recipe(tmp_path, tmp_path / "runs")
    port = 29611
    logs = [tmp_path / f"node{r}.log" for r in (0, 1)]
    procs = []
    try:
        for r in (0, 1):
            args = [str(recipe), "--gpus", "2", "--nnodes", "2", "--node-rank", str(r), "--master-addr", ADDR[0]]
            args += ["--master-port", str(port), "--node-timeout", "10", "--set", "train.max_steps=500"]
            # Gloo binds to the address of this interface (the hostname resolves to nothing in here).
            env = {"GLOO_SOCKET_IFNAME": VETH[r]}
            procs.append(_start(args, logs[r], prefix=["ip", "netns", "exec", NS[r]], env=env))
        _wait_for(lambda: _steps_done(logs[0], procs) >= STEPS, 300, "node 0 to train")
        assert _trajectory(_run_dir_of(logs[0]))[: 2 * STEPS] == pytest.approx(one_node, rel=1e-5)
        _sh("ip", "-n", NS[1], "link", "set", VETH[1], "down")
        t_cut = time.time()
        rc = _wait([procs[0]], 150)[0]
        took = time.time() - t_cut
        out = logs[0].read_text()
        assert rc != 0, out
        assert re.search(r"node 1 \(host \S+, ranks 2-3\) failed at [\d:]+: no heartbeat", out), out
        assert took < 90, f"node 0 took {took:.0f}s to give up"
    finally:
        _cleanup(*procs)
