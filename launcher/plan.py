"""Pure planning: Recipe + cluster facts -> Plan (world size, batch split, torchrun argv).

Nothing here touches processes, files or devices: `qlaunch plan` and `--dry-run` stop after this.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from launcher.errors import UserError
from launcher.recipe import Recipe


@dataclass(frozen=True)
class Cluster:
    """What the launching machine looks like (gathered once at the edge, in cli/spawn)."""

    cuda_devices: int = 0
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    min_nodes: int | None = None


@dataclass(frozen=True)
class Plan:
    world_size: int
    nproc_per_node: int
    nnodes: int
    device: str  # "cuda" or "cpu"
    dist_backend: str  # "nccl" or "gloo"
    micro_batch: int
    grad_accum: int
    global_batch: int
    backend: str
    torchrun_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def batch_split(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Gradient-accumulation steps so that micro_batch x world x accum == global_batch exactly."""
    per_step = micro_batch * world_size
    if global_batch % per_step:
        valid = [g for g in range(per_step, 4 * per_step + 1, per_step)]
        raise UserError(
            f"train.global_batch = {global_batch} is not divisible by train.micro_batch x world size "
            f"= {micro_batch} x {world_size} = {per_step}; valid global batches include " + ", ".join(map(str, valid))
        )
    return global_batch // per_step


def make_plan(recipe: Recipe, cluster: Cluster, micro_batch: int | None = None) -> Plan:
    launch = recipe.launch
    nproc, nnodes = launch.gpus, launch.nnodes
    if cluster.cuda_devices:
        if nproc > cluster.cuda_devices:
            raise UserError(
                f"--gpus {nproc} but this machine has {cluster.cuda_devices} CUDA device(s); "
                f"use --gpus 1..{cluster.cuda_devices}"
            )
        device, dist_backend = "cuda", "nccl"
    else:
        device, dist_backend = "cpu", "gloo"
    world = nproc * nnodes
    if recipe.parallel.backend == "none" and world > 1:
        raise UserError(f"parallel.backend = 'none' runs one process, but the launch has {world} ranks; use 'fsdp'")
    mb = micro_batch if micro_batch is not None else recipe.train.micro_batch
    if mb == "auto":
        mb = 1  # resolved by the memory planner when one is available; 1 always fits best.
    accum = batch_split(recipe.train.global_batch, int(mb), world)
    env = {"OMP_NUM_THREADS": "1"} if device == "cpu" else {}
    if device == "cuda":
        # Fail a hung collective instead of waiting forever, and keep NVLink multicast off.
        env.update({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_NVLS_ENABLE": "0"})
    plan = Plan(
        world_size=world,
        nproc_per_node=nproc,
        nnodes=nnodes,
        device=device,
        dist_backend=dist_backend,
        micro_batch=int(mb),
        grad_accum=accum,
        global_batch=recipe.train.global_batch,
        backend=recipe.parallel.backend,
        env=env,
    )
    return plan


def torchrun_argv(recipe: Recipe, plan: Plan, cluster: Cluster, run_dir: str) -> list[str]:
    """The exact arguments for torch.distributed.run (its own parser reads them)."""
    args = [f"--nproc-per-node={plan.nproc_per_node}", f"--max-restarts={recipe.launch.max_restarts}"]
    if cluster.rdzv_endpoint:
        nn = f"{cluster.min_nodes}:{plan.nnodes}" if cluster.min_nodes else str(plan.nnodes)
        args += [
            f"--nnodes={nn}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={cluster.rdzv_endpoint}",
            f"--rdzv-id={cluster.rdzv_id or 'qlaunch'}",
        ]
    elif plan.nnodes > 1:
        args += [
            f"--nnodes={plan.nnodes}",
            f"--node-rank={cluster.node_rank}",
            f"--master-addr={cluster.master_addr}",
            f"--master-port={recipe.launch.master_port}",
        ]
    else:
        # Single node: a private c10d store on a free port, so two runs on one machine never collide.
        args += ["--standalone"]
    # Workers redirect their own output to RUN/logs/rank<N>.log (see worker.redirect_output).
    args += ["--module", "launcher.worker", run_dir]
    return args


def python_cmd() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run"]
