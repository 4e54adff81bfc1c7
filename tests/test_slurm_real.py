"""`qlaunch slurm` scripts on a real SLURM: slurmctld, slurmd and munged started here, from Debian's
packages (scripts/ci_setup_slurm.sh installs them), with a generated slurm.conf and munge key in a
temporary directory. The daemons are stopped, and the namespaces removed, whatever the tests do.

- one node, on loopback: the job trains and saves its adapter; a time-limit warning (SIGUSR1) makes it
  checkpoint, requeue itself and resume from that checkpoint.
- two nodes: one slurmd per network namespace (two slurmd cannot share one network stack unless SLURM
  was built with --enable-multiple-slurmd, which Debian's is not), each with its own address, joined
  by a veth pair; slurmctld runs in the first. Skipped without root and iproute2.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import BASE_RECIPE, ROOT

DAEMONS = ("slurmctld", "slurmd", "munged", "mungekey", "sbatch", "squeue", "scontrol")


def _unavailable() -> str | None:
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if missing:
        return f"SLURM not installed ({', '.join(missing)} missing): run scripts/ci_setup_slurm.sh"
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))]


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port(host: str = "") -> int:
    for _ in range(200):
        p = random.randrange(20000, 32000)
        try:
            with socket.socket() as s:
                s.bind((host, p))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port")


class LocalSlurm:
    """A throwaway SLURM: munged + slurmctld + one slurmd per node. A node is (name, address, netns);
    with netns None everything runs in this network namespace. `hosts` gives, per namespace, the file
    its processes see as /etc/hosts."""

    def __init__(self, root: Path, nodes: list[tuple[str, str, str | None]], hosts: dict[str, Path] | None = None):
        self.root, self.nodes, self.hosts = root, nodes, hosts or {}
        self.ctld_ns = nodes[0][2]
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.pids: list[Path] = []

    def ns(self, netns: str | None) -> list[str]:
        """Prefix that runs a command in netns with its own /etc/hosts. Not `ip netns exec`: that also
        remounts /sys, hiding the cgroup filesystem slurmd insists on finding."""
        if not netns:
            return []
        prefix = ["nsenter", f"--net=/run/netns/{netns}", "--"]
        if netns in self.hosts:
            # A private mount namespace, so the bind mount is seen by this command (and the daemons and
            # jobs it starts) only.
            prefix += ["unshare", "--mount", "--propagation", "private", "--"]
            prefix += ["sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(self.hosts[netns])]
        return prefix

    def cmd(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """A SLURM client command, run where slurmctld can be reached."""
        return subprocess.run(
            [*self.ns(self.ctld_ns), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def start(self) -> LocalSlurm:
        r = self.root
        for d in ("state", "munge", *(f"spool/{name}" for name, _, _ in self.nodes)):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "munge").chmod(0o700)
        key = r / "munge" / "munge.key"
        subprocess.run([_exe("mungekey"), "-c", "-k", str(key)], check=True, capture_output=True)
        sock = r / "munge" / "sock"
        munge_pid = r / "munge" / "pid"
        subprocess.run(
            [_exe("munged"), "-f", f"--socket={sock}", f"--key-file={key}", f"--log-file={r / 'munge' / 'log'}"]
            + [f"--pid-file={munge_pid}", f"--seed-file={r / 'munge' / 'seed'}"],
            check=True,
            capture_output=True,
        )
        self.pids.append(munge_pid)
        host = socket.gethostname()
        ctld_addr = self.nodes[0][1]
        ctld_port = _free_port()
        slurmd_port = _free_port()
        cpus = os.cpu_count() or 1
        lines = [
            "ClusterName=qltest",
            f"SlurmctldHost={host}({ctld_addr})",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "AuthType=auth/munge",
            # A requeued job waits out the credential lifetime before it may start again: its old
            # credential is revoked on the nodes until then, and a launch before that fails at once
            # ("Job credential revoked", exit 1:0). 15 s instead of the default 120 keeps the requeue tests
            # short without forcing the start time (which raced exactly that).
            f"AuthInfo=socket={sock},cred_expire=15",
            "CredType=cred/munge",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd'}.%n.pid",
            f"SlurmctldLogFile={r / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'slurmd'}.%n.log",
            # No cgroups here: track processes by parent id, bind nothing.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/builtin",
            "KillWait=10",
            "MinJobAge=600",  # keep finished jobs visible to `scontrol show job`
            *(f"NodeName={name} NodeAddr={addr} CPUs={cpus} State=UNKNOWN" for name, addr, _ in self.nodes),
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        subprocess.run(
            [*self.ns(self.ctld_ns), _exe("slurmctld"), "-i", "-f", str(self.conf)],
            check=True,
            capture_output=True,
            env=self.env,
        )
        self.pids.append(r / "slurmctld.pid")
        for name, _, netns in self.nodes:
            subprocess.run(
                [*self.ns(netns), _exe("slurmd"), "-N", name, "-f", str(self.conf)],
                check=True,
                capture_output=True,
                env=self.env,
            )
            self.pids.append(r / f"slurmd.{name}.pid")
        t0 = time.time()
        while True:
            out = self.cmd("sinfo", "-h", "-N", "-o", "%N %T").stdout.split("\n")
            if sum("idle" in line for line in out) == len(self.nodes):
                return self
            if time.time() - t0 > 60:
                raise RuntimeError(f"nodes not idle after 60s: {out}\n{self.logs()}")
            time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(
            f"--- {f.name}\n" + f.read_text(errors="replace")[-3000:] for f in sorted(self.root.glob("*.log"))
        )

    def stop(self) -> None:
        self.cmd("scancel", "--user", "root", "--full", timeout=30)
        t0 = time.time()
        while time.time() - t0 < 30 and self.cmd("squeue", "-h").stdout.strip():
            time.sleep(0.5)
        # slurmd first (it ends its slurmstepds' jobs), then the controller, then munge; each by the
        # pid it wrote, and waited for, so that the next test's daemons find their ports free.
        for pidfile in reversed(self.pids):
            try:
                pid = int(pidfile.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass

    def submit(self, script: Path, cwd: Path) -> str:
        out = subprocess.run(
            [*self.ns(self.ctld_ns), "sbatch", "--parsable", str(script)],
            env=self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        text = self.cmd("scontrol", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S+)", text))

    def wait_done(self, job_id: str, timeout: float, on_poll=None) -> dict[str, str]:
        t0 = time.time()
        while time.time() - t0 < timeout:
            j = self.job(job_id)
            if on_poll:
                on_poll(j)
            if j.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return j
            time.sleep(1)
        raise AssertionError(f"job {job_id} not done after {timeout}s: {self.job(job_id)}\n{self.logs()}")


def _recipe(tmp: Path, steps: int) -> Path:
    p = tmp / "recipe.toml"
    text = BASE_RECIPE.replace("micro_batch = 2", "micro_batch = 1").replace("max_steps = 2", f"max_steps = {steps}")
    p.write_text(text + f'\n[log]\nruns_dir = "{tmp / "runs"}"\n')
    return p


def _write_script(tmp: Path, recipe: Path, nodes: int, *extra: str) -> Path:
    out = tmp / "job.sbatch"
    r = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "slurm", str(recipe), "--nodes", str(nodes)]
        + ["--gpus-per-node", "2", "--no-request-gpus", "-o", str(out), *extra],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert f"sbatch {out}" in r.stdout
    return out


def _job_output(tmp: Path, job_id: str) -> str:
    f = tmp / "runs" / "t" / f"slurm-{job_id}.out"
    return f.read_text(errors="replace") if f.exists() else "(no job output)"


# ------------------------------------------------------------------ one node, loopback


@pytest.fixture(scope="module")
def one_node_slurm(tmp_path_factory):
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm1"), [(socket.gethostname(), "127.0.0.1", None)])
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def test_one_node_job_trains_and_saves_the_adapter(tmp_path, one_node_slurm):
    s = one_node_slurm
    script = _write_script(tmp_path, _recipe(tmp_path, 2), 1)
    t0 = time.time()
    job_id = s.submit(script, tmp_path)
    j = s.wait_done(job_id, 150)
    took = time.time() - t0
    out = _job_output(tmp_path, job_id)
    assert (j["JobState"], j["ExitCode"]) == ("COMPLETED", "0:0"), out + s.logs()
    assert f"SLURM job {job_id}: node 0 of 1" in out
    adapters = list((tmp_path / "runs" / "t").glob("*/adapter/adapter_model.safetensors"))
    assert len(adapters) == 1, out
    print(f"1-node SLURM job: {took:.0f}s from sbatch to COMPLETED")


def test_time_limit_warning_checkpoints_requeues_and_resumes(tmp_path, one_node_slurm):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@N sends before the time limit): the ranks save a
    checkpoint and stop, the job requeues itself, and the second start resumes from that checkpoint."""
    s = one_node_slurm
    script = _write_script(tmp_path, _recipe(tmp_path, 40), 1)
    job_id = s.submit(script, tmp_path)
    log = tmp_path / "runs" / "t" / f"slurm-{job_id}.out"
    t0 = time.time()
    while not re.search(r"step 3/40 ", log.read_text() if log.exists() else ""):
        assert time.time() - t0 < 180, _job_output(tmp_path, job_id) + s.logs()
        time.sleep(1)
    assert s.cmd("scancel", "--signal=USR1", "--batch", job_id).returncode == 0
    requeued = []

    def seen(j):
        # A requeued job waits for its new begin time (the credential lifetime, see LocalSlurm.start).
        if j.get("JobState") == "PENDING" and j.get("Reason") == "BeginTime":
            requeued.append(j)

    j = s.wait_done(job_id, 420, on_poll=seen)
    out = _job_output(tmp_path, job_id)
    assert (j["JobState"], j["ExitCode"]) == ("COMPLETED", "0:0"), out + s.logs()
    assert int(j["Restarts"]) == 1 and requeued, out
    assert "requeueing job" in out
    m = re.search(r"resumed from step (\d+)", out)
    assert m and int(m.group(1)) >= 3, out
    assert "step 40/40" in out
    assert len(list((tmp_path / "runs" / "t").glob("*/adapter/adapter_model.safetensors"))) == 1


# ------------------------------------------------------------------ two nodes, two network namespaces

NS = ("qlslurmA", "qlslurmB")
NAMES = ("qln1", "qln2")
ADDRS = ("10.231.9.1", "10.231.9.2")


def _netns_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if shutil.which("nsenter") is None or shutil.which("unshare") is None:
        return "util-linux's nsenter/unshare are not installed"
    probe = subprocess.run(["ip", "netns", "add", "qlprobe2"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns add` failed here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "qlprobe2"], capture_output=True)
    return None


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def two_node_slurm(tmp_path_factory):
    """slurmd `qln1` in namespace A (10.231.9.1, with slurmctld), `qln2` in B (10.231.9.2). Inside
    each, /etc/hosts names both nodes, and this machine's hostname resolves to the namespace's own
    address, as on a real cluster."""
    why = _netns_unavailable()
    if why:
        pytest.skip(why)
    host = socket.gethostname()
    root = tmp_path_factory.mktemp("slurm2")
    cluster = None
    try:
        for ns in NS:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        # Both ends are called eth0, so a single GLOO/NCCL_SOCKET_IFNAME would fit both nodes.
        _sh("ip", "link", "add", "qlsA0", "netns", NS[0], "type", "veth", "peer", "name", "qlsB0", "netns", NS[1])
        for ns, dev, addr in zip(NS, ("qlsA0", "qlsB0"), ADDRS, strict=True):
            _sh("ip", "-n", ns, "link", "set", dev, "name", "eth0")
            _sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            hosts = ["127.0.0.1 localhost", f"{addr} {host}"] + [f"{a} {n}" for a, n in zip(ADDRS, NAMES, strict=True)]
            (root / f"hosts.{ns}").write_text("\n".join(hosts) + "\n")
        cluster = LocalSlurm(root, list(zip(NAMES, ADDRS, NS, strict=True)), {ns: root / f"hosts.{ns}" for ns in NS})
        yield cluster.start()
    finally:
        if cluster is not None:
            cluster.stop()
        for ns in NS:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_two_node_job_trains_across_both_nodes(tmp_path, two_node_slurm):
    s = two_node_slurm
    script = _write_script(tmp_path, _recipe(tmp_path, 2), 2)
    t0 = time.time()
    job_id = s.submit(script, tmp_path)
    j = s.wait_done(job_id, 200)
    took = time.time() - t0
    out = _job_output(tmp_path, job_id)
    assert (j["JobState"], j["ExitCode"]) == ("COMPLETED", "0:0"), out + s.logs()
    assert j["NodeList"] == "qln[1-2]"
    # Each node's qlaunch found its place from SLURM alone; qln1 (first in the list) is the head.
    assert re.search(rf"SLURM job {job_id}: node 0 of 2, head node qln1:\d+", out), out
    assert re.search(rf"SLURM job {job_id}: node 1 of 2, head node qln1:\d+", out), out
    assert "node 1: ranks 2-3 running" in out and "training 2 steps on 4 rank(s)" in out
    assert len(list((tmp_path / "runs" / "t").glob("*/adapter/adapter_model.safetensors"))) == 1
    print(f"2-node SLURM job: {took:.0f}s from sbatch to COMPLETED")


def test_two_node_job_checkpoints_requeues_and_resumes_in_its_run_dir(tmp_path, two_node_slurm):
    """The multi-node requeue: both nodes checkpoint into the one run directory named by the job id (the
    namespaces share this machine's filesystem, as nodes share a cluster filesystem), the job requeues,
    and both nodes resume there from that checkpoint."""
    s = two_node_slurm
    script = _write_script(tmp_path, _recipe(tmp_path, 30), 2)
    job_id = s.submit(script, tmp_path)
    log = tmp_path / "runs" / "t" / f"slurm-{job_id}.out"
    t0 = time.time()
    while not re.search(r"step 3/30 ", log.read_text() if log.exists() else ""):
        assert time.time() - t0 < 240, _job_output(tmp_path, job_id) + s.logs()
        time.sleep(1)
    assert s.cmd("scancel", "--signal=USR1", "--batch", job_id).returncode == 0

    j = s.wait_done(job_id, 480)
    out = _job_output(tmp_path, job_id)
    assert (j["JobState"], j["ExitCode"]) == ("COMPLETED", "0:0"), out + s.logs()
    assert int(j["Restarts"]) == 1 and "requeueing job" in out, out
    m = re.search(r"resumed from step (\d+)", out)
    assert m and int(m.group(1)) >= 3 and "step 30/30" in out, out
    # One run directory for both nodes and both starts: named by the job id.
    assert sorted(p.name for p in (tmp_path / "runs" / "t").iterdir() if p.is_dir()) == [job_id]
    run = tmp_path / "runs" / "t" / job_id
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (run / "logs").iterdir()) == ["node0", "node1"]
    assert sorted(p.name for p in (run / "logs" / "node1").glob("rank*.log")) == ["rank2.log", "rank3.log"]
