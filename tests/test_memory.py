"""The per-GPU memory planner (pure), `train.micro_batch = "auto"`, and `qlaunch plan`'s breakdown."""

from __future__ import annotations

import json
import re

import pytest

from launcher import memory
from launcher.memory import GiB, ModelShape, choose, estimate, suggestions
from launcher.plan import Cluster, make_plan, resolve_recipe
from launcher.recipe import load_recipe
from tests.conftest import TINY_MODEL, run_cli

# Llama-3.1-8B's config.json (the fields the planner reads).
LLAMA_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
SHAPE = ModelShape.from_config(LLAMA_8B)


@pytest.fixture
def big(recipe_file):
    """The test recipe at Llama-8B training sizes: seq 2048, global batch 16."""
    return load_recipe(recipe_file(), ["data.seq_len=2048", "train.global_batch=16", "lora.rank=16"])


def test_shape_from_config_counts_llama_8b_exactly():
    assert SHAPE.params() == 8_030_261_248  # the published parameter count of Llama-3.1-8B
    tiny = ModelShape.from_config(json.loads((TINY_MODEL / "config.json").read_text()))
    assert (tiny.layers, tiny.hidden, tiny.kv_heads, tiny.head_dim) == (2, 64, 2, 16)


def test_4bit_shard_is_half_a_byte_per_quantized_weight_over_the_world(big):
    linear = sum(a * b for a, b in SHAPE.linears().values()) * SHAPE.layers
    one = estimate(big, SHAPE, 1, 2, True)
    two = estimate(big, SHAPE, 2, 2, True)
    assert one.parts["weights_4bit"] == linear // 2
    assert two.parts["weights_4bit"] == linear // 4
    # Sharded parts halve; replicated constants and per-rank activations do not.
    for key in ("dense_weights", "lora"):
        assert two.parts[key] == pytest.approx(one.parts[key] / 2, rel=1e-6)
    for key in ("quant_constants", "activations", "logits", "gathered"):
        assert two.parts[key] == one.parts[key]
    assert two.parts["cuda_nccl"] > one.parts["cuda_nccl"]  # NCCL only with more than one rank


def test_double_quant_shrinks_the_scales_about_four_times(big):
    dq = estimate(big, SHAPE, 1, 2, True).parts["quant_constants"]
    plain = estimate(
        big.model_copy(update={"quant": big.quant.model_copy(update={"double_quant": False})}), SHAPE, 1, 2, True
    )
    assert 3.5 < plain.parts["quant_constants"] / dq < 4.0


def test_checkpointing_and_micro_batch_drive_activations(big):
    ck2, ck8 = estimate(big, SHAPE, 2, 2, True), estimate(big, SHAPE, 2, 8, True)
    no2 = estimate(big, SHAPE, 2, 2, False)
    assert no2.parts["activations"] > 5 * ck2.parts["activations"]
    assert 3.5 < ck8.parts["activations"] / ck2.parts["activations"] <= 4.0
    # Ballpark of a QLoRA 8B step at micro-batch 2 with checkpointing: fits a 24 GiB card, not 12.
    assert 8 * GiB < ck2.total < 20 * GiB


def test_cpu_offload_moves_shards_and_optimizer_off_the_gpu(big):
    off = big.model_copy(
        update={
            "parallel": big.parallel.model_copy(
                update={"fsdp": big.parallel.fsdp.model_copy(update={"cpu_offload": True})}
            )
        }
    )
    e = estimate(off, SHAPE, 2, 2, True)
    assert e.parts["weights_4bit"] == e.parts["dense_weights"] == e.parts["lora"] == 0
    assert e.parts["gathered"] > 0  # layers are still gathered onto the GPU to compute


def test_choose_picks_the_fastest_setting_that_fits(big):
    auto = big.model_copy(
        update={"train": big.train.model_copy(update={"micro_batch": "auto", "gradient_checkpointing": "auto"})}
    )
    roomy = choose(auto, SHAPE, 2, 80 * GiB)
    assert roomy.fits
    assert (roomy.setup.micro_batch, roomy.setup.checkpointing) != (1, True)
    tight = choose(auto, SHAPE, 2, 16 * GiB)
    assert tight.fits and tight.setup.checkpointing and tight.total <= 0.95 * 16 * GiB
    assert memory.relative_step_time(roomy.setup.micro_batch, roomy.setup.checkpointing) < memory.relative_step_time(
        tight.setup.micro_batch, tight.setup.checkpointing
    )
    hopeless = choose(auto, SHAPE, 1, 4 * GiB)
    assert not hopeless.fits and (hopeless.setup.micro_batch, hopeless.setup.checkpointing) == (1, True)
    # A fixed micro-batch is kept; only the 'auto' checkpointing is chosen.
    fixed = big.model_copy(
        update={"train": big.train.model_copy(update={"micro_batch": 4, "gradient_checkpointing": "auto"})}
    )
    assert choose(fixed, SHAPE, 2, 80 * GiB).setup.micro_batch == 4


def test_suggestions_are_concrete_and_checked(big):
    e = estimate(big, SHAPE, 1, 8, False, gpu_memory=24 * GiB)
    assert not e.fits
    tips = suggestions(big, SHAPE, e)
    assert any(t.startswith("--set train.gradient_checkpointing=true: ") and t.endswith("(fits 24 GiB)") for t in tips)
    assert any(t.startswith("--set train.micro_batch=") for t in tips)
    assert any(t.startswith("--set parallel.fsdp.cpu_offload=true") for t in tips)
    assert any(t.startswith("--gpus 2") for t in tips)
    for t in tips:  # every claim is the planner's own number
        assert re.search(r": \d+\.\d GiB per GPU \((fits|still over) 24 GiB\)$", t), t
    assert suggestions(big, SHAPE, estimate(big, SHAPE, 2, 2, True, gpu_memory=80 * GiB)) == []


def test_make_plan_resolves_auto_with_the_model_shape(big):
    auto = big.model_copy(
        update={"train": big.train.model_copy(update={"micro_batch": "auto", "gradient_checkpointing": "auto"})}
    )
    plain = make_plan(auto, Cluster())  # no model shape: the safe default
    assert (plain.micro_batch, plain.gradient_checkpointing, plain.memory) == (1, True, None)
    planned = make_plan(auto, Cluster(gpu_memory_bytes=24 * GiB), model=SHAPE)
    assert planned.memory["fits"] and planned.memory["layers"] == 32
    assert planned.micro_batch * planned.world_size * planned.grad_accum == auto.train.global_batch
    rec = resolve_recipe(auto, planned)
    assert rec.train.micro_batch == planned.micro_batch
    assert rec.train.gradient_checkpointing is planned.gradient_checkpointing
    assert resolve_recipe(big, make_plan(big, Cluster(), model=SHAPE)) is big  # nothing to resolve


def test_plan_command_prints_breakdown_verdict_and_suggestions(recipe_file):
    r = run_cli("plan", str(recipe_file()), "--gpu-mem-gb", "1", "--set", "train.micro_batch=auto")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for label in memory.LABELS.values():
        assert label in out
    assert "verdict: does not fit" in out
    assert "suggestions:" in out and "--gpus 4" in out
    assert "global batch 4 = micro 1 x 2 ranks x 2 accum" in out  # auto, nothing fits: the smallest
    assert "\x1b" not in out
    # With room, 'auto' takes the largest micro-batch (in-process: same planner, no second CLI start).
    tiny = ModelShape.from_config(json.loads((TINY_MODEL / "config.json").read_text()))
    rec = load_recipe(recipe_file(), ["train.micro_batch=auto"])
    roomy = make_plan(rec, Cluster(gpu_memory_bytes=80 * GiB), model=tiny)
    assert (roomy.micro_batch, roomy.grad_accum, roomy.memory["fits"]) == (2, 1, True)
