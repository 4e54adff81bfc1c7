"""Adapter round trip: the exported PEFT adapter and the merged model give the trained model's logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import BASE_RECIPE, TINY_MODEL, run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 2-rank FSDP2 run with a large lr so the adapter is far from its zero start."""
    tmp = tmp_path_factory.mktemp("exp")
    recipe = tmp / "r.toml"
    recipe.write_text(BASE_RECIPE.replace("lr = 1e-3", "lr = 3e-2").replace("max_steps = 2", "max_steps = 4"))
    r = run_cli("run", str(recipe), "--set", f'log.runs_dir="{tmp}"')
    assert r.returncode == 0, r.stdout + r.stderr
    run = next(tmp.glob("t/*/adapter")).parent
    (run.parent / "terminal.json").write_text(json.dumps({"stdout": r.stdout, "stderr": r.stderr}))
    return run


# What `qlaunch run` itself prints on the launching terminal (plain lines: tests capture it, no TTY).
RUN_LINE_STARTS = (
    "[data] ",
    "run directory: ",
    "loading model",
    "model loaded in ",
    "tokenizing data",
    "training ",
    "step ",
    "eval  step ",
    "adapter saved: ",
    "done: ",
)


def test_run_prints_only_its_own_lines(trained):
    """The libraries' notices (bitsandbytes' kernels line, transformers' FutureWarnings, DeepSpeed's
    accelerator line, progress bars) stay in the ranks' logs; the terminal gets qlaunch's lines only."""
    terminal = json.loads((trained.parent / "terminal.json").read_text())
    assert terminal["stderr"] == "", terminal["stderr"]
    lines = terminal["stdout"].splitlines()
    assert any(x.startswith("step 4/4 ") for x in lines), lines
    assert [x for x in lines if not x.startswith(RUN_LINE_STARTS)] == []


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 512, (2, 48), generator=g)


def _reference_logits(run: Path, compute: str = "bfloat16") -> torch.Tensor:
    """The trained model: qlaunch's own 4-bit model, rebuilt in one process, with the saved LoRA weights
    (same NF4 bytes and scales whatever the compute dtype; float32 makes the comparison exact to fp32)."""
    from launcher.launch.merge import load_adapter_into
    from launcher.rank.build import build_model
    from launcher.rundir import RunDir

    recipe = RunDir(run).load_recipe()
    recipe = recipe.model_copy(
        update={
            "parallel": recipe.parallel.model_copy(update={"backend": "none"}),
            "quant": recipe.quant.model_copy(update={"compute_dtype": compute}),
            "model": recipe.model.model_copy(update={"dtype": compute}),
        }
    )
    built = build_model(recipe, torch.device("cpu"), None)
    load_adapter_into(built.peft_model, run / "adapter")
    built.causal_lm.eval()
    with torch.no_grad():
        return built.causal_lm(input_ids=_inputs()).logits.float()


@pytest.mark.slow  # the `trained` fixture is a 2-rank run
def test_adapter_is_nonzero_and_peft_format(trained):
    import json

    from safetensors.torch import load_file

    cfg = json.loads((trained / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert cfg["inference_mode"] is True  # as PEFT saves a trained adapter
    sd = load_file(str(trained / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in sd.items())
    assert all(k.startswith("base_model.model.model.layers.") for k in sd)


@pytest.mark.slow  # the `trained` fixture is a 2-rank run
def test_adapter_directory_is_complete(trained):
    """Beside the weights: the run's tokenizer (AutoTokenizer loads the directory and encodes as the base's
    does) and a model card with Hugging Face's header, the recipe's facts and the last logged losses."""
    import json

    from transformers import AutoTokenizer

    adapter = trained / "adapter"
    tok, base = AutoTokenizer.from_pretrained(str(adapter)), AutoTokenizer.from_pretrained(str(TINY_MODEL))
    assert tok("a test of the tokenizer")["input_ids"] == base("a test of the tokenizer")["input_ids"]
    card = (adapter / "README.md").read_text()
    head, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: peft" in head and f"base_model: {json.dumps(str(TINY_MODEL))}" in head
    steps = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    last = [e for e in steps if e["event"] == "step"][-1]
    assert "| optimizer steps | 4 |" in body and f"| final loss | {last['loss']:.6g} |" in body, body
    assert "| quantization | 4-bit nf4 |" in body and "| objective | sft |" in body


@pytest.mark.slow  # the `trained` fixture is a 2-rank run
def test_peft_from_pretrained_gives_the_trained_logits(trained):
    """transformers' own 4-bit loading + PeftModel.from_pretrained(base, adapter) == qlaunch's model.

    Same NF4 bytes (whole-tensor and per-shard quantization agree bit for bit) and the saved fp32 LoRA
    weights; computed in fp32 on both sides, so the two stacks agree to fp32 rounding:
    ||got - ref|| / ||ref|| < 1e-4 (in bf16 they differ by ~1e-2: each stack rounds at other points)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=torch.bfloat16,
    )
    import bitsandbytes as bnb

    base = AutoModelForCausalLM.from_pretrained(str(TINY_MODEL), quantization_config=q, dtype=torch.float32)
    for m in base.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            # bitsandbytes' CPU inference fast path (repacked weights, its own kernel) rounds differently
            # (~3e-3 here); compare the same dequantize + matmul path that training and GPUs use.
            m.support_avx512bf16_for_cpu = False
    model = PeftModel.from_pretrained(base, str(trained / "adapter")).eval()
    with torch.no_grad():
        got = model(input_ids=_inputs()).logits.float()
    ref = _reference_logits(trained, "float32")
    assert rel(got, ref) < 1e-4, rel(got, ref)


@pytest.mark.slow  # the `trained` fixture is a 2-rank run
def test_merged_model_loads_with_from_pretrained_and_matches(trained, tmp_path):
    """`qlaunch merge --onto dequantized` writes dequantized base + scale * B @ A with its tokenizer. In float32 it is the
    trained function exactly (||diff|| / ||ref|| < 1e-5 against the fp32-compute 4-bit model); the
    default bf16 output rounds each merged weight once (< 4e-2 against the bf16-compute model; leaving the
    adapter out gives ~1.2). The bf16 figure is sensitive to the exact adapter: with this fixture's training
    at lr 2.5e-2 / 2.9e-2 / 3e-2 / 3.1e-2 it measured 0.0054 / 0.0059 / 0.0097 / 0.0075 under the earlier loss
    and 0.0051 / 0.0055 / 0.027 / 0.0079 under LinearCrossEntropy, whose training losses match to 0.05%."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for dtype, compute, tol in (("float32", "float32", 1e-5), ("bfloat16", "bfloat16", 4e-2)):
        out = tmp_path / f"merged-{dtype}"
        r = run_cli("merge", str(trained), "-o", str(out), "--dtype", dtype, "--onto", "dequantized")
        assert r.returncode == 0, r.stdout + r.stderr
        model = AutoModelForCausalLM.from_pretrained(str(out), dtype=getattr(torch, dtype)).eval()
        assert AutoTokenizer.from_pretrained(str(out)).vocab_size > 0
        with torch.no_grad():
            got = model(input_ids=_inputs()).logits.float()
        ref = _reference_logits(trained, compute)
        assert rel(got, ref) < tol, (dtype, rel(got, ref))
    # The adapter mattered: the base model alone is far from the trained logits.
    base = AutoModelForCausalLM.from_pretrained(str(TINY_MODEL), dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel(base(input_ids=_inputs()).logits.float(), _reference_logits(trained, "float32")) > 0.1


def test_merge_refuses_a_run_without_adapter(tmp_path):
    r = run_cli("merge", str(tmp_path), "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "not a run directory" in r.stderr


# ---------------------------------------------------------------- merge refuses an adapter that does not fit
# These build the run directory by hand (the recipe and an adapter of the recipe's LoRA shapes), so they need
# no training run.


def _lora_shapes(recipe_path: Path) -> dict[str, torch.Size]:
    """The adapter's tensor names and shapes for this recipe, as merge builds its model."""
    from launcher.plan.recipe_file import load_recipe
    from launcher.rank.build import build_model

    recipe = load_recipe(recipe_path)
    recipe = recipe.model_copy(update={"parallel": recipe.parallel.model_copy(update={"backend": "none"})})
    built = build_model(recipe, torch.device("cpu"), None)
    return {
        n.replace(".default.", ".").replace(".default", ""): p.shape
        for n, p in built.peft_model.named_parameters()
        if p.requires_grad
    }


@pytest.fixture(scope="module")
def lora_shapes(tmp_path_factory) -> dict[str, torch.Size]:
    recipe = tmp_path_factory.mktemp("shapes") / "recipe.toml"
    recipe.write_text(BASE_RECIPE)
    return _lora_shapes(recipe)


def _hand_made_run(tmp_path: Path, tensors: dict[str, torch.Tensor] | bytes, model: Path = TINY_MODEL) -> Path:
    from safetensors.torch import save_file

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "recipe.toml").write_text(BASE_RECIPE.replace(str(TINY_MODEL), str(model)))
    f = run / "adapter" / "adapter_model.safetensors"
    if isinstance(tensors, bytes):
        f.write_bytes(tensors)
    else:
        save_file(tensors, str(f), metadata={"format": "pt"})
    return run


def _adapter(shapes: dict[str, torch.Size], scale: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(s, generator=g) * scale for n, s in shapes.items()}


def _first_a(shapes: dict[str, torch.Size]) -> str:
    return next(n for n in sorted(shapes) if "lora_A" in n)


def _corrupt_adapter(case: str, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor] | bytes:
    adapter, a = _adapter(shapes), _first_a(shapes)
    if case == "random bytes":
        return bytes(range(256)) * 64
    if case == "transposed shapes":
        return {**adapter, a: adapter[a].T.contiguous()}
    if case == "all NaN":
        return {n: torch.full_like(t, float("nan")) for n, t in adapter.items()}
    if case == "one inf":
        t = adapter[a].clone()
        t[0, 0] = float("inf")
        return {**adapter, a: t}
    if case == "float8 with NaN":
        t = adapter[a].clone()
        t[0, 0] = float("nan")
        return {**adapter, a: t.to(torch.float8_e4m3fn)}
    if case == "a tensor missing":
        return {n: t for n, t in adapter.items() if n != a}
    if case == "an extra tensor":
        return {**adapter, "base_model.model.lm_head.lora_A.weight": torch.zeros(8, 64)}
    if case == "integer dtype":
        return {**adapter, a: torch.zeros(adapter[a].shape, dtype=torch.int32)}
    raise AssertionError(case)


CORRUPT_ADAPTERS = {
    "random bytes": "corrupt safetensors file",
    "transposed shapes": "has shape [",
    "all NaN": "holds NaN or infinite values (a diverged or corrupted adapter); nothing was merged",
    "one inf": "holds NaN or infinite values",
    "float8 with NaN": "holds NaN or infinite values",
    "a tensor missing": "adapter has no tensor for ",
    "an extra tensor": "adapter tensor 'base_model.model.lm_head.lora_A.weight' is no LoRA parameter",
    "integer dtype": "has dtype int32, not a float dtype",
}


@pytest.mark.parametrize("case", sorted(CORRUPT_ADAPTERS))
def test_merge_refuses_an_adapter_that_does_not_fit_and_writes_nothing(tmp_path, lora_shapes, case):
    """Random bytes gave a SafetensorError traceback, transposed shapes a RuntimeError, and an all-NaN
    adapter was merged (exit 0)."""
    from launcher.errors import UserError
    from launcher.launch.merge import merge_run

    run = _hand_made_run(tmp_path, _corrupt_adapter(case, lora_shapes))
    with pytest.raises(UserError) as err:
        merge_run(run, tmp_path / "out", "float32")
    msg = str(err.value)
    assert msg.startswith(f"{run / 'adapter' / 'adapter_model.safetensors'}: ") and "\n" not in msg, msg
    assert CORRUPT_ADAPTERS[case] in msg, msg
    if case == "transposed shapes":
        a = _first_a(lora_shapes)
        assert f"adapter tensor {a} has shape {list(lora_shapes[a])[::-1]}, but the recipe's model needs" in msg
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_merge_refuses_a_non_finite_base_model(tmp_path, lora_shapes):
    """An all-NaN model with a good adapter merged into NaN weights, exit 0."""
    from safetensors.torch import load_file, save_file

    from launcher.errors import UserError
    from launcher.launch.merge import merge_run

    model = tmp_path / "model"
    shutil.copytree(TINY_MODEL, model)
    weights = load_file(str(model / "model.safetensors"))
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    run = _hand_made_run(tmp_path, _adapter(lora_shapes), model)
    with pytest.raises(UserError, match=r"out: not written: the merged weight model.norm.weight holds NaN or inf"):
        merge_run(run, tmp_path / "out", "float32")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_merge_command_prints_only_its_own_lines(tmp_path, lora_shapes):
    """bitsandbytes' `Failed to load CPU gemm_4bit_forward ... kernels` line, transformers' FutureWarnings,
    DeepSpeed's accelerator line and a progress bar came with every merge, and before its error line."""
    from tests.conftest import assert_one_line_error

    (tmp_path / "good").mkdir()
    run = _hand_made_run(tmp_path / "good", _adapter(lora_shapes))
    r = run_cli("merge", str(run), "-o", str(tmp_path / "merged"), "--dtype", "float32")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout == f"wrote {tmp_path / 'merged'}\n"
    (tmp_path / "bad").mkdir()
    run = _hand_made_run(tmp_path / "bad", _corrupt_adapter("transposed shapes", lora_shapes))
    r = run_cli("merge", str(run), "-o", str(tmp_path / "out"))
    assert_one_line_error(r, ["adapter_model.safetensors: adapter tensor", "has shape ["], tmp_path / "out")


def test_merge_into_a_place_that_cannot_hold_it_is_one_line(tmp_path, lora_shapes):
    """`merge RUN -o /proc/m` said `/proc/m.tmp: No such file or directory`."""
    from launcher.errors import UserError
    from launcher.launch.merge import merge_run

    run = _hand_made_run(tmp_path, _adapter(lora_shapes))
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match=r"f/out: cannot write the merged model \(Not a directory\)$"):
        merge_run(run, tmp_path / "f" / "out", "float32")


@pytest.mark.slow  # the `trained` fixture is a 2-rank run
def test_default_merge_is_peft_on_the_original_base(trained, tmp_path):
    """The default `qlaunch merge` adds the adapter to model.path's own weights: in float32 it is
    PeftModel.from_pretrained(original fp32 base, adapter).merge_and_unload()'s function (<= 1e-3, measured
    ~1e-7), while the dequantized merge, the trained function, is measurably another (the NF4 error)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(TINY_MODEL), dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(trained / "adapter")).eval()
    with torch.no_grad():
        ref = peft(input_ids=_inputs()).logits.float()
    got = {}
    for onto in ("original", "dequantized"):
        out = tmp_path / onto
        args = ["merge", str(trained), "-o", str(out), "--dtype", "float32"]
        r = run_cli(*args, *(["--onto", onto] if onto == "dequantized" else []))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "dequantized" not in r.stderr  # the original weights exist: nothing to say
        model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        with torch.no_grad():
            got[onto] = model(input_ids=_inputs()).logits.float()
    assert rel(got["original"], ref) <= 1e-3, rel(got["original"], ref)
    assert rel(got["dequantized"], ref) > 10 * max(rel(got["original"], ref), 1e-4), rel(got["dequantized"], ref)


def test_merge_refuses_an_unknown_base(tmp_path):
    r = run_cli("merge", str(tmp_path), "-o", str(tmp_path / "m"), "--onto", "fp8")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith("--onto fp8: use original or dequantized")
    assert "Traceback" not in r.stderr and not (tmp_path / "m").exists()
