"""One rank's whole run: process group -> model -> data -> the step loop (accumulation, clipping, schedule,
eval, checkpoints, stop requests, divergence) -> adapter export."""

from __future__ import annotations

import json
import math
import os
import random
import resource
import signal
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from launcher.data.cache import DATA_CACHE_DIR, build_data
from launcher.data.pack import IGNORE, with_pair_top
from launcher.data.sampler import StepBatches, StepSampler, batch_counts
from launcher.data.tokenizer import build_tokenizer
from launcher.errors import TrainingDiverged
from launcher.plan.plan import Plan
from launcher.rank.build import build_model
from launcher.rank.checkpoint import load, save
from launcher.rank.checkpoint_dir import newest_complete
from launcher.rank.export import model_card, save_adapter
from launcher.rank.objective import SFT, make_objective
from launcher.rank.parallel import make_engine
from launcher.rank.profiling import MemoryRecorder, StepProfiler
from launcher.rank.sample import fsdp_root, rendered_prompts, sample_texts
from launcher.rank.sinks import gather_per_rank, open_sinks
from launcher.rundir import RunDir, RunPlan


class StopRequest:
    """SIGTERM/SIGUSR1 (SLURM) or the launcher's stop file (SIGTERM, SIGUSR1 or Ctrl-C to qlaunch) ask for a
    checkpoint at the next step boundary, then exit."""

    def __init__(self, stop_file: Path):
        self.flag = False
        self.stop_file = stop_file
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        self.flag = True
        print(f"received {signal.Signals(signum).name}: checkpoint at the next step boundary", flush=True)

    def requested(self) -> bool:
        return self.flag or self.stop_file.exists()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def attempt_store(timeout: timedelta):
    """The elastic agent's store, under a prefix unique to this restart attempt.

    After an elastic restart the agent's store still holds the previous attempt's keys; once a run has
    created more than the default group (FSDP meshes, DCP), the new attempt's gloo ranks can read a dead
    peer's address from them and fail to connect. A per-attempt prefix keeps every attempt's keys apart.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"qlaunch/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)


def init_process_group(plan: Plan, d) -> tuple[torch.device, object]:
    """Process group + device + the device mesh for FSDP (None for unsharded runs): 1-D, or 2-D
    (replicate across nodes, shard within a node) for hybrid sharding."""
    if plan.device == "cuda":
        torch.cuda.set_device(d.local_rank)
        device = torch.device("cuda", d.local_rank)
        cap = plan.gpu_memory_cap_bytes
        if cap:  # launch.gpu_memory_gb: the allocator refuses (out of memory) beyond the cap
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    else:
        device = torch.device("cpu")
    mesh = None
    if plan.backend != "none":
        kw = {"device_id": device} if device.type == "cuda" else {}
        timeout = timedelta(seconds=plan.collective_timeout_s)
        store = attempt_store(timeout)
        if store is not None:
            kw.update(store=store, rank=d.rank, world_size=d.world)
        dist.init_process_group(plan.dist_backend, timeout=timeout, **kw)
    if plan.backend == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        # --- multinode: hybrid sharding. torchrun numbers ranks node by node, so row n of an
        # (nodes, ranks-per-node) mesh is node n. The node count comes from the actual world size:
        # an elastic run (--nnodes MIN:MAX) may have started with fewer nodes than planned.
        if plan.hybrid_shard and d.world > plan.nproc_per_node:
            per_node = plan.nproc_per_node
            shape = (d.world // per_node, per_node)
            mesh = init_device_mesh(device.type, shape, mesh_dim_names=("replicate", "shard"))
            print(f"[rank {d.rank}] hybrid sharding: replicate x{shape[0]} (nodes), shard x{shape[1]}", flush=True)
        else:
            mesh = init_device_mesh(device.type, (d.world,))
    return device, mesh


def peak_memory_gb(device: torch.device) -> dict[str, float]:
    out = {"host_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        out["gpu_alloc_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["gpu_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 2**30
    return out


def run_training(run: RunDir, d, terminal=None) -> None:
    """`terminal`: rank 0's own stdout when no qlaunch follows the run (worker._unfollowed_terminal)."""
    from launcher.rank.metrics import Metrics

    t_spawn = float(os.environ.get("QLAUNCH_SPAWN_TIME", time.time()))
    recipe = run.load_recipe()
    run_plan = run.load_plan()
    metrics = Metrics(run.metrics, enabled=d.rank == 0)
    try:  # a failing rank ends with os._exit (worker.leave): its sinks must be flushed here
        if d.rank == 0:
            layers = (run_plan.plan.memory or {}).get("layers")
            metrics.sinks = open_sinks(
                recipe, run.path, lambda msg: metrics("warning", message=msg), terminal=terminal, layers=layers
            )
        _train(run, d, recipe, run_plan, metrics, t_spawn)
    finally:
        metrics.close()


def _train(run: RunDir, d, recipe, run_plan: RunPlan, metrics, t_spawn: float) -> None:
    plan = run_plan.plan
    device, mesh = init_process_group(plan, d)
    seed_everything(recipe.train.seed)
    metrics("loading", phase="model", rank=d.rank)
    t_load = time.time()

    def progress(name: str, bytes_read: int | None = None) -> None:
        extra = {"bytes_read": bytes_read} if bytes_read is not None else {}
        metrics("loading", phase="model", tensor=name, **extra)

    materializer = None
    if plan.backend == "deepspeed":  # ZeRO-3 partitions while loading (None for stage 2)
        from launcher.rank.parallel.deepspeed import zero3_materializer

        materializer = zero3_materializer(run.path, plan.dist_backend)
    built = build_model(recipe, device, mesh, progress=progress, materializer=materializer)
    # seconds: reading and quantizing the weights; wall_s: the whole load, building the model included (what
    # the terminal's "model loaded in" shows).
    metrics("loaded", seconds=built.stats.seconds, wall_s=time.time() - t_load, bytes_read=built.stats.bytes_read,
            **peak_memory_gb(device))  # fmt: skip
    print(
        f"[rank {d.rank}] loaded {built.stats.tensors} tensors in {built.stats.seconds:.1f}s, read {built.stats.bytes_read / 2**20:.1f} MiB",
        flush=True,
    )

    tokenizer = build_tokenizer(recipe, built.model_dir)
    metrics("loading", phase="data")
    # Tokenized data is cached per content fingerprint beside the runs, so later runs reuse it; `qlaunch run`
    # has built it already (every row checked before spawning), so normally this only maps the file.
    cache = run_plan.data_cache or run.path.parent.parent / DATA_CACHE_DIR
    attempt = f"{run.path}#{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    train_data, val_data = build_data(recipe, tokenizer, d.rank, d.world, cache, attempt=attempt)
    sampler = StepSampler(len(train_data), plan.global_batch, plan.micro_batch, d.world, d.rank, recipe.train.seed)
    total_steps = recipe.train.max_steps or max(1, math.ceil(recipe.train.epochs * sampler.steps_per_epoch))

    engine = make_engine(built, recipe, plan, total_steps, device, run_dir=run.path)
    model = engine.model
    t = recipe.train
    # Resume: this run's own newest complete checkpoint (an elastic restart) wins over --resume's target.
    start_step = 0
    ckpt = newest_complete(run.checkpoints)
    if ckpt is None:
        ckpt = run_plan.resume_from
    if ckpt is not None:
        meta = load(ckpt, engine)
        start_step = meta["step"]
        metrics("resumed", step=start_step, path=str(ckpt))
        print(f"[rank {d.rank}] resumed from {ckpt} at step {start_step}", flush=True)
    stop = StopRequest(run.stop_file)
    metrics("start", total_steps=total_steps, world=d.world, first_step_after_s=time.time() - t_spawn)

    profiler = StepProfiler(recipe.log.profile_steps, run.profile, d.rank, device)
    memory = MemoryRecorder(recipe.log.memory_steps, run.profile, d.rank, device)
    tokens_seen = 0
    t_last = time.perf_counter()
    data_s = 0.0  # host time spent waiting for batches since the last metrics line (the data-loader cost)
    objective = make_objective(recipe, built.peft_model, built.compiled, plan.global_batch // plan.micro_batch)
    final: dict[str, float] = {}  # the last step's and evaluation's figures, for the adapter's model card
    batches = StepBatches(train_data, sampler, pin=device.type == "cuda", preference=objective.preference)
    sample_prompts, stop_ids = rendered_prompts(recipe.data, tokenizer, recipe.train.samples.prompts)
    for step in range(start_step, total_steps):
        profiler.begin(step + 1)
        memory.begin(step + 1)
        t_data = time.perf_counter()
        micro, counts = batches.get(step, step + 1 if step + 1 < total_steps else None)
        data_s += time.perf_counter() - t_data
        # Each micro-batch's loss is divided by counts of the whole global batch (label tokens, pairs), so
        # any split over ranks and micro-steps computes the same loss (and gradient) as one device would.
        sums, grad_norm = optimizer_step(model, engine, micro, objective, counts, device)
        # One all-reduce carries the loss sums and any rank's stop request, so all ranks agree on stopping.
        red = torch.cat([sums, torch.tensor([float(stop.requested())], device=device)])
        if dist.is_initialized():
            dist.all_reduce(red)
        values = red.tolist()
        reported = objective.report(values[:-1], counts)
        loss = reported["loss"]
        final.update({f"final_{k}": v for k, v in reported.items()})
        preempted = values[-1] > 0
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            # Every rank has the same all-reduced loss and global norm: all stop here, before anything of
            # this step (checkpoint, eval, adapter) is written.
            metrics("diverged", step=step + 1, loss=str(loss), grad_norm=str(grad_norm))
            raise diverged(step + 1, loss, grad_norm, run, run_plan.resume_from)
        profiler.end(step + 1)
        memory.end(step + 1)
        tokens = plan.global_batch * recipe.data.seq_len
        tokens_seen += tokens
        if step % recipe.log.every_steps == 0 or step == total_steps - 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            dt = now - t_last
            t_last = now
            steps_in = min(recipe.log.every_steps, step + 1)
            tps = tokens * steps_in / dt
            mem = peak_memory_gb(device)
            metrics(
                "step",
                step=step + 1,
                total_steps=total_steps,
                **reported,
                lr=engine.lr(),
                grad_norm=grad_norm,
                tokens_per_s=tps,
                tokens_per_s_per_gpu=tps / d.world,
                step_time_s=dt / steps_in,
                data_time_s=data_s / steps_in,
                **mem,
                **gather_per_rank(mem, device),  # collective: every rank logs the same steps
            )
            print(f"[rank {d.rank}] step {step + 1}/{total_steps} loss {loss:.4f}", flush=True)
            data_s = 0.0
        eval_due = bool(t.eval_every) and ((step + 1) % t.eval_every == 0 or step == total_steps - 1)
        if val_data is not None and eval_due:
            evaluated = evaluate(model, val_data, plan.micro_batch, d, device, objective)
            final.update({f"final_{k}": v for k, v in evaluated.items()})
            metrics("eval", step=step + 1, **evaluated)
        if sample_prompts and (eval_due or step == total_steps - 1):  # every rank: a sharded model decodes together
            done = sample_texts(built.causal_lm, tokenizer, sample_prompts, t.samples.max_new_tokens, stop_ids,
                                device, fsdp_root(built.loss_model))  # fmt: skip
            metrics("samples", step=step + 1, samples=done)

        every = recipe.checkpoint.every_steps
        if preempted or (every and (step + 1) % every == 0 and step + 1 < total_steps):
            metrics("checkpointing", step=step + 1)
            path = save(run.checkpoints, step + 1, engine, recipe, {}, recipe.checkpoint.keep_last)
            metrics("checkpoint", step=step + 1, path=str(path))
        if preempted:
            if d.rank == 0:
                run.preempted_file.write_text(json.dumps({"step": step + 1, "checkpoint": str(path)}))
            metrics("preempted", step=step + 1, path=str(path))
            return

    if recipe.checkpoint.every_steps and start_step < total_steps:
        path = save(run.checkpoints, total_steps, engine, recipe, {}, recipe.checkpoint.keep_last)
        metrics("checkpoint", step=total_steps, path=str(path))
    if recipe.checkpoint.save_final_adapter:
        card = model_card(recipe, total_steps, final) if d.rank == 0 else None
        out = save_adapter(built.peft_model, run.adapter, d.rank, tokenizer, card)
        metrics("adapter", path=str(out))
    metrics("done", steps=total_steps, **peak_memory_gb(device))


def diverged(step: int, loss: float, grad_norm: float, run: RunDir, resume_from: Path | None) -> TrainingDiverged:
    what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm}"
    last = newest_complete(run.checkpoints, warn=lambda _msg: None)
    if last is None:
        last = resume_from
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved before it"
    return TrainingDiverged(
        f"training diverged at step {step}: {what}; nothing of this step was saved and no adapter was "
        f"exported; {kept}. Lower train.lr, set train.grad_clip, or check the data and the model's weights"
    )


def optimizer_step(model, engine, micro: list[dict], objective, counts, device) -> tuple[torch.Tensor, float]:
    """Forward and backward of this rank's micro-batches, each one's share of the global batch's loss (the
    objective divides by the global COUNTS), then the engine's step; returns this rank's sums of the
    objective's reported quantities (not yet all-reduced; the loss first) and the global gradient norm."""
    sums = None
    for b in micro:
        b = to_device(b, device, non_blocking=True)
        share, s = objective.micro(model, b, counts)
        engine.backward(share)
        sums = s if sums is None else sums + s
    return sums, engine.step()


def to_device(batch: dict, device, non_blocking: bool = False) -> dict:
    """The batch's tensors on DEVICE; host values (with_pair_top's int) as they are."""
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, data, micro_batch: int, d, device, objective=None) -> dict[str, float]:
    """The objective over the whole validation set ('eval_loss' and, for preference objectives, the eval
    rewards); each rank takes every world-th micro-batch."""
    objective = objective or SFT()
    was = model.training
    model.eval()
    idx = list(range(len(data)))
    counts = batch_counts(data, idx, objective.preference)
    batches = [idx[i : i + micro_batch] for i in range(0, len(idx), micro_batch)]
    total = None
    # Every rank runs the same number of forwards of the same shape (FSDP's all-gathers and the
    # vocabulary-sharded loss are collective): ranks past the end repeat batch 0 and discard it, and a
    # short last batch is filled up with rows whose labels are all ignored (and whose pairs do not count).
    for i in range(-(-len(batches) // d.world)):
        k = i * d.world + d.rank
        rows = batches[k if k < len(batches) else 0]
        bt = data.collate(rows + rows[:1] * (micro_batch - len(rows)))
        bt["labels"][len(rows) :] = IGNORE
        weight = torch.zeros(micro_batch, device=device)
        weight[: len(rows)] = 1.0
        if objective.preference:
            bt = with_pair_top(bt)
        bt = to_device(bt, device)
        _, s = objective.micro(model, bt, counts, row_weight=weight)
        s = s if k < len(batches) else torch.zeros_like(s)
        total = s if total is None else total + s
    if dist.is_initialized():
        dist.all_reduce(total)
    model.train(was)
    return {f"eval_{name}": v for name, v in objective.report(total.tolist(), counts).items()}
