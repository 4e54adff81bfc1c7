"""Where this node sits in a run: nodes, node rank and master from the flags or a SLURM allocation, the
local cluster's GPUs, and the run directory shared by the nodes of one run."""

from __future__ import annotations

import os
import re
from pathlib import Path

from launcher.errors import UserError


def check_node_rank(node_rank: int, nnodes: int) -> None:
    """--node-rank N names one of the run's nodes: --nnodes (or launch.nnodes, or SLURM) must count more than N."""
    if node_rank >= nnodes:
        raise UserError(
            f"--node-rank {node_rank}: the run has {nnodes} node(s) (--nnodes / launch.nnodes), whose ranks run "
            f"0..{nnodes - 1}; give --nnodes N with N > {node_rank} on every node"
        )


def local_cluster(node_rank: int = 0, master_addr: str = "127.0.0.1", rdzv_endpoint=None, rdzv_id=None, min_nodes=None):
    from launcher.plan.plan import Cluster

    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        mem = torch.cuda.get_device_properties(0).total_memory if n else 0
    except Exception:  # noqa: BLE001 - a broken CUDA install means "no GPUs" for planning
        n, mem = 0, 0
    return Cluster(
        cuda_devices=n,
        gpu_memory_bytes=mem,
        node_rank=node_rank,
        master_addr=master_addr,
        rdzv_endpoint=rdzv_endpoint,
        rdzv_id=rdzv_id,
        min_nodes=min_nodes,
        cuda_alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    )


def node_placement(nnodes, node_rank, master_addr, master_port, rdzv_endpoint, rdzv_id, no_slurm):
    """This node's launch geometry: explicit flags win; inside a SLURM allocation the rest comes from
    its environment (node count, node rank, head node, a per-job port); otherwise one node."""
    import os

    from launcher.plan.plan import parse_nnodes

    min_nodes = parse_nnodes(nnodes)[0] if nnodes else None
    if min_nodes is not None and not rdzv_endpoint:
        raise UserError(f"--nnodes {nnodes}: a MIN:MAX node range needs an elastic rendezvous (--rdzv-endpoint)")
    if rdzv_endpoint and (node_rank is not None or master_addr is not None):
        raise UserError("--rdzv-endpoint assigns node ranks itself; drop --node-rank/--master-addr")
    if rdzv_endpoint and not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", rdzv_endpoint):
        raise UserError(f"--rdzv-endpoint {rdzv_endpoint!r}: expected HOST:PORT")
    if rdzv_endpoint:
        from launcher.plan.recipe import MAX_MULTINODE_MASTER_PORT

        port = int(rdzv_endpoint.rpartition(":")[2])
        if not 1 <= port <= MAX_MULTINODE_MASTER_PORT:
            raise UserError(
                f"--rdzv-endpoint {rdzv_endpoint}: port {port} is out of range; use 1..{MAX_MULTINODE_MASTER_PORT} "
                "(the node watch listens on port + 1)"
            )
    banner = ""
    sl = None
    explicit_id = rdzv_id
    if not no_slurm and not rdzv_endpoint:
        from launcher.launch import slurm

        sl = slurm.from_env(os.environ)
    if sl is not None:
        if nnodes is None:
            nnodes = str(sl.nnodes)
        if node_rank is None:
            node_rank = sl.node_rank
        if master_addr is None:
            master_addr = sl.master_addr
        if master_port is None and int(nnodes) > 1:
            master_port = sl.master_port
        banner = f"SLURM job {sl.job_id}: node {node_rank} of {nnodes}" + (
            f", head node {master_addr}:{master_port}" if int(nnodes) > 1 else ""
        )
    node_rank = node_rank or 0
    if rdzv_endpoint and not rdzv_id:
        # Every node must name the same rendezvous; a SLURM job id is the natural shared name.
        rdzv_id = os.environ.get("SLURM_JOB_ID") or "qlaunch"
    from types import SimpleNamespace

    return SimpleNamespace(
        nnodes=nnodes,
        node_rank=node_rank,
        master_addr=master_addr or "127.0.0.1",
        master_port=master_port,
        min_nodes=min_nodes,
        rdzv_id=rdzv_id,
        # The multi-node run directory's name: every node must compute the same one.
        run_id=explicit_id or (sl.job_id if sl is not None else None) or (rdzv_id if rdzv_endpoint else None),
        banner=banner,
    )


def shared_run_path(rec, where, run_dir_opt: str | None, multinode: bool) -> Path | None:
    """The run directory all nodes share (RUNS_DIR/NAME/ID, or --run-dir); None: a fresh timestamped one."""
    if run_dir_opt:
        path = Path(run_dir_opt).resolve()
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():  # found now, before the data is prepared
            where = "exists" if existing == path else f"lies under {existing}, which exists"
            raise UserError(f"--run-dir {run_dir_opt}: {where} and is not a directory")
        return path
    if not multinode:
        return None
    run_id = where.run_id or f"{where.master_addr}-{rec.launch.master_port}"
    return (Path(rec.log.runs_dir) / rec.name / re.sub(r"[^\w.-]", "_", str(run_id))).resolve()


def open_shared_run_dir(path: Path, nnodes: int, node_rank: int, rdzv_endpoint, resuming: bool):
    """(RunDir, writes the shared files?). Static ranks: node 0 writes. Elastic: no node rank is known
    before the rendezvous, so the node that creates the directory writes, and each node is named by
    host and process."""
    import os
    import socket

    from launcher.rundir import shared_run_dir

    try:
        if rdzv_endpoint:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                path.mkdir()
                writer = True
            except FileExistsError:
                writer = False
            return shared_run_dir(path, f"{socket.gethostname()}-{os.getpid()}", writer, resuming), writer
        node = f"node{node_rank}" if nnodes > 1 else None
        return shared_run_dir(path, node, node_rank == 0, resuming), node_rank == 0
    except OSError as err:  # e.g. a parent that refuses new directories (/proc), or a file where one goes
        raise UserError(
            f"{err.filename or path}: cannot create the run directory ({err.strerror or type(err).__name__}); "
            "--run-dir or log.runs_dir chooses where it goes"
        ) from None
