"""Pure planning: Recipe + cluster facts -> Plan (world size, batch split, torchrun argv).

Nothing here touches processes, files or devices: `qlaunch plan` and `--dry-run` stop after this.
"""

from __future__ import annotations

import sys
import types
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Union, get_args, get_origin, get_type_hints

from launcher.errors import UserError
from launcher.plan.recipe import Recipe
from launcher.safe_files import json_kind

if TYPE_CHECKING:
    from launcher.plan.memory import ModelShape


@dataclass(frozen=True)
class Cluster:
    """What the launching machine looks like (gathered once at the edge, in cli/spawn)."""

    cuda_devices: int = 0
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    min_nodes: int | None = None
    gpu_memory_bytes: int = 0  # per device; 0 = unknown (the memory planner then assumes an 80 GiB card)
    cuda_alloc_conf: str | None = None  # the user's own PYTORCH_CUDA_ALLOC_CONF, which the plan keeps


# How long a rank waits in one collective before its process group gives up. Generous: ranks legitimately
# wait on each other while one of them builds the data cache (see data.py). A dead or unreachable node is
# caught much sooner by the node watch (spawn.NodeWatch), which does not depend on this.
COLLECTIVE_TIMEOUT_S = 1800


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
    gradient_checkpointing: bool = True  # resolved from train.gradient_checkpointing ("auto" -> planner)
    reshard_after_forward: bool = True  # resolved from parallel.fsdp.reshard_after_forward ("auto" -> planner)
    memory: dict[str, Any] | None = None  # the memory planner's per-GPU estimate (memory.Estimate.to_dict)
    gpu_memory_cap_bytes: int = 0  # launch.gpu_memory_gb: each rank's allocator is capped here (0 = no cap)
    # --- multinode
    hybrid_shard: bool = False  # FSDP2 HSDP: a (nodes, ranks-per-node) mesh, replicate x shard
    collective_timeout_s: int = COLLECTIVE_TIMEOUT_S  # process-group timeout of every rank

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> Plan:
        """The Plan of a to_dict() read back (plan.json). Unknown keys and wrong types are refused in one
        line naming `where`; a key with a default may be missing, so an older run directory still loads."""
        hints = get_type_hints(cls)
        unknown = sorted(set(data) - set(hints))
        if unknown:
            raise UserError(f"{where}: unknown key(s) " + ", ".join(map(repr, unknown)))
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise UserError(f"{where}: missing key(s) " + ", ".join(map(repr, missing)))
        for key, value in data.items():
            if not _fits(value, hints[key]):
                raise UserError(f"{where}: {key!r} must be {_type_name(hints[key])}, not {json_kind(value)}")
        return cls(**data)


def _fits(value: Any, hint: Any) -> bool:
    """Does a value parsed from JSON have the type of a Plan field (the few kinds Plan's fields use)?"""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is int:  # JSON true/false parse as bool, a subclass of int: not a count
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    return isinstance(value, hint)


_JSON_TYPES = {int: "an integer", str: "a string", bool: "true or false", type(None): "null", dict: "an object"}


def _type_name(hint: Any) -> str:
    """A field's type in JSON's words: 'an integer', 'an array of strings', 'an object or null'."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"an array of {_type_name(args[0]).split(' ', 1)[1]}s"
    if origin is dict and args[1] is not Any:
        return f"an object of {_type_name(args[1]).split(' ', 1)[1]}s"
    return _JSON_TYPES[origin or hint]


def gpu_memory_cap(recipe: Recipe) -> int:
    """launch.gpu_memory_gb in bytes (0 = no cap)."""
    return int(recipe.launch.gpu_memory_gb * 2**30) if recipe.launch.gpu_memory_gb else 0


def planned_gpu_memory(recipe: Recipe, cluster: Cluster) -> int:
    """Bytes per GPU the memory planner plans for: this machine's card (the planner's default size when
    unknown), or the recipe's cap when that is smaller."""
    from launcher.plan import memory

    card = cluster.gpu_memory_bytes or memory.DEFAULT_GPU_MEMORY
    cap = gpu_memory_cap(recipe)
    return min(card, cap) if cap else card


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


def make_plan(
    recipe: Recipe, cluster: Cluster, micro_batch: int | None = None, model: ModelShape | None = None
) -> Plan:
    """`model` (memory.ModelShape of the model's config) enables the memory estimate and resolves the
    'auto' micro-batch / checkpointing settings; without it 'auto' means micro-batch 1 with checkpointing."""
    launch = recipe.launch
    nproc, nnodes = launch.gpus, launch.nnodes
    if cluster.cuda_devices:
        if nproc > cluster.cuda_devices:
            raise UserError(
                f"--gpus {nproc} but this machine has {cluster.cuda_devices} CUDA device(s); "
                f"use --gpus 1..{cluster.cuda_devices}"
            )
        device, dist_backend = "cuda", "nccl"
        if recipe.parallel.backend == "fsdp" and recipe.parallel.fsdp.cpu_offload:
            # Offloaded shards and their gradients live in host memory: the gradient norm (and checkpoint
            # collectives) reduce CPU tensors, which NCCL cannot; gloo takes the CPU ones.
            dist_backend = "cuda:nccl,cpu:gloo"
    else:
        device, dist_backend = "cpu", "gloo"
    world = nproc * nnodes
    if recipe.parallel.backend == "none" and world > 1:
        raise UserError(f"parallel.backend = 'none' runs one process, but the launch has {world} ranks; use 'fsdp'")
    mb = micro_batch if micro_batch is not None else recipe.train.micro_batch
    ckpt = recipe.train.gradient_checkpointing
    reshard = recipe.parallel.fsdp.reshard_after_forward is not False  # 'auto' without a model shape: free
    estimate = None
    if model is not None:
        from launcher.plan import memory

        train = recipe.train.model_copy(update={"micro_batch": mb})
        gpu_mem = planned_gpu_memory(recipe, cluster)
        estimate = memory.choose(recipe.model_copy(update={"train": train}), model, world, gpu_mem, nproc)
        mb, ckpt = estimate.setup.micro_batch, estimate.setup.checkpointing
        if recipe.parallel.fsdp.reshard_after_forward == "auto":
            reshard = not estimate.setup.keep_gathered
    if mb == "auto":
        mb = 1  # no model shape to plan with: 1 always fits best.
    if ckpt == "auto":
        ckpt = True
    accum = batch_split(recipe.train.global_batch, int(mb), world)
    check_elastic_nodes(recipe.train.global_batch, int(mb), nproc, cluster.min_nodes, nnodes)
    # Ranks import only the installed package: `python -m` puts the current directory first on sys.path,
    # so a launcher/ (or torch/) folder where qlaunch runs would replace it in torchrun and on every rank.
    env = {"PYTHONSAFEPATH": "1"}
    if device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    if device == "cuda":
        # Fail a hung collective instead of waiting forever, and keep NVLink multicast off.
        env.update({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_NVLS_ENABLE": "0"})
        # FSDP frees and re-allocates gathered layers of one size all step long; growable segments stop
        # that from fragmenting the cache (reserved memory well above allocated). A user's own setting wins.
        env["PYTORCH_CUDA_ALLOC_CONF"] = cluster.cuda_alloc_conf or "expandable_segments:True"
    env.update(multinode_env(device, nnodes))
    hybrid = recipe.parallel.backend == "fsdp" and recipe.parallel.fsdp.hybrid  # no effect on one node
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
        gradient_checkpointing=bool(ckpt),
        reshard_after_forward=reshard,
        memory=estimate.to_dict() if estimate is not None else None,
        gpu_memory_cap_bytes=gpu_memory_cap(recipe),
        hybrid_shard=hybrid and nnodes > 1,
    )
    return plan


def parse_nnodes(text: str) -> tuple[int | None, int]:
    """`--nnodes N` or `--nnodes MIN:MAX` (elastic) -> (min or None, max)."""
    lo, sep, hi = text.partition(":")
    try:
        mn, mx = (int(lo), int(hi)) if sep else (None, int(lo))
    except ValueError:
        raise UserError(f"--nnodes {text}: expected a node count N or a range MIN:MAX") from None
    if mx < 1 or (mn is not None and not 1 <= mn <= mx):
        raise UserError(f"--nnodes {text}: need 1 <= MIN <= MAX")
    return (None if mn == mx else mn), mx


def check_elastic_nodes(global_batch: int, micro_batch: int, nproc: int, min_nodes: int | None, nnodes: int) -> None:
    """An elastic run may train on any node count in [min, max]: each must split the global batch."""
    if min_nodes is None:
        return
    for n in range(min_nodes, nnodes):
        per_step = micro_batch * nproc * n
        if global_batch % per_step:
            raise UserError(
                f"--nnodes {min_nodes}:{nnodes}: with {n} node(s) train.global_batch = {global_batch} does not "
                f"split into micro-batch {micro_batch} x {nproc * n} ranks; pick a global batch divisible by "
                f"{micro_batch} x {nproc} x every node count in the range"
            )


def multinode_env(device: str, nnodes: int) -> dict[str, str]:
    """NCCL settings for runs that span nodes (recorded in launch.json with the rest of the env)."""
    if device != "cuda" or nnodes == 1:
        return {}
    return {
        # A rank whose collective failed or timed out (a peer node died) tears its process down, so
        # torchrun sees the failure instead of a hang. 3 = without ncclCommAbort first, which can itself
        # hang when the peer is unreachable.
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
        # On a timeout each rank dumps its recent collectives (flight recorder) to
        # /tmp/nccl_trace_rank_<N> on its node: which rank never joined which collective.
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
    }


def resolve_recipe(recipe: Recipe, plan: Plan) -> Recipe:
    """The recipe with its 'auto' settings replaced by the plan's choices (what the run dir records and
    the workers read)."""
    t = recipe.train
    update: dict[str, Any] = {}
    if t.micro_batch == "auto":
        update["micro_batch"] = plan.micro_batch
    if t.gradient_checkpointing == "auto":
        update["gradient_checkpointing"] = plan.gradient_checkpointing
    out = recipe.model_copy(update={"train": t.model_copy(update=update)}) if update else recipe
    if recipe.parallel.fsdp.reshard_after_forward == "auto":
        from launcher.plan.memory import with_fsdp

        out = with_fsdp(out, reshard_after_forward=plan.reshard_after_forward)
    return out


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
    args += ["--module", "launcher.rank.worker", run_dir]
    return args


def python_cmd() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run"]


WATCH_PORT_OFFSET = 1
