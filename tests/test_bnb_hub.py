"""bitsandbytes' own 4-bit checkpoints (the hub's `*-bnb-4bit` format): loaded bit for bit as transformers and
bitsandbytes load them, each rank reading only its bytes of the packed weights; refusals in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from launcher.errors import UserError
from launcher.plan.recipe_file import load_recipe
from tests.conftest import BASE_RECIPE, TINY_MODEL, assert_one_line_error, run_cli
from tests.families import BNB_VARIANTS, make_bnb_checkpoint

# The tiny Llama's second layer keeps its down_proj dense, as Unsloth's repositories keep some modules dense
# (llm_int8_skip_modules): which linears are 4-bit follows the checkpoint, not quant.skip_modules.
DENSE_KEPT = "model.layers.1.mlp.down_proj"


def variant_recipe(tmp_path: Path, model: Path, variant: str, *overrides: str):
    quant_type, double_quant, _ = BNB_VARIANTS[variant]
    p = tmp_path / "recipe.toml"
    p.write_text(BASE_RECIPE.replace(str(TINY_MODEL), str(model)))
    sets = [f'quant.type="{quant_type}"', f"quant.double_quant={str(double_quant).lower()}", *overrides]
    return load_recipe(p, sets)


@pytest.fixture(scope="module")
def bnb_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bnb")
    skip = {"nf4-dq-u8": ["lm_head", DENSE_KEPT]}
    return {v: make_bnb_checkpoint(TINY_MODEL, v, root / v, skip.get(v)) for v in BNB_VARIANTS}


def _linear4bit_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    import bitsandbytes as bnb

    return {
        n.replace("base_model.model.", "").replace(".base_layer", ""): m
        for n, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }


@pytest.mark.parametrize("variant", list(BNB_VARIANTS))
def test_loads_bit_identical_to_transformers_at_world_1_and_2(tmp_path, bnb_dirs, variant):
    """Against transformers' own loader (from_pretrained, device_map="cpu"): the same linears are 4-bit, with
    the same packed bytes and the same dequantized weights, and every dense tensor equal, from qlaunch's load
    (world 1). Split as two FSDP ranks would, each rank's bytes concatenate to the same packed weight, its
    whole quant state dequantizes the same, and it reads only its half of the packed bytes plus the state."""
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM

    from launcher.launch import preflight
    from launcher.rank.build import build_model
    from launcher.rank.model.quant import read_hub_shard
    from launcher.rank.model.shard import shard_rows, shard_spans
    from launcher.rank.model.sources import SafetensorsSource

    d = bnb_dirs[variant]
    rec = variant_recipe(tmp_path, d, variant, 'parallel.backend="none"')
    preflight.check(rec)
    ref = AutoModelForCausalLM.from_pretrained(d, device_map="cpu")
    ref_layers = _linear4bit_layers(ref)
    built = build_model(rec, torch.device("cpu"), None)
    got_layers = _linear4bit_layers(built.peft_model)
    assert sorted(got_layers) == sorted(ref_layers) and len(ref_layers) == 14 - (variant == "nf4-dq-u8")
    assert (DENSE_KEPT in ref_layers) == (variant != "nf4-dq-u8")

    def dequantized(packed: torch.Tensor, state) -> torch.Tensor:
        return F.dequantize_4bit(packed.view(torch.uint8).reshape(-1, 1), state)

    for name, want in ref_layers.items():
        want_bytes = want.weight.data.view(torch.uint8).reshape(-1)
        got = got_layers[name]
        assert torch.equal(got.weight.data.view(torch.uint8).reshape(-1), want_bytes), name
        w = dequantized(want_bytes, want.weight.quant_state)
        assert torch.equal(dequantized(got.weight.data, got.quant_state), w), name
        assert got.quant_state.offset is None or torch.equal(got.quant_state.offset, want.weight.quant_state.offset)
    got_params = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in built.peft_model.named_parameters()
    }
    dense = [n for n, _ in ref.named_parameters() if n.removesuffix(".weight") not in ref_layers]
    assert "lm_head.weight" in dense and (f"{DENSE_KEPT}.weight" in dense) == (variant == "nf4-dq-u8")
    for name in dense:
        assert torch.equal(got_params[name], ref.get_parameter(name)), name

    # Two ranks, bf16 storage (the recipe's): rows [r0, r1) of n/4 rows hold elements [e0, e1).
    world, per_row, q = 2, 4, rec.quant
    for name, want in ref_layers.items():
        n = want.out_features * want.in_features
        parts, read = [], []
        for rank in range(world):
            r0, r1 = shard_rows(n // per_row, rank, world)
            e0, e1, _, _ = shard_spans(n, r0, r1, per_row, q.blocksize, rank, world)
            src = SafetensorsSource(d)
            packed, state = read_hub_shard(src, name + ".weight", q, e0, e1, "cpu")
            w = dequantized(want.weight.data, want.weight.quant_state)
            assert torch.equal(dequantized(want.weight.data, state), w), (name, rank)
            parts.append(packed)
            read.append(src.bytes_read - (e1 - e0) // 2)
            src.close()
        assert torch.equal(torch.cat(parts), want.weight.data.view(torch.uint8).reshape(-1)), name
        state_bytes = sum(
            i.end - i.begin for t, i in SafetensorsSource(d).info.items() if t.startswith(name + ".weight.")
        )
        assert read == [state_bytes] * world, (name, read, state_bytes)  # the rest is the state, read whole


def test_refusals_are_one_line(tmp_path, bnb_dirs):
    """Each kind of checkpoint or recipe qlaunch cannot train exactly is one line naming what to change:
    another quant method, an 8-bit checkpoint, quant.bits other than 4, a recipe quant section or skip list
    the checkpoint contradicts, a malformed quant-state record or scale tensor, a packed tensor without its
    quantization_config."""
    from safetensors.torch import load_file, save_file

    from launcher.launch import preflight

    src = bnb_dirs["nf4-dq-u8"]

    def refused(d: Path, *overrides: str, variant: str = "nf4-dq-u8") -> str:
        with pytest.raises(UserError) as err:
            preflight.check(variant_recipe(tmp_path, d, variant, *overrides))
        assert "\n" not in str(err.value)
        return str(err.value)

    def copy(name: str, config_update: dict | None = None) -> Path:
        d = tmp_path / name
        shutil.copytree(src, d)
        if config_update is not None:
            config = json.loads((d / "config.json").read_text())
            config["quantization_config"].update(config_update)
            (d / "config.json").write_text(json.dumps(config))
        return d

    msg = refused(copy("gptq", {"quant_method": "gptq"}))
    assert "quant_method = gptq" in msg and "only bitsandbytes 4-bit" in msg, msg
    msg = refused(copy("int8", {"load_in_4bit": False, "_load_in_4bit": False, "load_in_8bit": True}))
    assert "8-bit checkpoint" in msg and "quant.bits = 8" in msg, msg
    for bits in ("8", '"none"'):
        msg = refused(src, f"quant.bits={bits}", 'parallel.backend="none"')
        assert "bitsandbytes 4-bit checkpoint" in msg and "set quant.bits = 4" in msg, msg
    msg = refused(src, variant="fp4-sq-u8")
    assert "model.layers.0.self_attn.q_proj.weight is stored quantized with {'type': 'nf4'" in msg, msg
    assert "the recipe asks for {'type': 'fp4'" in msg and 'quant.type = "nf4"' in msg, msg
    msg = refused(src, "quant.blocksize=128")
    assert "'blocksize': 64" in msg and "quant.blocksize = 64" in msg, msg
    msg = refused(src, 'quant.skip_modules=["lm_head", "o_proj"]')
    assert "keeps model.layers.0.self_attn.o_proj dense" in msg and "stores it only in 4-bit" in msg, msg

    d = copy("record")
    f = d / "model.safetensors"
    tensors = load_file(str(f))
    key = "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"
    record = json.loads(bytes(tensors[key].tolist()))
    for bad, rule in (
        ({**record, "shape": [64, 65]}, "stored as a 4-bit weight of shape [64, 65], the config implies [128, 64]"),
        ({**record, "dtype": "int64"}, "'dtype' must be one of"),
        ({**record, "extra": 1}, "its keys must be"),
        ({k: v for k, v in record.items() if k != "nested_offset"}, "its keys must be"),
        ("{not json", "not a UTF-8 JSON object"),
    ):
        text = bad if isinstance(bad, str) else json.dumps(bad)
        save_file({**tensors, key: torch.tensor(list(text.encode()), dtype=torch.uint8)}, str(f))
        msg = refused(d)
        assert rule in msg and (rule.startswith("stored") or "not a valid bitsandbytes quant-state record" in msg)
    absmax = "model.layers.0.mlp.up_proj.weight.absmax"
    save_file({**tensors, absmax: tensors[absmax][:-1].clone()}, str(f))
    msg = refused(d)
    assert f"tensor '{absmax}' is U8 [127]; the record of" in msg and "needs U8 [128]" in msg, msg
    save_file({k: v for k, v in tensors.items() if k != key}, str(f))
    msg = refused(d)
    assert "up_proj.weight' has shape [4096, 1], neither the config's [128, 64] nor a 4-bit weight" in msg, msg
    packed = "model.layers.0.mlp.up_proj.weight"
    save_file({**tensors, packed: tensors[packed][:-1].clone()}, str(f))
    msg = refused(d)
    assert f"tensor '{packed}' (packed 4-bit weights) is U8 [4095, 1]; [128, 64] needs 4096 bytes" in msg, msg

    d = copy("no-config")
    config = json.loads((d / "config.json").read_text())
    del config["quantization_config"]
    (d / "config.json").write_text(json.dumps(config))
    msg = refused(d)
    assert "is a bitsandbytes 4-bit weight, but config.json has no quantization_config" in msg, msg


def test_note_when_the_checkpoint_keeps_linears_dense(tmp_path, bnb_dirs, capsys):
    """The checkpoint keeps one down_proj dense that the recipe's skip list would quantize: it passes, with a
    note naming it."""
    from launcher.launch import preflight

    preflight.check(variant_recipe(tmp_path, bnb_dirs["nf4-dq-u8"], "nf4-dq-u8"))
    err = capsys.readouterr().err
    assert f"keeps 1 linear layer(s) dense that quant.skip_modules would quantize ({DENSE_KEPT})" in err, err


def test_cli_quantize_refuses_quantized_inputs(tmp_path, bnb_dirs):
    """`qlaunch quantize` of a bitsandbytes checkpoint (or of its own output) is one line: train it directly."""
    from launcher.launch.quantize import quantize_checkpoint

    own = tmp_path / "own"
    own.mkdir()
    (own / "config.json").symlink_to(TINY_MODEL / "config.json")
    meta = {"format": "qlaunch-4bit-v1", "type": "nf4", "blocksize": 64, "quantized": [], "shapes": {}}
    (own / "qlaunch_quant.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"own: already quantized \(`qlaunch quantize`, nf4\); train it directly$"):
        quantize_checkpoint(str(own), str(tmp_path / "out"), "nf4", 64, ["lm_head"])
    r = run_cli("quantize", str(bnb_dirs["fp4-sq-u8"]), "-o", str(tmp_path / "out"), cwd=tmp_path, timeout=120)
    assert_one_line_error(r, ["already quantized (bitsandbytes fp4); train it directly"], tmp_path / "runs")
    assert not (tmp_path / "out").exists()


def _train(tmp_path: Path, model: Path, *overrides: str) -> Path:
    """`qlaunch run --gpus 2` (2 steps) on MODEL; the run directory, once every step's loss is finite."""
    import math

    recipe = tmp_path / "train.toml"
    recipe.write_text(BASE_RECIPE.replace(str(TINY_MODEL), str(model)).replace("lr = 1e-3", "lr = 3e-2"))
    sets = [x for o in (f'log.runs_dir="{tmp_path / "runs"}"', *overrides) for x in ("--set", o)]
    r = run_cli("run", str(recipe), "--gpus", "2", *sets)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (metrics,) = (tmp_path / "runs").glob("*/*/metrics.jsonl")
    steps = [json.loads(x) for x in metrics.read_text().splitlines() if '"event": "step"' in x]
    assert [s["step"] for s in steps] == [1, 2] and all(math.isfinite(s["loss"]) for s in steps), steps
    assert (metrics.parent / "adapter" / "adapter_model.safetensors").is_file()
    return metrics.parent


@pytest.mark.slow
def test_cli_trains_a_bnb_checkpoint_and_merges_it(tmp_path, bnb_dirs):
    """FSDP2 at world 2 on a bitsandbytes checkpoint (one linear kept dense by the checkpoint), then `qlaunch
    merge`: a dense model without quantization_config, whose logits are transformers' own 4-bit loading of
    the same checkpoint with the adapter applied by peft (both computed in fp32: < 1e-4)."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    d = bnb_dirs["nf4-dq-u8"]
    run = _train(tmp_path, d)
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapter.items())
    out = tmp_path / "merged"
    r = run_cli("merge", str(run), "-o", str(out), "--dtype", "float32")
    assert r.returncode == 0, r.stdout + r.stderr
    # The default asks for the original weights; a 4-bit checkpoint has none, and merge says what it did.
    assert "merging onto the dequantized 4-bit weights" in r.stderr, r.stderr
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())

    base = AutoModelForCausalLM.from_pretrained(str(d), device_map="cpu", dtype=torch.float32)
    for m in base.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False  # its CPU inference kernel rounds otherwise (test_export.py)
            m.compute_dtype = m.weight.quant_state.dtype = torch.float32  # dequantize in fp32, as merge does
    for p in base.parameters():  # a pre-quantized checkpoint keeps its dense tensors in their stored bf16
        if p.dtype == torch.bfloat16:
            p.data = p.data.float()
    ref_model = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    ids = torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, ref = merged(input_ids=ids).logits, ref_model(input_ids=ids).logits.float()
    assert float((got - ref).norm() / ref.norm()) < 1e-5  # measured 2e-7


@pytest.mark.slow
def test_cli_trains_a_tied_bnb_checkpoint_under_zero3(tmp_path):
    """A tied family (Qwen2, tie_word_embeddings) quantized by bitsandbytes, trained by ZeRO-3 at world 2: the
    4-bit weights go through the partitioned loader (every unit whole, then partitioned)."""
    from tests.families import make_checkpoint

    dense = make_checkpoint("qwen2_tied", tmp_path / "qwen2")
    d = make_bnb_checkpoint(dense, "nf4-dq-u8", tmp_path / "qwen2-bnb")
    zero3 = ['parallel.backend="deepspeed"', "parallel.deepspeed.stage=3", "parallel.deepspeed.persistence_threshold=0"]
    _train(tmp_path, d, *zero3)
