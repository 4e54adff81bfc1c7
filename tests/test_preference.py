"""DPO and ORPO through the real CLI: the first DPO step is ln 2 (the policy is the reference), lr=0 keeps it
there, and world 1, world 2 and accumulation give the same trajectory of the same global batch of pairs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "tiny-dpo-cpu.toml"
FP32 = ["--set", 'model.dtype="float32"', "--set", 'quant.compute_dtype="float32"',
        "--set", 'quant.storage_dtype="float32"', "--set", "train.warmup_steps=0"]  # fmt: skip


def steps(tmp_path: Path, tag: str, gpus: int, *sets: str) -> list[dict]:
    root = tmp_path / tag
    r = run_cli("run", str(RECIPE), "--gpus", str(gpus), "--set", f'log.runs_dir="{root}"', *sets)
    assert r.returncode == 0, r.stdout + r.stderr
    (metrics,) = root.glob("*/*/metrics.jsonl")
    return [e for e in map(json.loads, metrics.read_text().splitlines()) if e["event"] == "step"]


def test_dpo_starts_at_ln2_and_lr0_keeps_the_policy_the_reference(tmp_path):
    got = steps(tmp_path, "lr0", 1, *FP32, "--set", "train.lr=0.0")
    assert len(got) == 3
    for e in got:
        assert abs(e["loss"] - math.log(2)) < 1e-6, e
        assert e["rewards_chosen"] == e["rewards_rejected"] == e["reward_margin"] == 0.0, e
        assert e["reward_accuracy"] == 0.0 and e["logps_chosen"] < 0 and e["logps_rejected"] < 0, e


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_world_and_accumulation_give_one_trajectory(tmp_path, objective):
    sets = [*FP32, "--set", f'train.objective="{objective}"']
    one = steps(tmp_path, "w1", 1, *sets, "--set", "train.micro_batch=4")
    two = steps(tmp_path, "w2", 2, *sets, "--set", "train.micro_batch=4")
    acc = steps(tmp_path, "w2a", 2, *sets, "--set", "train.micro_batch=2")
    keys = ["loss", "grad_norm", "logps_chosen", "logps_rejected"]
    assert one[1]["loss"] != one[0]["loss"]  # it trains
    for other in (two, acc):
        for a, b in zip(one, other, strict=True):
            for k in keys:
                assert abs(a[k] - b[k]) <= 1e-5 * abs(a[k]), (k, a[k], b[k])


def _pairs_batch(vocab: int, rows: int = 2, seed: int = 0) -> tuple[dict, int]:
    """Rows of two pairs each (prompt + chosen, prompt + rejected, positions restarting at each), prompt
    tokens unlabelled, as launcher/data packs them; and the number of pairs."""
    import torch

    from launcher.data.pack import IGNORE

    g = torch.Generator().manual_seed(seed)
    ids, labels, pos = [], [], []
    for _ in range(rows):
        i, lab, p = [], [], []
        for _ in range(2):
            prompt = torch.randint(0, vocab, (5,), generator=g).tolist()
            for n in (4, 6):  # chosen, rejected
                seq = prompt + torch.randint(0, vocab, (n,), generator=g).tolist()
                i += seq
                lab += [IGNORE] * len(prompt) + seq[len(prompt) :]
                p += list(range(len(seq)))
        ids.append(i), labels.append(lab), pos.append(p)
    t = {k: torch.tensor(v) for k, v in (("input_ids", ids), ("labels", labels), ("position_ids", pos))}
    return t, rows * 2


@pytest.mark.parametrize("tensor_scales", [False, True])
@pytest.mark.parametrize("trained", [False, True])
def test_the_same_graph_reference_is_the_bypassed_reference(trained, tensor_scales):
    """With compiled layers the DPO reference runs the policy's own graph with every LoRA scale at 0
    (objective.adapters_scaled_to_zero) instead of bypassing the adapters under no_grad. Both must be the
    base model: equal loss, rewards and LoRA gradients (fp32, CPU), ln 2 at the initial adapter, also
    after the adapter has moved (random B), with the scales restored and no graph left from the reference."""
    import torch
    from peft.tuners.lora import LoraLayer

    from launcher.data.sampler import StepCounts
    from launcher.plan.recipe_file import load_recipe
    from launcher.rank.build import build_model
    from launcher.rank.objective import Preference, scales_as_tensors

    recipe = load_recipe(RECIPE, ['parallel.backend="none"', 'model.dtype="float32"',
                                  'quant.compute_dtype="float32"', 'quant.storage_dtype="float32"'])  # fmt: skip
    built = build_model(recipe, torch.device("cpu"), None)
    if trained:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in built.peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    if tensor_scales:  # as make_objective leaves them for compiled layers
        scales_as_tensors(built.peft_model)

    def scales() -> list[dict]:
        return [{k: float(v) for k, v in m.scaling.items()} for m in built.peft_model.modules()
                if isinstance(m, LoraLayer)]  # fmt: skip

    before = scales()
    assert before and all(v == 2.0 for d in before for v in d.values())
    batch, pairs = _pairs_batch(built.causal_lm.config.vocab_size)
    counts = StepCounts(tokens=int((batch["labels"] != -100).sum()), pairs=pairs)
    got = {}
    for same in (False, True):
        objective = Preference(recipe, built.peft_model, same_graph_reference=same)
        built.loss_model.zero_grad(set_to_none=True)
        share, sums = objective.micro(built.loss_model, batch, counts)
        share.backward()
        grads = {n: p.grad.clone() for n, p in built.loss_model.named_parameters() if p.grad is not None}
        got[same] = (share.detach(), sums, grads)
    assert scales() == before
    (s0, r0, g0), (s1, r1, g1) = got[False], got[True]
    assert g0.keys() == g1.keys() and len(g0) > 0
    assert torch.allclose(s0, s1, rtol=1e-6, atol=0) and torch.allclose(r0, r1, rtol=1e-5, atol=1e-7), (r0, r1)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-5, atol=1e-9), n
    if trained:
        assert abs(float(s1) - math.log(2)) > 1e-3 and float(r1[3]) != 0.0  # the adapter moved the policy
    else:
        assert abs(float(s1) - math.log(2)) < 1e-6 and float(r1[3]) == 0.0  # margin sum: policy = reference
