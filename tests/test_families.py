"""Every model family qlaunch trains, on tiny checkpoints transformers builds (tests/families.py):

- the first loss equals transformers' own loss of the same model and batch (fp32): the loss path applies
  each family's embedding scale, norms, soft-capping and logit scaling as the model does;
- FSDP2 at world 2 takes the same optimizer steps as world 1 (dense and NF4, fp32: the trajectories agree to
  summation order), and tied families keep one parameter for embedding and head;
- lr=0 keeps the loss and an eval between steps constant;
- DeepSpeed ZeRO-3 and the real CLI on representatives (tied + soft-capped Gemma 3, fused Phi-3);
- architectures qlaunch cannot train are refused in one line before anything is spawned.

The FSDP2 runs are one torch-elastic process group per world size for all families
(tests/family_worker.py), not a CLI run per family and phase."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BASE_RECIPE, ROOT, free_port, run_cli
from tests.families import FAMILIES, make_checkpoint, model_keys

pytestmark = pytest.mark.slow

TIED = {"llama32_tied", "qwen2_tied", "qwen3_tied", "gemma2", "gemma3_text"}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("families")
    for family in FAMILIES:
        make_checkpoint(family, root / family)
    return root


def _worker(checkpoints: Path, out: Path, world: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
           "--master-port", str(free_port()), str(ROOT / "tests" / "family_worker.py"), str(checkpoints), str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(checkpoints, tmp_path_factory) -> dict[int, dict]:
    tmp = tmp_path_factory.mktemp("family_runs")
    return {world: _worker(checkpoints, tmp / f"world{world}.json", world) for world in (1, 2)}


def rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_first_loss_is_transformers_own(runs, checkpoints, family):
    """Step 1 of the dense run (LoRA B = 0, so the base model) against `model(ids, labels=...)` of
    transformers in fp32 on the same global batch. Gemma's soft-cap or Granite's logit scaling left out
    would change the loss by several units."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.family_worker import global_batch

    attn = model_keys(family).get("attn_implementation", "sdpa")
    model = AutoModelForCausalLM.from_pretrained(checkpoints / family, dtype=torch.float32, attn_implementation=attn)
    batch = global_batch(0, model.config.vocab_size)
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()
    for world in (1, 2):
        got = runs[world][f"{family}/dense"]["loss"][0]
        assert abs(got - want) / want < 1e-5, (family, world, got, want)


@pytest.mark.parametrize("phase", ["dense", "nf4"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_world2_takes_the_steps_of_world1(runs, family, phase):
    one, two = runs[1][f"{family}/{phase}"], runs[2][f"{family}/{phase}"]
    assert len(set(one["loss"])) == 3  # it trains: every step's loss differs
    for key in ("loss", "grad_norm"):
        assert rel(two[key], one[key]) < 1e-5, (family, phase, key, one[key], two[key])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tied_families_hold_one_weight(runs, checkpoints, family):
    """A tied family has one parameter less than its untied checkpoint would (embedding = head), at every
    world size; untied ones keep both."""
    config = json.loads((checkpoints / family / "config.json").read_text())
    assert bool(config.get("tie_word_embeddings")) == (family in TIED)
    for world in (1, 2):
        assert runs[world][f"{family}/nf4"]["tied"] == (family in TIED), (family, world)
        assert runs[world][f"{family}/nf4"]["layers"] == 2, (family, world)  # the layers, found after sharding
    assert runs[1][f"{family}/nf4"]["base_params"] == runs[2][f"{family}/nf4"]["base_params"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_world2_splits_the_head_by_vocabulary(runs, family):
    """At world 2 every family's frozen head, tied or not, reaches the loss as this rank's half of the
    vocabulary rows (the vocabulary-split loss; a tied head reads the embedding's own shard), never gathered
    whole (a head left in the FSDP root would arrive whole)."""
    for phase in ("dense", "nf4"):
        one, two = runs[1][f"{family}/{phase}"], runs[2][f"{family}/{phase}"]
        assert one["head_rows"] == [one["vocab"]], (family, phase, one["head_rows"])
        assert two["head_rows"] == [-(-two["vocab"] // 2)], (family, phase, two["head_rows"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lr0_keeps_loss_and_eval_constant(runs, family):
    """lr=0: steps 1 and 3 see the same batch and give the same loss; the eval after every step too."""
    for world in (1, 2):
        r = runs[world][f"{family}/nf4_lr0"]
        assert r["loss"][0] == r["loss"][2], (family, world, r["loss"])
        assert len(set(r["eval"])) == 1, (family, world, r["eval"])
        assert abs(r["eval"][0] - r["loss"][0]) / r["loss"][0] < 1e-6, (family, world)


FP32 = ['model.dtype="float32"', 'quant.compute_dtype="float32"', 'quant.storage_dtype="float32"']


def _cli_run(tmp_path: Path, model: Path, tag: str, gpus: int, *sets: str) -> tuple[Path, dict[str, list[float]]]:
    """A real `qlaunch run` of 3 steps; its run directory and the step losses and gradient norms."""
    root = tmp_path / tag
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(BASE_RECIPE.replace("max_steps = 2", "max_steps = 3"))
    args = [f'model.path="{model}"', f'log.runs_dir="{root}"', "train.warmup_steps=0", *FP32, *sets]
    r = run_cli("run", str(recipe), "--gpus", str(gpus), *[x for s in args for x in ("--set", s)])
    assert r.returncode == 0, r.stdout + r.stderr
    (metrics,) = root.glob("*/*/metrics.jsonl")
    recs = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert any(rec["event"] == "adapter" for rec in recs)
    steps = [rec for rec in recs if rec["event"] == "step"]
    return metrics.parent, {k: [rec[k] for rec in steps] for k in ("loss", "grad_norm")}


# Gemma 3 with LoRA on its tied head too: the adapted head shares its base weight with the embedding.
CLI_FAMILIES = {
    "gemma3_text": ['lora.target_modules=["q_proj", "v_proj", "down_proj", "lm_head"]'],
    "phi3": ['lora.target_modules="all-linear"'],
}
ZERO3 = ['parallel.backend="deepspeed"', "parallel.deepspeed.stage=3", "parallel.deepspeed.persistence_threshold=0"]


@pytest.fixture(scope="module")
def cli_runs(checkpoints, tmp_path_factory) -> dict[str, dict]:
    """Per representative family: the unsharded single-process run and DeepSpeed ZeRO-3 over 2 ranks."""
    out = {}
    for family, sets in CLI_FAMILIES.items():
        tmp = tmp_path_factory.mktemp(family)
        ref = ['parallel.backend="none"', "train.micro_batch=4"]
        out[family] = {
            "ref": _cli_run(tmp, checkpoints / family, "ref", 1, *sets, *ref),
            "zero3": _cli_run(tmp, checkpoints / family, "zero3", 2, *sets, *ZERO3),
        }
    return out


@pytest.mark.parametrize("family", list(CLI_FAMILIES))
def test_zero3_on_two_ranks_equals_one_device(cli_runs, family):
    """The real CLI: DeepSpeed ZeRO-3 over 2 ranks against the unsharded single-process run. Gemma 3 is tied
    (the partitioned embedding serves the LoRA-adapted head) and soft-caps its logits; Phi-3 has fused
    projections, all adapted."""
    (_, ref), (_, got) = cli_runs[family]["ref"], cli_runs[family]["zero3"]
    for key in ("loss", "grad_norm"):
        assert rel(got[key], ref[key]) < 1e-5, (family, key, got[key], ref[key])


@pytest.mark.parametrize("family", list(CLI_FAMILIES))
def test_merged_family_model_gives_the_trained_logits(cli_runs, tmp_path, family):
    """`qlaunch merge` of the ZeRO-3 run in float32, loaded by transformers, against qlaunch's own model with
    the adapter. The merged Gemma 3 head (LoRA on a tied head) is a weight of its own: the saved config says
    untied and the file holds both tensors."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from tests.test_export import _inputs, _reference_logits
    from tests.test_export import rel as rel_norm

    run, _ = cli_runs[family]["zero3"]
    out = tmp_path / "merged"
    r = run_cli("merge", str(run), "-o", str(out), "--dtype", "float32", "--onto", "dequantized")
    assert r.returncode == 0, r.stdout + r.stderr
    config = json.loads((out / "config.json").read_text())
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    if family == "gemma3_text":
        assert config["tie_word_embeddings"] is False
        assert {"lm_head.weight", "model.embed_tokens.weight"} <= names
    else:
        assert "model.layers.0.self_attn.qkv_proj.weight" in names
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(input_ids=_inputs()).logits.float()
    ref = _reference_logits(run, "float32")
    assert rel_norm(got, ref) < 1e-5, (family, rel_norm(got, ref))


def test_tied_family_fsdp2_cli_resumes_exactly(checkpoints, tmp_path):
    """The real CLI, FSDP2 over 2 ranks, on a tied family (the head reading the embedding's shard): a run
    resumed from its step-2 checkpoint takes steps 3-4 bitwise as the uninterrupted run did."""
    from tests.test_checkpoint import adapter, only_run, step_losses

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(BASE_RECIPE.replace("max_steps = 2", "max_steps = 4"))
    common = [f'model.path="{checkpoints / "qwen2_tied"}"', "train.warmup_steps=0", *FP32]
    sets = [x for s in common for x in ("--set", s)]
    r = run_cli("run", str(recipe), "--gpus", "2", *sets, "--set", f'log.runs_dir="{tmp_path / "full"}"',
                "--set", "checkpoint.every_steps=2")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    full = only_run(tmp_path / "full")
    ckpt = full / "checkpoints" / "step_00000002"
    r = run_cli("run", str(recipe), "--gpus", "2", *sets, "--set", f'log.runs_dir="{tmp_path / "resumed"}"',
                "--resume", str(ckpt))  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    resumed = only_run(tmp_path / "resumed")
    want, got = step_losses(full), step_losses(resumed)
    assert sorted(got) == [3, 4] and all(got[s] == want[s] for s in got), (want, got)
    a, b = adapter(full), adapter(resumed)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
