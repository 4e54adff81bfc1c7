"""The step's speed features compute the same thing as the plain path: the fused lm_head + cross-entropy,
LoRA on lm_head (the module path), `train.compile`, and `log.profile_steps` (the profiler's output)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from launcher.plan.recipe_file import load_recipe
from launcher.rank.loss import IGNORE, LinearCrossEntropy
from launcher.rank.model.logits import LogitTransform
from tests.conftest import BASE_RECIPE, free_port, run_cli

TRANSFORMS = [LogitTransform(), LogitTransform(divide_by=4.0), LogitTransform(softcap=3.0), LogitTransform(2.0, 3.0)]


@pytest.mark.parametrize("transform", TRANSFORMS, ids=["plain", "granite", "gemma", "both"])
@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_linear_cross_entropy_matches_autograd(chunk, transform):
    """Per-token losses and the input gradient equal those of logits + F.cross_entropy (fp64), with ignored
    labels and a chunk size that does not divide the tokens; no gradient is stored without grad. The upstream
    gradient differs per token (as DPO's per-sequence weights make it), so each token's stored gradient must
    be scaled by its own. Also through each logit transform (Granite's division, Gemma's soft-cap), whose
    slope the fused gradient must apply."""
    torch.manual_seed(0)
    h = torch.randn(61, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64)
    y = torch.randint(0, 50, (61,))
    y[::5] = IGNORE
    weights = torch.rand(61, dtype=torch.float64) - 0.3
    ref = F.cross_entropy(transform(F.linear(h, w)), y, ignore_index=IGNORE, reduction="none")
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), h)
    out = LinearCrossEntropy.apply(h, w, y, chunk, transform)
    (g,) = torch.autograd.grad((out * weights).sum(), h)
    assert out.shape == (61,) and torch.allclose(out, ref, rtol=1e-12)
    assert torch.allclose(g, g_ref, rtol=1e-10, atol=1e-12)
    assert g[::5].abs().max() == 0  # ignored positions get no gradient
    with torch.no_grad():
        assert torch.allclose(LinearCrossEntropy.apply(h, w, y, chunk, transform), ref)


def test_the_loss_chunk_is_the_planners_and_shrinks_with_the_vocabulary():
    """CausalLMLoss runs lm_head over memory.loss_chunk_tokens(vocab) tokens at a time (half again with a
    soft-cap's slope buffer), the chunk the planner counts; the sum is the same for any chunk (above)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.plan.memory import LOSS_CHUNK_FP32_BYTES, LOSS_CHUNK_MIN_TOKENS, loss_chunk_tokens
    from launcher.rank.loss import CausalLMLoss

    vocabs = (512, 32000, 128256, 152064, 262208)
    assert [loss_chunk_tokens(v) for v in vocabs] == [2048, 2048, 512, 256, 256]
    assert loss_chunk_tokens(256000, softcap=True) == 256
    assert (loss_chunk_tokens(65536), loss_chunk_tokens(65536, softcap=True)) == (1024, 512)
    # The largest power of two that fits, unless that would go below the floor.
    for v in vocabs[2:4]:
        assert loss_chunk_tokens(v) * v * 4 <= LOSS_CHUNK_FP32_BYTES < 2 * loss_chunk_tokens(v) * v * 4
    assert loss_chunk_tokens(262208) == LOSS_CHUNK_MIN_TOKENS and 256 * 262208 * 4 > LOSS_CHUNK_FP32_BYTES
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8)
    for cap, chunk in ((None, 1024), (30.0, 512)):
        config = AutoConfig.for_model("gemma2", vocab_size=65536, final_logit_softcapping=cap, **small)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        assert CausalLMLoss(model).chunk_tokens == chunk, cap


def _built(recipe_file, *sets: str):
    from launcher.rank.build import build_model

    torch.manual_seed(0)
    return build_model(load_recipe(recipe_file(), ['parallel.backend="none"', *sets]), torch.device("cpu"), None)


def _loss_and_grads(built, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    s, n = built.loss_model(ids, ids, None)
    (s / n).backward()
    grads = {k: p.grad.float().clone() for k, p in built.loss_model.named_parameters() if p.grad is not None}
    return float(s / n), grads


def test_lora_on_lm_head_is_trained_through_the_module(recipe_file):
    """lm_head in lora.target_modules: the loss must go through the LoRA-wrapped module (its weight
    alone would silently leave the adapter out), so the adapter gets gradients and changes the loss."""
    built = _built(recipe_file, 'lora.target_modules=["q_proj","lm_head"]')
    ids = torch.randint(0, 500, (2, 32))
    before, grads = _loss_and_grads(built, ids)
    head = {k: g for k, g in grads.items() if "lm_head" in k and "lora_B" in k}  # A gets none while B = 0
    assert head and all(g.abs().sum() > 0 for g in head.values()), sorted(grads)
    with torch.no_grad():  # B starts at zero: make the head adapter non-zero, then the loss must move
        for k, p in built.loss_model.named_parameters():
            if "lm_head" in k and "lora_B" in k:
                p.fill_(1.0)
        after = built.loss_model(ids, ids, None)
    assert abs(float(after[0] / after[1]) - before) > 1e-4


@pytest.mark.slow
def test_compiled_layers_compute_the_same_loss_and_gradients(recipe_file):
    """train.compile = true (each decoder layer through torch.compile, checkpointing on) against eager:
    same loss and LoRA gradients to float32 rounding."""
    sets = ['model.dtype="float32"', 'quant.compute_dtype="float32"', 'quant.storage_dtype="float32"']
    ids = torch.randint(0, 500, (2, 32))
    eager = _loss_and_grads(_built(recipe_file, *sets), ids)
    compiled_model = _built(recipe_file, *sets, "train.compile=true")
    assert all(hasattr(m.forward, "_torchdynamo_orig_callable") for m in compiled_model.causal_lm.model.layers)
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = _loss_and_grads(compiled_model, ids)
    # One graph for every layer, none split: a graph break costs more per call than fusion saves.
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert abs(compiled[0] - eager[0]) < 1e-5 * abs(eager[0])
    assert eager[1].keys() == compiled[1].keys() and len(eager[1]) > 0
    for k, g in eager[1].items():
        assert torch.allclose(compiled[1][k], g, rtol=1e-3, atol=1e-6), k


@pytest.mark.slow
def test_profile_steps_write_a_summary_per_rank_and_a_trace(tmp_path, recipe_file):
    out = tmp_path / "runs"
    r = run_cli(
        "run", str(recipe_file(BASE_RECIPE.replace("max_steps = 2", "max_steps = 4"))), "--gpus", "2",
        "--set", f'log.runs_dir="{out}"', "--set", "log.profile_steps=[2,3]", "--set", "log.memory_steps=[3,3]",
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    (run,) = out.glob("*/*/")
    for rank in (0, 1):
        text = (run / "profile" / f"rank{rank}.txt").read_text()
        assert text.startswith(f"rank {rank}, steps 2-3\nprofiled steps: 2, wall ")
        assert "no device kernels recorded (CPU run)" in text and "aten::" in text
    assert (run / "profile" / "rank0.trace.json.gz").stat().st_size > 1000
    for rank in (0, 1):  # the allocator history is a GPU thing: the CPU run says so instead of failing
        text = (run / "profile" / f"memory-rank{rank}.txt").read_text()
        assert text == f"rank {rank}, steps 3-3\nno CUDA device: the allocator history is recorded on GPUs only\n"
    assert not (run / "profile" / "rank1.trace.json.gz").exists()
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in steps if e["event"] == "step"] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "sets, device, expect",
    [
        ([], "cpu", False),  # 'auto' is off on CPU (CI, the demo)
        ([], "cuda", True),
        (['parallel.backend="deepspeed"'], "cuda", True),  # ZeRO-3 layers are whole units (no hook inside)
        (['parallel.backend="deepspeed"', "parallel.deepspeed.stage=2", "quant.bits=8"], "cuda", False),
        (['parallel.backend="none"'], "cuda", True),
        (["train.compile=false"], "cuda", False),
        (["train.compile=true"], "cpu", True),
        (["log.memory_steps=[2,3]"], "cuda", False),  # torch's allocator history breaks compiled layers
    ],
)
def test_compile_auto_resolution(recipe_file, sets, device, expect):
    from launcher.rank.build import compile_layers

    assert compile_layers(load_recipe(recipe_file(), sets), torch.device(device)) is expect


def test_profile_summary_of_device_kernels():
    """The GPU part of the summary, from stand-in kernel events (CI has no GPU): overlapping kernels are
    counted once in busy time, communication is left out of computing time, and each kernel lands in its
    kind."""
    from types import SimpleNamespace as NS

    from torch.autograd import DeviceType

    from launcher.rank.profiling import summarize

    def kernel(name, start, end):
        return NS(device_type=DeviceType.CUDA, name=name, time_range=NS(start=start, end=end))

    class Prof:
        def events(self):
            return [
                kernel("ncclDevKernel_AllGather_RING_LL", 0, 100),
                kernel("nvjet_sm90_tst_256x128", 10, 60),
                kernel("kDequantizeBlockwise", 50, 70),
                kernel("vectorized_elementwise_kernel", 150, 160),
            ]

        def key_averages(self):
            return NS(table=lambda **kw: "(operator table)")

    text = summarize(Prof(), 200e-6, 2, "rank 0, steps 1-2")
    assert "GPU busy (any kernel): 55.0% of wall; computing (not communication): 35.0%" in text
    assert "kernel launches per step: 2" in text
    kinds = {line[:40].strip(): line.split()[-2] for line in text.splitlines()[6:10]}
    assert kinds == {
        "communication": "0.05",
        "matmul": "0.03",
        "4-bit dequantize": "0.01",
        "other (elementwise, norms, reductions)": "0.01",
    }, text


def test_memory_recorder_says_why_it_recorded_nothing_on_a_gpu_run_resumed_past_its_first_step(tmp_path):
    """A run resumed at step 3 with log.memory_steps = [2, 3] never began recording: its note must say so,
    not claim that there is no GPU (no CUDA call is made on this path, so it runs on CPU too)."""
    from launcher.rank.profiling import MemoryRecorder

    rec = MemoryRecorder((2, 3), tmp_path, 1, torch.device("cuda", 0))
    rec.begin(3)
    rec.end(3)
    assert (tmp_path / "memory-rank1.txt").read_text() == (
        "rank 1, steps 2-3\nstep 2 ran before this process started (a resumed run): nothing recorded\n"
    )


def test_memory_peak_breakdown_replays_the_allocator_trace():
    """The peak of a recorded allocator trace and what was live at it, grouped by allocation site: blocks
    count until 'free_completed', frees of blocks allocated before recording lower the base line, and a
    site is the innermost frame outside torch's generic wrappers plus the innermost project/library frame."""
    from launcher.rank.profiling import memory_summary, peak_breakdown

    def fr(path, line, name):
        return {"filename": path, "line": line, "name": name}

    mod = fr("/x/site-packages/torch/nn/modules/module.py", 1, "_call_impl")
    gather = [fr("/x/site-packages/torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py", 10, "all_gather")]
    loss = [fr("/x/site-packages/torch/_tensor.py", 5, "to"), fr("/r/launcher/rank/loss.py", 80, "forward"), mod]
    mlp = [fr("/x/site-packages/transformers/models/llama/modeling_llama.py", 7, "forward"), mod]
    ev = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": gather},
        {"action": "alloc", "addr": 2, "size": 50, "frames": loss},
        {"action": "free_requested", "addr": 1, "size": 100, "frames": gather},
        {"action": "alloc", "addr": 3, "size": 30, "frames": loss},
        {"action": "alloc", "addr": 4, "size": 20, "frames": mlp},  # peak: 1000 + 100 + 50 + 30 + 20
        {"action": "free_completed", "addr": 1, "size": 100, "frames": gather},
        {"action": "free_completed", "addr": 99, "size": 400, "frames": []},  # allocated before recording
        {"action": "alloc", "addr": 5, "size": 150, "frames": mlp},  # 1000 - 400 + 250: below the peak
    ]
    peak, at, rows = peak_breakdown(ev, 1000)
    assert (peak, at) == (1200, 4)
    assert rows == [
        ("(allocated before the recorded steps: model shards, optimizer state, ...)", 1000, 0),
        ("torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py:10 all_gather", 100, 1),
        ("launcher/rank/loss.py:80 forward", 80, 2),
        ("transformers/models/llama/modeling_llama.py:7 forward", 20, 1),
    ]
    text = memory_summary(ev, 1000, 5 * 2**30, "rank 0, steps 2-3")
    assert text.splitlines()[1].endswith("peak reserved since the run began 5.00 GiB")
    assert "launcher/rank/loss.py:80 forward" in text


SHARDED_TRANSFORMS = [LogitTransform(), LogitTransform(2.0, 3.0)]


def _sharded_ce_rank(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from launcher.rank.loss import fused_head_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    h_all, w, y_all = _sharded_ce_inputs(world)
    mesh = init_device_mesh("cpu", (world,))
    w_shard = distribute_tensor(w, mesh, [Shard(0)])  # rows 17 / 17 / 16 of 50: uneven, as FSDP2 splits
    t = h_all.shape[0] // world
    results = {}
    for k, transform in enumerate(SHARDED_TRANSFORMS):
        for grad in (True, False):
            h = h_all[rank * t : (rank + 1) * t].clone().requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                loss = fused_head_loss(h, w_shard, y_all[rank * t : (rank + 1) * t], 7, transform)
            weighted = (loss * _token_weights(world)[rank * t : (rank + 1) * t]).sum()
            results[k, grad] = (loss.detach(), torch.autograd.grad(weighted, h)[0] if grad else None)
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _token_weights(world: int) -> torch.Tensor:
    """A different upstream gradient for every token (DPO weights each sequence's tokens by its own factor)."""
    return torch.rand(world * 23, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) - 0.3


def _sharded_ce_inputs(world: int):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(world * 23, 16, dtype=torch.float64, generator=g)
    w = torch.randn(50, 16, dtype=torch.float64, generator=g)
    y = torch.randint(0, 50, (world * 23,), generator=g)
    y[::5] = IGNORE
    return h, w, y


@pytest.mark.slow
def test_vocab_sharded_cross_entropy_equals_one_device(tmp_path):
    """3 gloo ranks, each with its own 23 tokens and 17/17/16 rows of a 50-word head (a DTensor shard, as
    FSDP2 leaves lm_head): each rank's loss and input gradient equal the one-device fused loss over its
    tokens, with ignored labels and a chunk that does not divide the tokens, with and without grad."""
    import torch.multiprocessing as mp

    world = 3
    mp.spawn(_sharded_ce_rank, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    h_all, w, y_all = _sharded_ce_inputs(world)
    t = h_all.shape[0] // world
    for rank, (k, transform) in itertools.product(range(world), enumerate(SHARDED_TRANSFORMS)):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        h = h_all[rank * t : (rank + 1) * t].clone().requires_grad_(True)
        ref = LinearCrossEntropy.apply(h, w, y_all[rank * t : (rank + 1) * t], 7, transform)
        (g_ref,) = torch.autograd.grad((ref * _token_weights(world)[rank * t : (rank + 1) * t]).sum(), h)
        assert torch.allclose(got[k, True][0], ref, rtol=1e-12), (rank, k, got[k, True][0], ref)
        assert torch.allclose(got[k, True][1], g_ref, rtol=1e-10, atol=1e-12), (rank, k)
        assert torch.allclose(got[k, False][0], ref, rtol=1e-12), (rank, k)
