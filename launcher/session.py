"""One rank's whole run: process group -> model -> data -> step loop -> adapter export."""

from __future__ import annotations

import math
import os
import random
import resource
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from launcher import export
from launcher.data import StepSampler, build_data, build_tokenizer
from launcher.loading import build_model
from launcher.parallel import make_engine
from launcher.rundir import RunDir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def init_process_group(plan: dict, d) -> tuple[torch.device, object]:
    """Process group + device + a 1-D device mesh for FSDP (None for unsharded runs)."""
    if plan["device"] == "cuda":
        torch.cuda.set_device(d.local_rank)
        device = torch.device("cuda", d.local_rank)
    else:
        device = torch.device("cpu")
    mesh = None
    if plan["backend"] != "none":
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(plan["dist_backend"], timeout=timedelta(minutes=30), **kw)
    if plan["backend"] == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (d.world,))
    return device, mesh


def peak_memory_gb(device: torch.device) -> dict[str, float]:
    out = {"host_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        out["gpu_alloc_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["gpu_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 2**30
    return out


def run_training(run: RunDir, d) -> None:
    from launcher.worker import Metrics

    t_spawn = float(os.environ.get("QLAUNCH_SPAWN_TIME", time.time()))
    recipe = run.load_recipe()
    plan = run.load_plan()
    metrics = Metrics(run.metrics, enabled=d.rank == 0)
    device, mesh = init_process_group(plan, d)
    seed_everything(recipe.train.seed)
    metrics("loading", phase="model", rank=d.rank)

    def progress(name: str) -> None:
        metrics("loading", phase="model", tensor=name)

    built = build_model(recipe, device, mesh, progress=progress)
    metrics("loaded", seconds=built.stats.seconds, bytes_read=built.stats.bytes_read, **peak_memory_gb(device))
    print(
        f"[rank {d.rank}] loaded {built.stats.tensors} tensors in {built.stats.seconds:.1f}s, read {built.stats.bytes_read / 2**20:.1f} MiB",
        flush=True,
    )

    tokenizer = build_tokenizer(recipe, built.model_dir)
    metrics("loading", phase="data")
    train_data, val_data = build_data(recipe, tokenizer, d.rank, d.world, run.path / "cache")
    sampler = StepSampler(
        len(train_data), plan["global_batch"], plan["micro_batch"], d.world, d.rank, recipe.train.seed
    )
    total_steps = recipe.train.max_steps or max(1, math.ceil(recipe.train.epochs * sampler.steps_per_epoch))

    engine = make_engine(built, recipe, plan, total_steps, device)
    model = engine.model
    t = recipe.train
    metrics("start", total_steps=total_steps, world=d.world, first_step_after_s=time.time() - t_spawn)

    tokens_seen = 0
    t_last = time.perf_counter()
    for step in range(total_steps):
        micro = [train_data.collate(idx) for idx in sampler.micro_batches(step)]
        # Normalise by the label tokens of the whole global batch, so any split over ranks and
        # micro-steps computes the same loss (and gradient) as one device would.
        n_local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        count = torch.tensor([float(n_local)], device=device)
        if dist.is_initialized():
            dist.all_reduce(count)
        n_global = max(float(count.item()), 1.0)
        loss_sum = torch.zeros((), device=device)
        for b in micro:
            b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
            s, _ = model(b["input_ids"], b["labels"], b["position_ids"])
            engine.backward(s / n_global)
            loss_sum += s.detach()
        grad_norm = engine.step()
        if dist.is_initialized():
            dist.all_reduce(loss_sum)
        loss = float(loss_sum) / n_global
        tokens = plan["global_batch"] * recipe.data.seq_len
        tokens_seen += tokens
        if step % recipe.log.every_steps == 0 or step == total_steps - 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            dt = now - t_last
            t_last = now
            steps_in = min(recipe.log.every_steps, step + 1)
            tps = tokens * steps_in / dt
            metrics(
                "step",
                step=step + 1,
                total_steps=total_steps,
                loss=loss,
                lr=engine.lr(),
                grad_norm=grad_norm,
                tokens_per_s=tps,
                tokens_per_s_per_gpu=tps / d.world,
                step_time_s=dt / steps_in,
                **peak_memory_gb(device),
            )
            print(f"[rank {d.rank}] step {step + 1}/{total_steps} loss {loss:.4f}", flush=True)
        if val_data is not None and t.eval_every and ((step + 1) % t.eval_every == 0 or step == total_steps - 1):
            metrics("eval", step=step + 1, eval_loss=evaluate(model, val_data, plan["micro_batch"], d, device))

    if recipe.checkpoint.save_final_adapter:
        out = export.save_adapter(built.peft_model, run.adapter, d.rank)
        metrics("adapter", path=str(out))
    metrics("done", steps=total_steps, **peak_memory_gb(device))
    metrics.close()


@torch.no_grad()
def evaluate(model, data, micro_batch: int, d, device) -> float:
    """Token-mean loss over the whole validation set; each rank takes every world-th micro-batch."""
    was = model.training
    model.eval()
    total = torch.zeros(2, device=device)
    idx = list(range(len(data)))
    batches = [idx[i : i + micro_batch] for i in range(0, len(idx), micro_batch)]
    # Every rank runs the same number of forwards (FSDP's all-gathers are collective); ranks past the
    # end repeat batch 0 and discard it.
    for i in range(-(-len(batches) // d.world)):
        k = i * d.world + d.rank
        bt = {key: v.to(device) for key, v in data.collate(batches[k if k < len(batches) else 0]).items()}
        s, n = model(bt["input_ids"], bt["labels"], bt["position_ids"])
        if k < len(batches):
            total += torch.stack([s.float(), n.float()])
    if dist.is_initialized():
        dist.all_reduce(total)
    model.train(was)
    return float(total[0] / total[1].clamp(min=1))
