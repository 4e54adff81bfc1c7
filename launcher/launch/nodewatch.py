"""Multi-node: a TCP watch between the nodes of a run (port+1) that names a lost or failed node, and stops this
node's ranks when the run cannot go on without it."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

from launcher.launch.diagnose import first_rank_error, is_peer_failure
from launcher.plan.plan import WATCH_PORT_OFFSET, Cluster
from launcher.plan.recipe import Recipe
from launcher.procs import KILL_GRACE_S, terminate
from launcher.rundir import RunDir

WATCH_BEAT_S = 2.0


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


def local_ranks(run: RunDir) -> list[int]:
    """Global ranks that ran on this node: each rank writes logs/rank<N>.log from its first line."""
    return sorted(run.rank_logs())


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
    log_path = run.nodes_log

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
