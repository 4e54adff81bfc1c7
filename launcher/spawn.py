"""Spawning through torch's elastic launcher, following the run, and summarising failures."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from launcher.errors import EXIT_ABORTED
from launcher.plan import Cluster, Plan, python_cmd, torchrun_argv
from launcher.procs import death_signal_setter
from launcher.recipe import Recipe
from launcher.rundir import RunDir, atomic_write

STOP_GRACE_S = 90.0


def launch_spec(recipe: Recipe, plan: Plan, cluster: Cluster, run_dir: str, node: str | None = None) -> dict:
    """argv + the environment qlaunch adds: written to launch.json and shown by --dry-run. `node`: this
    node's name in a shared run directory (the workers' second argument: where their logs go)."""
    return {
        "argv": python_cmd() + torchrun_argv(recipe, plan, cluster, run_dir) + ([node] if node else []),
        "env": dict(plan.env),
        "cwd": os.getcwd(),
        # --- multinode: what the ranks and the node watch do across nodes (the env above has NCCL's part)
        "distributed": distributed_settings(recipe, plan, cluster),
    }


def spawn(run: RunDir, spec: dict, follow) -> int:
    """Run torchrun as a child; `follow(run, proc)` shows progress until it exits. Returns its exit code,
    or EXIT_ABORTED when a second Ctrl-C killed the run."""
    atomic_write(run.launch_file, json.dumps(spec, indent=2) + "\n")
    env = {**os.environ, **spec["env"], "QLAUNCH_SPAWN_TIME": str(time.time()), "PYTHONUNBUFFERED": "1"}
    # The project root on PYTHONPATH so `-m launcher.worker` resolves even when qlaunch is not installed:
    # the package this qlaunch runs from, never the current directory (the plan's env sets PYTHONSAFEPATH).
    root = str(Path(__file__).resolve().parent.parent)
    # An empty entry (PYTHONPATH=":x", "x:") means the current directory: dropped, as safe-path mode intends.
    kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([root, *kept])
    with open(run.logs / "launcher.log", "ab") as log:
        # The stop handlers come first: a signal arriving while torchrun starts is a stop request the ranks
        # see at their first step boundary, never a qlaunch killed with its child half-started.
        stopper = Stopper(run)
        old = {s: signal.signal(s, stopper.on_signal) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
        try:
            # SLURM signals every process of a job step, torchrun included, and SIGUSR1's default action would
            # kill torchrun while its ranks save their checkpoint (qlaunch then saw a failure, not a
            # preemption). The child inherits "ignore" (signal dispositions survive exec only as ignore or
            # default); the ranks install their own handler (session.StopRequest).
            stopper.proc = subprocess.Popen(
                spec["argv"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                stdin=subprocess.DEVNULL,
                # A session of its own: a Ctrl-C at the terminal goes to the foreground process group, and
                # torchrun would pass it to the ranks as a crash (a KeyboardInterrupt in some collective).
                # qlaunch alone gets it and turns it into a stop request (Stopper).
                start_new_session=True,
                # Killed with qlaunch: a SIGKILLed qlaunch must not leave torchrun and its ranks training.
                preexec_fn=_child_setup,
            )
            if stopper.aborted:  # a second Ctrl-C while torchrun was starting
                kill_tree(stopper.proc, wait=False)
            follow(run, stopper.proc)
            rc = stopper.proc.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    return EXIT_ABORTED if stopper.aborted else rc


_DIE_WITH_PARENT = death_signal_setter()


def _child_setup() -> None:
    """torchrun's first moments (between fork and exec): die with qlaunch, and take SIGUSR1 as ignored (see
    spawn); qlaunch's own handlers must not run in the child."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if _DIE_WITH_PARENT is not None:
        _DIE_WITH_PARENT()


class Stopper:
    """SIGTERM, SIGUSR1 and a first Ctrl-C ask the ranks to checkpoint at the next step boundary and exit
    (qlaunch then exits 75); a second Ctrl-C kills torchrun and every rank at once.

    The request goes through a file the ranks check at every step boundary (session.StopRequest).
    Signalling torchrun instead would make it kill the workers 30 s later, mid-save. If the ranks have not
    finished within STOP_GRACE_S (a hung collective, a long load), torchrun's own shutdown follows."""

    def __init__(self, run: RunDir):
        self.run = run
        self.proc: subprocess.Popen | None = None  # set once torchrun is started
        self.requested = False
        self.aborted = False

    def on_signal(self, signum: int, _frame) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            return
        if signum == signal.SIGINT and self.requested:
            self.aborted = True
            print("qlaunch: second Ctrl-C: killing the ranks now", file=sys.stderr, flush=True)
            if self.proc is not None:
                kill_tree(self.proc, wait=False)
            return
        if self.requested:
            return
        self.requested = True
        self.run.stop_file.touch()
        if signum == signal.SIGINT:
            print(
                "qlaunch: stopping: the ranks save a checkpoint at the next step boundary "
                "(Ctrl-C again to abort at once)",
                file=sys.stderr,
                flush=True,
            )
        fallback = threading.Timer(STOP_GRACE_S, self._fallback)
        fallback.daemon = True  # must not keep qlaunch alive once the ranks are done
        fallback.start()

    def _fallback(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            terminate(self.proc)


def failure_summary(run: RunDir, tail: int = 12) -> str:
    """Which rank failed first, how (exit code or signal), its last log lines, and where the full logs are.

    A rank that dies takes the others down with it (their collectives fail, torchrun terminates them), so
    "first" is decided by cause, not only by time: a rank's own error beats a peer-lost error, and a
    rank killed by a signal (SIGKILL, SIGSEGV...) beats the survivors torchrun stopped afterwards.
    """
    launcher_log = run.logs / "launcher.log"
    text = launcher_log.read_text(errors="replace") if launcher_log.exists() else ""
    exits, root = _torchrun_failures(text)
    errors: dict[int, dict] = {}
    for f in run.logs.glob("rank*.error.json"):
        try:
            e = json.loads(f.read_text())
            errors[int(e["rank"])] = e
        except (OSError, ValueError, KeyError, TypeError):
            continue
    rank = _first_failure(errors, exits, root)
    if rank is None:
        return f"training failed; see {launcher_log}"
    err = errors.get(rank, {})
    code = exits.get(rank)
    how = ""
    if code is not None:
        how = f"killed by signal {_signal_name(-code)}" if code < 0 else f"exit code {code}"
    message = err.get("message", "")
    lines = [f"rank {rank} failed first" + (f" ({how})" if how else "") + (f": {message}" if message else "")]
    others = sorted(r for r in set(exits) | set(errors) if r != rank)
    if others:
        lines.append("then stopped: " + ", ".join(f"rank {r}" + _how_short(exits.get(r)) for r in others))
    log = run.rank_log(rank)
    log_text = log.read_text(errors="replace") if log.exists() else ""
    if is_oom(message + "\n" + log_text):
        lines += oom_advice(run, log_text)
    elif code == -signal.SIGKILL:
        lines.append(
            "  SIGKILL from outside the process: often the kernel's OOM killer (host memory; see `dmesg`) "
            "or a scheduler enforcing a limit"
        )
    if log_text:
        last = [ln for ln in log_text.splitlines() if ln.strip()][-tail:]
        lines.append(f"last lines of {log}:")
        lines += ["  " + ln for ln in last]
    lines.append(f"full logs: {run.logs}/")
    return "\n".join(lines)


_OOM = re.compile(r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED|out of memory", re.I)
_GPU_TOTAL = re.compile(r"total capacity of ([\d.]+) GiB")


def _torchrun_failures(text: str) -> tuple[dict[int, int], int | None]:
    """({rank: exit code (negative = signal)}, the rank torchrun calls the root cause) from its report."""
    exits: dict[int, int] = {}
    root = None
    for block in re.split(r"\n(?=\[\d+\]:)|(?=Root Cause)", text):
        m = re.search(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", block, re.S)
        if m:
            exits[int(m.group(1))] = int(m.group(2))
            if block.lstrip().startswith("Root Cause"):
                root = int(m.group(1))
    return exits, root


def _first_failure(errors: dict[int, dict], exits: dict[int, int], root: int | None) -> int | None:
    own = [e for e in errors.values() if not is_peer_failure(e.get("message", ""))]
    if own:
        return int(min(own, key=lambda e: e.get("time", 0.0))["rank"])
    # Survivors are stopped with SIGTERM (or exit 1 from a broken collective); any other signal is a cause.
    signalled = [r for r, c in exits.items() if c < 0 and -c not in (signal.SIGTERM, signal.SIGINT) and r not in errors]
    if signalled:
        return root if root in signalled else min(signalled)
    if errors:
        return int(min(errors.values(), key=lambda e: e.get("time", 0.0))["rank"])
    return root if root is not None else (min(exits) if exits else None)


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _how_short(code: int | None) -> str:
    if code is None:
        return ""
    return f" ({_signal_name(-code)})" if code < 0 else f" (exit {code})"


def is_oom(text: str) -> bool:
    return bool(_OOM.search(text))


def oom_advice(run: RunDir, log_text: str) -> list[str]:
    """What the memory planner says about this run, and the changes it suggests (best effort: the model
    config may be unreadable from here, e.g. a hub id without network)."""
    lines = ["  out of GPU memory."]
    try:
        from launcher import memory
        from launcher.loading import resolve_model_dir

        recipe = run.load_recipe()
        plan = run.load_plan()
        config = json.loads((resolve_model_dir(recipe) / "config.json").read_text())
        shape = memory.ModelShape.from_config(config.get("text_config", config))
        m = _GPU_TOTAL.search(log_text)
        if m:
            gpu_mem = int(float(m.group(1)) * memory.GiB)
        elif plan.get("memory"):
            gpu_mem = int(plan["memory"]["gpu_memory_gib"] * memory.GiB)
        else:
            gpu_mem = memory.DEFAULT_GPU_MEMORY
        est = memory.estimate(
            recipe,
            shape,
            plan["world_size"],
            plan["micro_batch"],
            plan.get("gradient_checkpointing", recipe.train.gradient_checkpointing is not False),
            gpu_mem,
            plan.get("nproc_per_node"),
        )
        # It did not fit, whatever the estimate says: ask for suggestions as if it were at the limit.
        tips = memory.suggestions(recipe, shape, est, force=True)
        lines[0] = (
            f"  out of GPU memory: the planner estimates {est.total / memory.GiB:.1f} GiB per GPU "
            f"of {gpu_mem / memory.GiB:.3g} GiB for this plan (`qlaunch plan` shows the breakdown)."
        )
        if tips:
            lines.append("  try:")
            lines += [f"    {t}" for t in tips]
    except Exception as err:  # noqa: BLE001 - advice is optional; the failure report must still print
        lines.append(f"  (no planner advice: {type(err).__name__}: {err})")
        lines.append(
            "  try a smaller train.micro_batch, train.gradient_checkpointing = true, more GPUs, or CPU offload"
        )
    return lines


def rank_error_of(run: RunDir) -> dict | None:
    """The error record of a rank that stopped on bad input or because training diverged (kind 'user' or
    'diverged': every rank stops with the same message), if that is how the run ended."""
    for f in sorted(run.logs.glob("rank*.error.json")):
        try:
            e = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if e.get("kind") in ("user", "diverged") and isinstance(e.get("message"), str):
            return e
    return None


DISK_LOW_BYTES = 1 << 20


def disk_full(run: RunDir) -> str | None:
    """'no space left on device under RUN (0 MiB free)' when the run's disk is full, or its ranks said so.

    A full disk leaves no trace the usual report could use: the ranks cannot write their logs or error
    records, nor torchrun its report, so the free space of the run's file system is asked directly."""
    try:
        free = shutil.disk_usage(run.path).free
    except OSError:
        return None
    said = False
    for log in [run.logs / "launcher.log", *run.logs.glob("rank*.log")]:
        try:
            with open(log, "rb") as fh:
                fh.seek(max(0, log.stat().st_size - 65536))
                said = said or b"No space left on device" in fh.read()
        except OSError:
            continue
    if free >= DISK_LOW_BYTES and not said:
        return None
    return f"no space left on the device of {run.path} ({free / 2**20:.1f} MiB free): the ranks could not write"


# ====================================================================== multi-node: the node watch
# torchrun does not say which node failed: on the surviving nodes the ranks only die of "connection
# closed by peer" in some collective. So each node's qlaunch keeps one TCP connection to the watch host
# (node 0's qlaunch, port master_port+1; with a c10d endpoint, whichever qlaunch can bind endpoint+1)
# and reports its ranks, a heartbeat every few seconds, and at the end how its ranks exited. A connection
# that drops without an exit report is a node that died; one that goes silent is cut off from the
# network. Nothing here may hurt training: every network error only degrades the report.

WATCH_PORT_OFFSET = 1
WATCH_BEAT_S = 2.0
KILL_GRACE_S = 45.0  # after the watch's SIGTERM: torchrun's own 30 s for its ranks, and a margin

# Errors a rank gets when another rank (or its node) went away, as opposed to failing by itself.
_PEER_ERROR = re.compile(
    r"closed by peer|reset by peer|broken pipe|remote worker|connection refused|DistNetworkError|"
    r"timed? ?out|timeout|NCCL communicator was aborted|ncclRemoteError|ncclSystemError|recvValue|"
    r"failed to recv|Connection closed|SignalException|Socket Timeout",
    re.I,
)


def distributed_settings(recipe: Recipe, plan: Plan, cluster: Cluster) -> dict:
    """Cross-rank settings that are not torchrun flags or env, recorded in launch.json."""
    out: dict = {
        "backend": plan.dist_backend,
        "collective_timeout_s": plan.collective_timeout_s,
        "mesh": (
            {"replicate": plan.nnodes, "shard": plan.nproc_per_node}
            if plan.hybrid_shard
            else ({"shard": plan.world_size} if plan.backend == "fsdp" else None)
        ),
    }
    if plan.nnodes > 1 or cluster.rdzv_endpoint:
        if cluster.rdzv_endpoint:
            host, _, port = cluster.rdzv_endpoint.rpartition(":")
            out["node_watch"] = f"{host}:{int(port) + WATCH_PORT_OFFSET}"
        elif recipe.launch.master_port:
            out["node_watch"] = f"{cluster.master_addr}:{recipe.launch.master_port + WATCH_PORT_OFFSET}"
    return out


def is_peer_failure(message: str) -> bool:
    """Did a rank fail because a peer went away (so the real failure is elsewhere)?"""
    return bool(_PEER_ERROR.search(message or ""))


def rank_span(ranks: list[int]) -> str:
    rs = sorted(ranks)
    if not rs:
        return ""
    if rs == list(range(rs[0], rs[-1] + 1)) and len(rs) > 1:
        return f"ranks {rs[0]}-{rs[-1]}"
    return ("rank " if len(rs) == 1 else "ranks ") + ",".join(map(str, rs))


def describe_node(p: dict) -> str:
    """'node 1 (host h, ranks 2-3)', or 'the node running ranks 2-3 (host h)' when its rank is unknown."""
    span = rank_span(p.get("ranks") or [])
    if p.get("node_rank") is not None:
        extra = ", ".join(x for x in (f"host {p['host']}" if p.get("host") else "", span) if x)
        return f"node {p['node_rank']}" + (f" ({extra})" if extra else "")
    return (f"the node running {span}" if span else "a node") + (f" (host {p['host']})" if p.get("host") else "")


def node_blame(peers: list[dict], local_error: str | None) -> str | None:
    """Which other node made this one fail, from the watch's view of its peers; None if this node's own
    ranks failed by themselves or no peer is to blame. Peers are dicts of NodeWatch's peer state."""
    if local_error and not is_peer_failure(local_error):
        return None
    culprits = [
        p
        for p in peers
        if p["status"] == "lost"
        or (p["status"] == "exited" and p.get("rc") and p.get("first") and not is_peer_failure(p["first"]))
    ]
    if not culprits:
        return None
    p = min(culprits, key=lambda p: p.get("time") or 0.0)
    when = time.strftime("%H:%M:%S", time.localtime(p["time"])) if p.get("time") else "?"
    if p["status"] == "lost":
        msg = f"{describe_node(p)} failed at {when}: {p.get('reason') or 'lost'}"
    else:
        msg = f"{describe_node(p)} failed first, at {when}: {p['first']}"
    if p.get("logs"):
        msg += f"; its logs: {p['logs']}" + (f" on {p['host']}" if p.get("host") else "")
    return msg + "\nthis node's ranks stopped because their peers on that node went away"


def first_rank_error(run: RunDir) -> dict | None:
    """The earliest rank*.error.json of this node's ranks ({rank, time, message, ...}), if any."""
    first = None
    for f in run.logs.glob("rank*.error.json"):
        try:
            e = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if first is None or e.get("time", 0) < first.get("time", 0):
            first = e
    return first


def local_ranks(run: RunDir) -> list[int]:
    """Global ranks that ran on this node: each rank writes logs/rank<N>.log from its first line."""
    out = []
    for f in run.logs.glob("rank*.log"):
        m = re.fullmatch(r"rank(\d+)\.log", f.name)
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


class NodeWatch:
    """One node's side of the watch (see the section comment). `hosting`: True = serve, False = connect,
    None = serve if the address can be bound here (c10d: the endpoint's machine), else connect."""

    def __init__(
        self,
        run: RunDir,
        addr: tuple[str, int],
        hosting: bool | None,
        node_rank: int | None,
        node_timeout: float,
        stop_on_loss: bool,
        log=None,
    ):
        import socket

        self.run, self.addr, self.hosting = run, addr, hosting
        self.node_timeout, self.stop_on_loss = node_timeout, stop_on_loss
        self.me = {
            "id": f"{socket.gethostname()}/{os.getpid()}/{id(self):x}",  # unique even for two in one process
            "host": socket.gethostname(),
            "node_rank": node_rank,
            "logs": str(run.logs),
            "ranks": [],
            "status": "running",
        }
        self.peers: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.proc: subprocess.Popen | None = None
        self.stopped_for: str | None = None
        self._log = log or (lambda msg: None)
        self._conns: dict[str, object] = {}
        self._server = None
        self._sock = None
        self.host_id: str | None = None  # client side: the watch host's id, from its first beat

    # ---------------------------------------------------------------- life cycle
    def start(self) -> NodeWatch:
        import socket

        maybe = self.hosting is None
        if maybe:
            self.hosting = _is_local_address(self.addr[0])
        if self.hosting:
            srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                srv.bind(("", self.addr[1]))  # all interfaces: other nodes reach us by whatever name
                srv.listen(64)
                self._server = srv
            except OSError as err:
                srv.close()
                if not maybe:
                    self._log(f"node watch off: cannot listen on port {self.addr[1]} ({err})")
                    return self
                self.hosting = False  # another qlaunch on this machine hosts it (two nodes on one host)
        self._thread(self._accept_loop if self.hosting else self._client_loop)
        self._thread(self._beat_loop)
        return self

    def attach(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    def follow(self, follow):
        """Wrap a follow(run, proc) function so the watch knows the torchrun process it may stop."""

        def wrapped(run, proc):
            self.attach(proc)
            return follow(run, proc)

        return wrapped

    def finish(self, rc: int, wait_s: float = 15.0) -> list[dict]:
        """Report how this node's ranks ended, then (after a failure) wait up to wait_s for the other
        nodes' reports; returns the peers' final states."""
        first = first_rank_error(self.run) if rc else None
        with self.lock:
            self.me.update(
                status="exited",
                rc=rc,
                time=time.time(),
                ranks=local_ranks(self.run),
                first=_first_line(first),
            )
        report = {"t": "exit", "peer": dict(self.me)}
        if self.hosting:
            self._broadcast({"t": "peer", "peer": dict(self.me)})
        else:
            self._send(self._sock, report)
        if rc:
            deadline = time.time() + wait_s
            while time.time() < deadline and any(p["status"] == "running" for p in self.snapshot()):
                time.sleep(0.2)
        return self.snapshot()

    def close(self) -> None:
        import socket

        self.closed.set()
        for s in [self._server, self._sock, *self._conns.values()]:
            if s is None:
                continue
            try:
                # shutdown, not just close: it wakes this process's own threads blocked in recv/accept
                # on the socket, and the peer sees the end at once.
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass

    def snapshot(self) -> list[dict]:
        with self.lock:
            return [dict(p) for p in self.peers.values()]

    # ---------------------------------------------------------------- both sides
    def _thread(self, fn, *args) -> None:
        threading.Thread(target=fn, args=args, daemon=True).start()

    def _send(self, sock, msg: dict) -> bool:
        if sock is None:
            return False
        try:
            sock.sendall((json.dumps(msg) + "\n").encode())
            return True
        except OSError:
            return False

    def _lines(self, sock):
        buf = b""
        while not self.closed.is_set():
            try:
                chunk = sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                try:
                    yield json.loads(line)
                except ValueError:
                    continue

    def _update(self, peer: dict) -> None:
        with self.lock:
            cur = self.peers.get(peer["id"], {})
            if cur.get("status") in ("exited", "lost") and peer.get("status") == "running":
                return
            self.peers[peer["id"]] = {**cur, **peer}
            failed = cur.get("status") not in ("exited", "lost") and peer.get("status") == "exited" and peer.get("rc")
            now = dict(self.peers[peer["id"]])
        if failed:
            # A node whose ranks failed reports it and closes its connection cleanly, so _lost never
            # fires, yet this node may be stuck on it just the same: its ranks fail by themselves only
            # when a collective with that node breaks. Ranks waiting on the store (process-group setup,
            # the data-cache lock) wait out their timeouts, and once all of this node's ranks are done
            # torchrun sits in its exit barrier, 300 s, for the failed node's agent that never comes.
            why = f"its ranks failed (exit status {now['rc']})" + (f": {now['first']}" if now.get("first") else "")
            self._log(f"node watch: {describe_node(now)}: {why}")
            if self.stop_on_loss and not self.closed.is_set():
                self._thread(self._stop_local, now, "failed")

    def _lost(self, pid: str, reason: str) -> None:
        with self.lock:
            p = self.peers.get(pid)
            if p is None or p["status"] != "running" or self.closed.is_set():
                return
            p.update(status="lost", reason=reason, time=time.time())
            lost = dict(p)
        self._log(f"node watch: {describe_node(lost)}: {reason}")
        if self.hosting:
            self._broadcast({"t": "peer", "peer": lost})
        if self.stop_on_loss:
            self._thread(self._stop_local, lost, "is gone")

    def _stop_local(self, lost: dict, how: str) -> None:
        """The run cannot go on without that node (no elastic restarts): if this node's ranks have not
        failed by themselves within the node timeout (a hung collective), stop them."""
        deadline = time.time() + self.node_timeout
        while time.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                return
            time.sleep(0.5)
        if self.proc is not None and self.proc.poll() is None and self.me["status"] == "running":
            self.stopped_for = describe_node(lost)
            self._log(f"node watch: stopping this node's ranks: {self.stopped_for} {how}")
            if not terminate(self.proc):
                self._log(f"node watch: torchrun ignored SIGTERM for {KILL_GRACE_S:.0f}s; killed it and its ranks")

    def _beat_loop(self) -> None:
        while not self.closed.wait(WATCH_BEAT_S):
            ranks = local_ranks(self.run)
            with self.lock:
                self.me["ranks"] = ranks
                me = dict(self.me)
            now = time.time()
            if self.hosting:
                self._broadcast({"t": "beat", "peer": me})
                for pid, p in self.snapshot_items():
                    if p["status"] == "running" and now - p.get("last_seen", now) > self.node_timeout:
                        self._lost(pid, f"no heartbeat for {now - p['last_seen']:.0f}s (cut off from the network?)")
            elif self._sock is not None:
                self._send(self._sock, {"t": "beat", "peer": me})
                with self.lock:
                    host = dict(self.peers.get(self.host_id or "", {}))
                if host.get("status") == "running" and now - host.get("last_seen", now) > self.node_timeout:
                    self._lost(
                        host["id"], f"no heartbeat for {now - host['last_seen']:.0f}s (cut off from the network?)"
                    )

    def snapshot_items(self) -> list[tuple[str, dict]]:
        with self.lock:
            return [(k, dict(v)) for k, v in self.peers.items()]

    # ---------------------------------------------------------------- host side
    def _broadcast(self, msg: dict) -> None:
        for pid, conn in list(self._conns.items()):
            if not self._send(conn, msg):
                self._conns.pop(pid, None)

    def _accept_loop(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self._thread(self._serve, conn)

    def _serve(self, conn) -> None:
        pid = None
        for msg in self._lines(conn):
            peer = msg.get("peer") or {}
            if "id" not in peer:
                continue
            if pid is None:
                pid = peer["id"]
                self._conns[pid] = conn
                # Introduce the host (its first beat), then everyone already known.
                with self.lock:
                    me = dict(self.me)
                self._send(conn, {"t": "beat", "peer": me})
                for _, p in self.snapshot_items():
                    self._send(conn, {"t": "peer", "peer": p})
            self._update({**peer, "last_seen": time.time()})
            if msg.get("t") == "exit":
                self._broadcast({"t": "peer", "peer": self.peers[pid]})
        if pid is not None:
            self._conns.pop(pid, None)
            self._lost(pid, "its qlaunch went away without a report (node down, killed, or out of memory)")

    # ---------------------------------------------------------------- client side
    def _client_loop(self) -> None:
        import socket

        while True:
            try:
                sock = socket.create_connection(self.addr, timeout=5)
                break
            except OSError:
                if self.closed.wait(1.0):
                    return
        sock.settimeout(None)
        self._sock = sock
        with self.lock:
            me = dict(self.me)
        self._send(sock, {"t": "hello", "peer": me})
        for msg in self._lines(sock):
            peer = msg.get("peer") or {}
            if not peer.get("id") or peer["id"] == self.me["id"]:
                continue
            if msg.get("t") == "beat":
                self.host_id = peer["id"]  # only the host sends beats to clients
            self._update({**peer, "last_seen": time.time()})
        if self.host_id:
            self._lost(self.host_id, "lost the connection to it (node down, killed, or unreachable)")


def terminate(proc: subprocess.Popen) -> bool:
    """SIGTERM torchrun; False if it had to be killed with its ranks after KILL_GRACE_S.

    torchrun acts on SIGTERM only between Python calls: in its exit barrier it is blocked in a C++ store
    wait (up to 300 s) and does not see it. Otherwise it stops its ranks within its own grace (30 s), so
    past KILL_GRACE_S kill it, and whatever it started, outright."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=KILL_GRACE_S)
        return True
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        return False


def descendants(pid: int) -> list[int]:
    """pid and every process below it, parents first (Linux /proc; just pid without it). torch elastic
    starts its ranks in sessions of their own, so a process-group signal would miss them."""
    children: dict[int, list[int]] = {}
    try:
        procs = [d for d in Path("/proc").iterdir() if d.name.isdigit()]
    except OSError:
        return [pid]
    for d in procs:
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def kill_tree(proc: subprocess.Popen, wait: bool = True) -> None:
    """SIGKILL proc and every process below it, all collected before anything dies and is reparented."""
    for pid in reversed(descendants(proc.pid)):  # the ranks before torchrun, which could start new ones
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if wait:
        proc.wait()


def _is_local_address(host: str) -> bool:
    """Does `host` name this machine (can a socket bind to its address here)?"""
    import socket

    try:
        ip = socket.gethostbyname(host)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
        return True
    except OSError:
        return False


def start_node_watch(run: RunDir, recipe: Recipe, cluster: Cluster, node_timeout: float) -> NodeWatch | None:
    """The watch for a multi-node run: static rendezvous -> node 0 hosts on master_port+1; c10d -> the
    machine of the rendezvous endpoint hosts on its port+1. None when there is no fixed port to use."""
    if cluster.rdzv_endpoint:
        host, _, port = cluster.rdzv_endpoint.rpartition(":")
        addr, hosting, node_rank = (host.strip("[]"), int(port) + WATCH_PORT_OFFSET), None, None
    else:
        if not recipe.launch.master_port:
            return None
        addr = (cluster.master_addr, recipe.launch.master_port + WATCH_PORT_OFFSET)
        hosting, node_rank = cluster.node_rank == 0, cluster.node_rank
    # With elastic restarts or a node range, torchrun carries on without a lost node (or waits for it to
    # come back): then the watch only reports, it never stops this node's ranks.
    elastic = cluster.min_nodes is not None or recipe.launch.max_restarts > 0
    log_path = run.logs / "nodes.log"

    def log(msg: str) -> None:
        with open(log_path, "a") as fh:
            fh.write(f"{time.strftime('%H:%M:%S')} {msg}\n")

    return NodeWatch(run, addr, hosting, node_rank, node_timeout, stop_on_loss=not elastic, log=log).start()


def follow_node(run: RunDir, label: str, live_follow):
    """follow() for a node other than node 0: one line saying where its logs are, then quiet until its
    torchrun exits. If this node turns out to run rank 0 (elastic rendezvous decides), the live view."""

    def follow(run_: RunDir, proc: subprocess.Popen) -> None:
        shown, t_first = False, None
        while proc.poll() is None:
            if run_.rank_log(0).exists():  # rank 0 runs here (the rendezvous chose): it writes the metrics
                return live_follow(run_, proc)
            ranks = local_ranks(run_)
            if ranks and t_first is None:
                t_first = time.time()
            # Ranks start within a moment of each other: wait briefly so the line lists them all.
            if ranks and not shown and time.time() - t_first > 3:
                print(f"{label}: {rank_span(ranks)} running; logs in {run_.logs}/ (node 0 shows the training)")
                shown = True
            time.sleep(0.5)
        if proc.returncode == 0:
            print(f"{label}: done")

    return follow


def _first_line(err: dict | None) -> str | None:
    if not err:
        return None
    return f"rank {err.get('rank')}: {str(err.get('message', '')).splitlines()[0][:300]}"
