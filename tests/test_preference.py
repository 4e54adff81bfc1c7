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
