"""One rank of the family parity runs (tests/test_families.py), started by torch elastic:

    python -m torch.distributed.run --nproc-per-node N tests/family_worker.py CHECKPOINTS OUT.json

For every family checkpoint under CHECKPOINTS it builds the model as a qlaunch rank does (`build_model`:
skeleton, quantized layers, LoRA, FSDP2 over a gloo mesh of all ranks, this rank's shards filled), and takes
optimizer steps through the step loop's own `optimizer_step` and the FSDP engine, on a fixed global batch of
4 rows split over the ranks (2 rows per micro-batch: world 1 accumulates two). Rank 0 writes, per family and
phase, the all-reduced loss and gradient norm of every step (and for lr=0 an eval between steps), so the test
compares world sizes. One process pair for all families: a CLI run per family and phase would cost minutes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher.data.sampler import StepCounts  # noqa: E402
from launcher.plan.recipe_file import load_recipe  # noqa: E402
from launcher.rank import loss as loss_module  # noqa: E402
from launcher.rank.build import build_model  # noqa: E402
from launcher.rank.loop import optimizer_step  # noqa: E402
from launcher.rank.model.experts import NF4Experts  # noqa: E402
from launcher.rank.model.shard import local_view  # noqa: E402
from launcher.rank.model.skeleton import decoder_layers, input_embedding, is_tied  # noqa: E402
from launcher.rank.objective import sft_objective  # noqa: E402
from launcher.rank.parallel.torch_engine import TorchEngine  # noqa: E402
from tests.families import model_keys  # noqa: E402

SEQ, ROWS, MICRO, STEPS = 33, 4, 2, 3

# phase -> recipe settings; every phase is fp32 so world sizes differ only by summation order.
PHASES = {
    "dense": ['bits = "none"', 1e-3],
    "nf4": ["bits = 4", 1e-3],
    "nf4_lr0": ["bits = 4", 0.0],
}


def recipe_text(model_dir: Path, family: str, bits: str, lr: float) -> str:
    keys = {"path": str(model_dir), "dtype": "float32", **model_keys(family)}
    model = "\n".join(f"{k} = {json.dumps(v)}" for k, v in keys.items())
    return f"""
name = "family"
[model]
{model}
[quant]
{bits}
compute_dtype = "float32"
storage_dtype = "float32"
[lora]
rank = 4
alpha = 8
[data]
datasets = [{{ path = "{ROOT / "assets" / "tiny-data" / "train.jsonl"}" }}]
format = "alpaca"
seq_len = {SEQ}
[train]
max_steps = {STEPS}
micro_batch = {MICRO}
global_batch = {ROWS}
lr = {lr}
warmup_steps = 0
grad_clip = 0.5
"""


def global_batch(step: int, vocab: int) -> dict[str, torch.Tensor]:
    """ROWS rows of random tokens; the first 5 labels of each row masked (a prompt), as the data packs them."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(3, vocab, (ROWS, SEQ), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(SEQ).expand(ROWS, SEQ).clone()}


def rank_micro_batches(batch: dict, rank: int, world: int) -> list[dict]:
    per_rank = ROWS // world
    mine = {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in batch.items()}
    return [{k: v[i : i + MICRO] for k, v in mine.items()} for i in range(0, per_rank, MICRO)]


def eval_loss(model, batch: dict, rank: int, world: int) -> float:
    model.eval()
    total = torch.zeros(2)
    with torch.no_grad():
        for b in rank_micro_batches(batch, rank, world):
            s, n, *_ = model(b["input_ids"], b["labels"], b["position_ids"])  # the cross-entropy only
            total += torch.stack([s.float(), n.float()])
    dist.all_reduce(total)
    model.train()
    return float(total[0] / total[1])


HEAD_ROWS: list[int] = []  # vocabulary rows of the head weight each loss call read (a DTensor: this rank's shard)


def _recording_head_loss(h, w, *args, **kwargs):
    HEAD_ROWS.append(local_view(w)[0].shape[0])
    return _fused_head_loss(h, w, *args, **kwargs)


_fused_head_loss, loss_module.fused_head_loss = loss_module.fused_head_loss, _recording_head_loss


def run_phase(recipe_path: Path, mesh, rank: int, world: int, with_eval: bool) -> dict:
    recipe = load_recipe(recipe_path)
    built = build_model(recipe, torch.device("cpu"), mesh)
    engine = TorchEngine(built.loss_model, recipe, STEPS, "cpu", grad_average_over=world)
    vocab = input_embedding(built.causal_lm).num_embeddings
    out = {"loss": [], "grad_norm": [], "eval": [], "aux_loss": [], "tied": is_tied(built.causal_lm)}
    out["layers"] = len(decoder_layers(built.causal_lm))  # found again after FSDP2 renamed the classes
    out["base_params"] = len({id(p) for p in built.causal_lm.parameters() if not p.requires_grad})
    out["vocab"] = vocab
    # (local rows, all rows) of each NF4 experts storage parameter on this rank: the bytes it holds
    experts = [m for m in built.causal_lm.modules() if isinstance(m, NF4Experts)]
    out["expert_rows"] = sorted({(local_view(p)[0].shape[0], p.shape[0]) for m in experts for p in m.parameters()})
    out["bytes_read"] = built.stats.bytes_read
    objective = sft_objective(built.causal_lm, ROWS // MICRO)
    HEAD_ROWS.clear()
    for step in range(STEPS):
        batch = global_batch(step % 2 if with_eval else step, vocab)
        counts = StepCounts(int((batch["labels"][:, 1:] != -100).sum()))
        sums, norm = optimizer_step(
            built.loss_model, engine, rank_micro_batches(batch, rank, world), objective, counts, "cpu"
        )
        dist.all_reduce(sums)
        reported = objective.report(sums.tolist(), counts)  # the loop's own step figures
        out["loss"].append(reported["loss"])
        if "aux_loss" in reported:
            out["aux_loss"].append(reported["aux_loss"])
        out["grad_norm"].append(float(norm))
        if with_eval:
            out["eval"].append(eval_loss(built.loss_model, global_batch(0, vocab), rank, world))
    out["head_rows"] = sorted(set(HEAD_ROWS))
    return out


def main(checkpoints: Path, out_file: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    results: dict[str, dict] = {}
    for model_dir in sorted(p for p in checkpoints.iterdir() if (p / "config.json").exists()):
        family = model_dir.name
        for phase, (bits, lr) in PHASES.items():
            recipe_path = out_file.parent / f"{family}-{phase}-w{world}-r{rank}.toml"
            recipe_path.write_text(recipe_text(model_dir, family, bits, lr))
            results[f"{family}/{phase}"] = run_phase(recipe_path, mesh, rank, world, with_eval=lr == 0.0)
    if rank == 0:
        out_file.write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
