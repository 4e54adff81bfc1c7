"""DoRA (lora.use_dora): qlaunch's magnitudes and forward against peft's own DoRA, and sharded training
equal to one device, through the real CLI.

The reference is peft's DoRA as users run it: transformers loads the checkpoint (dense, bitsandbytes NF4
or LLM.int8), `get_peft_model(use_dora=True)` computes the magnitudes from the loaded weights, and peft's
own dequantization gives the forward's weight norms.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tests.conftest import BASE_RECIPE, TINY_MODEL, run_cli

FP32 = ['model.dtype="float32"', 'quant.compute_dtype="float32"', 'quant.storage_dtype="float32"']


def _qlaunch_model(tmp_path: Path, bits: str):
    from launcher.plan.recipe_file import load_recipe
    from launcher.rank.build import build_model

    path = tmp_path / "r.toml"
    path.write_text(BASE_RECIPE)
    sets = [*FP32, "lora.use_dora=true", f"quant.bits={bits}", 'parallel.backend="none"']
    return build_model(load_recipe(path, sets), torch.device("cpu"))


def _peft_model(bits: str, targets: list[str]):
    """transformers' loading + peft's DoRA init, with peft's own dequantization (not qlaunch's)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import dora
    from peft.utils import integrations
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = None
    if bits == "4":
        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_quant_storage=torch.float32,
        )
    elif bits == "8":
        q = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    base = AutoModelForCausalLM.from_pretrained(str(TINY_MODEL), quantization_config=q, dtype=torch.float32)
    for m in base.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False  # bitsandbytes' repacking CPU path (see test_export)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=targets, use_dora=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dora, "dequantize_module_weight", integrations.dequantize_module_weight)
        return get_peft_model(base, cfg)


def _lora(model: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Parameter]:
    return {n.removeprefix(prefix): p for n, p in model.named_parameters() if "lora_" in n}


def _ids() -> torch.Tensor:
    return torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bits", ["4", "8", '"none"'])
def test_magnitude_init_and_forward_equal_peft(tmp_path, bits):
    """m0 = ||W||_row of the weight the forward sees, equal to peft's init (4-bit: NF4 bytes and double-
    quantized scales as transformers makes them); with B and m moved off their init, the logits equal
    peft's DoRA forward on the same base."""
    from peft.tuners.lora import dora
    from peft.utils import integrations

    ours = _qlaunch_model(tmp_path, bits)
    ours_lora = _lora(ours.loss_model, "lm.")
    targets = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in ours_lora})
    ref = _peft_model(bits.strip('"'), targets)
    ref_lora = _lora(ref, "base_model.model.")
    assert set(ours_lora) == set(ref_lora) and any("lora_magnitude_vector" in n for n in ours_lora)
    for name, p in ours_lora.items():
        if "lora_magnitude_vector" in name:
            # 8-bit: transformers and qlaunch quantize the same int8 rows; tolerance only for fp32 summation.
            torch.testing.assert_close(p.detach(), ref_lora[name].detach().float(), rtol=1e-6, atol=0, msg=name)
            assert float(p.min()) > 0, name
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ours_lora.items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
            ref_lora[name].copy_(p.to(ref_lora[name].dtype))
    ours.causal_lm.eval()
    ref.eval()
    with torch.no_grad():
        got = ours.causal_lm(input_ids=_ids()).logits
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(dora, "dequantize_module_weight", integrations.dequantize_module_weight)
            want = ref(input_ids=_ids()).logits
    rel = float((got - want).norm() / want.norm())
    assert rel < 1e-5, rel


def _split_norms(built, recipe, source, prequant: str | None, world: int) -> None:
    """Every DoRA layer: magnitude_rows over each rank's FSDP2 rows, concatenated, == the row norms of the
    whole weight as the forward dequantizes it."""
    from launcher.rank.model.dora import forward_weight, magnitude_bases, magnitude_rows
    from launcher.rank.model.shard import shard_rows

    names = {m: n for n, m in built.causal_lm.named_modules()}
    bases = magnitude_bases(built.loss_model)
    assert bases
    for base in bases.values():
        hf_name = names[base].replace(".base_layer", "") + ".weight"
        parts = [
            magnitude_rows(base, hf_name, *shard_rows(base.out_features, r, world), source, recipe, "cpu", prequant)
            for r in range(world)
        ]
        want = torch.linalg.norm(forward_weight(base).detach().float(), dim=1)
        assert torch.equal(torch.cat(parts), want), hf_name


@pytest.mark.parametrize("case", ["4bit", "4bit-prequant", "8bit", "dense"])
def test_each_ranks_magnitude_rows_equal_the_whole_weights_norms(tmp_path, case):
    """A rank's magnitude rows need weight elements outside its packed 4-bit shard; they are read (or
    re-quantized) on block boundaries from the source."""
    from launcher.launch.quantize import quantize_checkpoint
    from launcher.plan.recipe_file import load_recipe
    from launcher.rank.build import build_model
    from launcher.rank.model.sources import SafetensorsSource

    model = TINY_MODEL
    sets = [*FP32, "lora.use_dora=true", 'parallel.backend="none"']
    if case == "4bit-prequant":
        model = quantize_checkpoint(str(TINY_MODEL), str(tmp_path / "nf4"), "nf4", 64, ["lm_head"])
    else:
        sets += {"4bit": ['quant.type="fp4"'], "8bit": ["quant.bits=8"], "dense": ['quant.bits="none"']}[case]
    path = tmp_path / "r.toml"
    path.write_text(BASE_RECIPE)
    recipe = load_recipe(path, [*sets, f'model.path="{model}"'])
    built = build_model(recipe, torch.device("cpu"))
    source, prequant = SafetensorsSource(built.model_dir), ("qlaunch" if case == "4bit-prequant" else None)
    for world in (2, 3):
        _split_norms(built, recipe, source, prequant, world)


# --- through the CLI: sharded training equals one device, and the adapter round trip -------------------

FP32_SETS = [x for s in FP32 for x in ("--set", s)]
DORA = ["--set", "lora.use_dora=true"]
# persistence_threshold = 0: every parameter is partitioned and re-gathered (tests/test_deepspeed.py).
ZERO3 = ["--set", 'parallel.backend="deepspeed"', "--set", "parallel.deepspeed.stage=3"]
ZERO3 += ["--set", "parallel.deepspeed.persistence_threshold=0"]


def _adapter(run_root: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next(run_root.glob("t/*/adapter")) / "adapter_model.safetensors"))


def _m0(tmp_path: Path, bits: str) -> dict[str, torch.Tensor]:
    """The initial magnitudes of a one-device build, under the adapter file's names."""
    from launcher.rank.export import lora_state_dict

    built = _qlaunch_model(tmp_path, bits)
    return {k: v for k, v in lora_state_dict(built.peft_model).items() if "lora_magnitude_vector" in k}


@pytest.fixture(scope="module")
def nf4_runs(tmp_path_factory) -> dict:
    """4-bit DoRA, fp32: one unsharded device (reference), FSDP2 and ZeRO-3 at world 2, 3 steps at lr 2e-3;
    and an lr=0 run (FSDP2, world 2) with an eval after every step."""
    from tests.test_parity import _two_doc_data, losses, train

    tmp = tmp_path_factory.mktemp("dora4")
    recipe = tmp / "r.toml"
    recipe.write_text(BASE_RECIPE.replace("max_steps = 2", "max_steps = 3"))
    common = [*FP32_SETS, *DORA, "--set", "train.warmup_steps=0", "--set", "train.lr=2e-3"]
    k = "loss,grad_norm"
    out = {
        "ref": train(tmp, recipe, "ref", 1, *common, "--set", 'parallel.backend="none"', "--set", "train.micro_batch=4", key=k),
        "fsdp2": train(tmp, recipe, "fsdp2", 2, *common, key=k),
    }  # fmt: skip
    if importlib.util.find_spec("deepspeed") is not None:  # ZeRO-3 gathers each layer whole, as FSDP2 does
        out["zero3"] = train(tmp, recipe, "zero3", 2, *common, *ZERO3, key=k)
    data = _two_doc_data(tmp)
    lr0 = tmp / "lr0"
    r = run_cli(
        "run", str(recipe), "--gpus", "2", "--set", f'log.runs_dir="{lr0}"', *FP32_SETS, *DORA, "--set", "train.lr=0.0",
        "--set", f'data.datasets=[{{path="{data}"}}]', "--set", 'data.format="text"', "--set", f'data.val_path="{data}"',
        "--set", "train.micro_batch=1", "--set", "train.global_batch=2", "--set", "train.eval_every=1",
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    out["lr0"] = {"steps": losses(lr0), "evals": losses(lr0, "eval_loss", "eval"), "adapter": _adapter(lr0)}
    out["trained"] = _adapter(tmp / "fsdp2")
    out["run"] = next((tmp / "fsdp2").glob("t/*/adapter")).parent
    out["m0"] = _m0(tmp, "4")
    return out


@pytest.mark.slow
def test_nf4_dora_world2_equals_one_device_and_lr0_keeps_m0(nf4_runs):
    """FSDP2 (and ZeRO-3) at world 2 train the function one unsharded device trains (fp32: summation order), and at
    lr=0 the loss and eval loss never move and the exported magnitudes are exactly m0 = ||W||_row."""
    from tests.test_parity import rel

    ref = nf4_runs["ref"]
    assert len(ref["loss"]) == 3 and min(ref["grad_norm"]) > 0
    for name in ("fsdp2", "zero3"):
        got = nf4_runs.get(name)
        for key in ("loss", "grad_norm") if got else ():
            assert rel(got[key], ref[key]) <= 1e-6, (name, key, got[key], ref[key])
    lr0 = nf4_runs["lr0"]
    assert len(lr0["steps"]) == 3 and len(set(lr0["steps"])) == 1, lr0["steps"]
    assert len(lr0["evals"]) == 3 and len(set(lr0["evals"])) == 1, lr0["evals"]
    m0 = nf4_runs["m0"]
    assert m0 and all(torch.equal(lr0["adapter"][k], v) for k, v in m0.items())
    # Training moved the magnitudes (they are trained and exported, not a copy of m0).
    assert all(not torch.equal(nf4_runs["trained"][k], v) for k, v in m0.items())


def _rebuilt_logits(run: Path) -> torch.Tensor:
    """The trained model: qlaunch's own model of the run, rebuilt on one device in fp32, with the saved adapter."""
    from launcher.launch.merge import load_adapter_into
    from launcher.rank.build import build_model
    from launcher.rundir import RunDir

    recipe = RunDir(run).load_recipe()
    recipe = recipe.model_copy(update={"parallel": recipe.parallel.model_copy(update={"backend": "none"})})
    built = build_model(recipe, torch.device("cpu"), None)
    load_adapter_into(built.peft_model, run / "adapter")
    built.causal_lm.eval()
    with torch.no_grad():
        return built.causal_lm(input_ids=_ids()).logits.float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _merged_logits(run: Path, out: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    # Against the trained model: the weights it trained on (a dense base is its own original either way).
    r = run_cli("merge", str(run), "-o", str(out), "--dtype", "float32", "--onto", "dequantized")
    assert r.returncode == 0, r.stdout + r.stderr
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=_ids()).logits.float()


@pytest.mark.slow  # the fixture's runs
def test_nf4_dora_merge_gives_the_trained_logits(nf4_runs, tmp_path):
    """The merged dense model, W' = m / ||W + s·B·A||_row · (W + s·B·A) from the dequantized NF4 weight,
    computes the trained 4-bit DoRA model (fp32)."""
    run = nf4_runs["run"]
    ref = _rebuilt_logits(run)
    assert _rel(_merged_logits(run, tmp_path / "merged"), ref) < 1e-5


@pytest.mark.slow
def test_dense_dora_fsdp2_adapter_loads_in_peft_and_merges(tmp_path):
    """Dense base, FSDP2 at world 2, fp32, trained far from the init: PeftModel.from_pretrained(base,
    adapter) and the merged model both give the trained model's logits."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = tmp_path / "r.toml"
    recipe.write_text(BASE_RECIPE.replace("lr = 1e-3", "lr = 3e-2").replace("max_steps = 2", "max_steps = 4"))
    root = tmp_path / "runs"
    r = run_cli("run", str(recipe), "--set", f'log.runs_dir="{root}"', *FP32_SETS, *DORA, "--set", 'quant.bits="none"')
    assert r.returncode == 0, r.stdout + r.stderr
    run = next(root.glob("t/*/adapter")).parent
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    ref = _rebuilt_logits(run)
    base = AutoModelForCausalLM.from_pretrained(str(TINY_MODEL), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    with torch.no_grad():
        got = model(input_ids=_ids()).logits.float()
        plain = model.get_base_model()
        with model.disable_adapter():
            untrained = plain(input_ids=_ids()).logits.float()
    assert _rel(got, ref) < 1e-5, _rel(got, ref)
    assert _rel(untrained, ref) > 1e-2  # the adapter matters: the comparison above can fail
    assert _rel(_merged_logits(run, tmp_path / "merged"), ref) < 1e-5


@pytest.mark.slow
def test_int8_dora_adapter_loads_in_peft(tmp_path):
    """LLM.int8 base under DeepSpeed ZeRO-2 at world 2 (the recipe shards no int8 weights), fp32: the
    exported DoRA adapter on transformers' own 8-bit model gives the trained model's logits."""
    pytest.importorskip("deepspeed")
    from peft import PeftModel
    from peft.tuners.lora import dora
    from peft.utils import integrations
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    recipe = tmp_path / "r.toml"
    recipe.write_text(BASE_RECIPE.replace("lr = 1e-3", "lr = 3e-2"))
    root = tmp_path / "runs"
    sets = [*FP32_SETS, *DORA, "--set", "quant.bits=8", "--set", 'parallel.backend="deepspeed"']
    sets += ["--set", "parallel.deepspeed.stage=2"]
    r = run_cli("run", str(recipe), "--set", f'log.runs_dir="{root}"', *sets)
    assert r.returncode == 0, r.stdout + r.stderr
    run = next(root.glob("t/*/adapter")).parent
    ref = _rebuilt_logits(run)
    q = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    base = AutoModelForCausalLM.from_pretrained(str(TINY_MODEL), quantization_config=q, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(dora, "dequantize_module_weight", integrations.dequantize_module_weight)  # peft's own
        got = model(input_ids=_ids()).logits.float()
    assert _rel(got, ref) < 1e-5, _rel(got, ref)
