"""DPO and ORPO through the real CLI: the first DPO step is ln 2 (the policy is the reference), lr=0 keeps it
there; world 1, 2 and 4, accumulation, two nodes and DeepSpeed ZeRO-2/3 give the same trajectory of the same global batch
of pairs; a preempted run resumes bitwise. And the pieces in process: both forms of the reference are the base
model, and the host-read pair count gives the device-read layout."""

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


KEYS = ["loss", "grad_norm", "logps_chosen", "logps_rejected", "rewards_chosen", "rewards_rejected"]


BETA = 0.1  # train.dpo.beta of the tiny recipe (the default)
# A reward is beta x (log p - log p_ref) of two nearly equal sums: its error is that of the log-probabilities.
SCALE_OF = {"rewards_chosen": "logps_chosen", "rewards_rejected": "logps_rejected"}


def same_trajectory(one: list[dict], other: list[dict], keys=KEYS, rel: float = 1e-5) -> None:
    assert one[1]["loss"] != one[0]["loss"]  # it trains
    for a, b in zip(one, other, strict=True):
        for k in keys:
            scale = BETA * abs(a[SCALE_OF[k]]) if k in SCALE_OF else abs(a[k])
            assert abs(a[k] - b[k]) <= rel * scale, (k, a["step"], a[k], b[k])


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_world_and_accumulation_give_one_trajectory(tmp_path, objective):
    """The same global batch of 16 rows: world 1 x 4 micro-steps, world 2 x 2 and x 4, and (DPO) world 4 x 1."""
    sets = [*FP32, "--set", f'train.objective="{objective}"']
    one = steps(tmp_path, "w1", 1, *sets, "--set", "train.micro_batch=4")
    others = [steps(tmp_path, "w2", 2, *sets, "--set", "train.micro_batch=4"),
              steps(tmp_path, "w2a", 2, *sets, "--set", "train.micro_batch=2")]  # fmt: skip
    if objective == "dpo":
        others.append(steps(tmp_path, "w4", 4, *sets, "--set", "train.micro_batch=4"))
    keys = KEYS[:4] if objective == "dpo" else ["loss", "grad_norm", "logps_chosen", "logps_rejected", "nll_loss"]
    for other in others:
        same_trajectory(one, other, keys)


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory) -> list[dict]:
    return steps(tmp_path_factory.mktemp("fsdp2"), "fsdp", 2, *FP32)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_gives_the_fsdp_trajectory(tmp_path, fsdp2, stage):
    """DPO on a real DeepSpeed engine (ZeRO-2, ZeRO-3 with every parameter partitioned), 2 ranks: the two
    forwards (the reference without gradients, then the policy) before each backward give the FSDP2 run's
    losses, rewards and gradient norms."""
    pytest.importorskip("deepspeed")
    zero = ["--set", 'parallel.backend="deepspeed"', "--set", f"parallel.deepspeed.stage={stage}"]
    if stage == 3:
        zero += ["--set", "parallel.deepspeed.persistence_threshold=0"]
    same_trajectory(fsdp2, steps(tmp_path, f"zero{stage}", 2, *FP32, *zero))


def test_two_nodes_train_dpo_like_one(tmp_path, fsdp2):
    """Two `qlaunch run` processes (nodes) of one rank each, on localhost: the world-2 trajectory."""
    from tests.test_multinode import _cleanup, _port_pair, _report, _run_dir_of, _start, _wait

    port = _port_pair()
    common = [str(RECIPE), "--gpus", "1", "--nnodes", "2", "--set", f'log.runs_dir="{tmp_path / "runs"}"', *FP32]
    logs = [tmp_path / f"node{r}.log" for r in (0, 1)]
    where = [["--node-rank", str(r), "--master-addr", "127.0.0.1", "--master-port", str(port)] for r in (0, 1)]
    procs = [_start(common + w, log) for w, log in zip(where, logs, strict=True)]
    try:
        assert _wait(procs, 300, logs) == [0, 0], _report(logs)
    finally:
        _cleanup(*procs)
    run = _run_dir_of(logs[0])
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["world"] for e in events if e["event"] == "start"] == [2]
    assert sorted(p.name for p in (run / "logs" / "node1").glob("rank*.log")) == ["rank1.log"]
    same_trajectory(fsdp2, [e for e in events if e["event"] == "step"])


def test_preempted_dpo_resumes_exactly(tmp_path):
    """SIGTERM mid-run: the ranks checkpoint and exit 75; resuming continues from that step, and every step
    of the two pieces is bitwise the step of an uninterrupted run (same world, same arithmetic), with the same
    final adapter. A constant schedule, so the first piece's longer max_steps changes nothing."""
    import torch
    from safetensors.torch import load_file

    from tests.conftest import sigterm_after_step

    sets = [*FP32, "--set", 'train.schedule="constant"', "--set", "train.eval_every=0"]
    root = tmp_path / "first"
    rc, out, err, _ = sigterm_after_step(
        ["run", str(RECIPE), "--set", f'log.runs_dir="{root}"', *sets, "--set", "train.max_steps=400"], root
    )
    assert rc == 75, out + err
    (first_run,) = [p.parent for p in root.glob("*/*/preempted.json")]
    stopped = json.loads((first_run / "preempted.json").read_text())["step"]
    end = stopped + 2
    r = run_cli("run", str(RECIPE), "--set", f'log.runs_dir="{tmp_path / "second"}"', *sets,
                "--set", f"train.max_steps={end}", "--resume", str(first_run))  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    (second,) = (tmp_path / "second").glob("*/*/metrics.jsonl")
    events = [json.loads(x) for x in second.read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "resumed"] == [stopped]
    first = [json.loads(x) for x in (first_run / "metrics.jsonl").read_text().splitlines()]
    pieces = {e["step"]: e for e in first + events if e["event"] == "step" and e["step"] <= end}
    whole = steps(tmp_path, "whole", 2, *sets, "--set", f"train.max_steps={end}")
    assert sorted(pieces) == [e["step"] for e in whole] == list(range(1, end + 1))
    for e in whole:
        assert all(pieces[e["step"]][k] == e[k] for k in KEYS), (e["step"], pieces[e["step"]], e)
    a = load_file(str(second.parent / "adapter" / "adapter_model.safetensors"))
    (whole_run,) = (tmp_path / "whole").glob("*/*/adapter/adapter_model.safetensors")
    b = load_file(str(whole_run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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


@pytest.mark.parametrize("trained", [False, True])
def test_the_same_graph_reference_is_the_bypassed_reference(trained):
    """With compiled layers the DPO reference runs the policy's own graph with every LoRA scale at 0
    (objective.adapters_scaled_to_zero) instead of bypassing the adapters under no_grad. Both must be the
    base model: equal loss, rewards and LoRA gradients (fp32, CPU), ln 2 at the initial adapter, also
    after the adapter has moved (random B), with the scales restored and no graph left from the reference."""
    import torch
    from peft.tuners.lora import LoraLayer

    from launcher.data.sampler import StepCounts
    from launcher.plan.recipe_file import load_recipe
    from launcher.rank.build import build_model
    from launcher.rank.objective import Preference

    recipe = load_recipe(RECIPE, ['parallel.backend="none"', 'model.dtype="float32"',
                                  'quant.compute_dtype="float32"', 'quant.storage_dtype="float32"'])  # fmt: skip
    built = build_model(recipe, torch.device("cpu"), None)
    if trained:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in built.peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)

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


def test_the_host_read_pair_count_is_the_layouts():
    """The batch builder reads the highest segment number on the host (pack.with_pair_top) so the pair
    layout needs no device read: the layout built from it is the one built from the position ids, also for a
    row holding fewer pairs than its neighbour and with evaluation's filler-row weights."""
    import torch

    from launcher.data.pack import with_pair_top
    from launcher.rank.objective import PairLayout

    batch, _ = _pairs_batch(64, rows=3)
    batch["position_ids"][2, 20:] = torch.arange(1, batch["position_ids"].shape[1] - 19)  # row 2: one pair
    top = with_pair_top(dict(batch))["pair_top"]
    assert isinstance(top, int) and top == 4
    for weight in (None, torch.tensor([1.0, 1.0, 0.0])):
        a = PairLayout.of(batch["position_ids"], weight)
        b = PairLayout.of(batch["position_ids"], weight, top)
        assert a.slots == b.slots == 5 and torch.equal(a.index, b.index) and torch.equal(a.present, b.present)
    assert PairLayout.of(batch["position_ids"]).present[2].tolist() == [1.0, 0.0]
