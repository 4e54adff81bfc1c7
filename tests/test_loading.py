"""Per-rank 4-bit shard loading: same bytes as whole-tensor quantization, only own shards held and read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launcher.plan.recipe import QuantConfig
from launcher.plan.recipe_file import load_recipe
from launcher.rank.model.quant import quantize_shard
from launcher.rank.model.shard import shard_rows, shard_spans
from tests.conftest import BASE_RECIPE, TINY_MODEL, free_port, run_cli


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("double_quant", [True, False])
def test_shard_quantization_equals_whole_tensor(world, storage, double_quant):
    """Concatenating every rank's packed bytes and scales gives bitsandbytes' whole-tensor quantization,
    including shards that start mid-block (world 3, 7) and the double-quantized state."""
    import bitsandbytes.functional as F

    from launcher.rank.model.quant import make_quant_state

    torch.manual_seed(world)
    w = torch.randn(96, 80, dtype=torch.bfloat16)  # 7680 elements = 120 blocks of 64
    q = QuantConfig(type="nf4", blocksize=64, double_quant=double_quant)
    n = w.numel()
    per_row = 2 * storage.itemsize
    rows = n // per_row
    packed_parts, absmax_parts = [], []
    for rank in range(world):
        r0, r1 = shard_rows(rows, rank, world)
        spans = shard_spans(n, r0, r1, per_row, q.blocksize, rank, world)
        p, a = quantize_shard(lambda s, e: w.reshape(-1)[s:e], n, spans, q, "cpu")
        assert p.numel() == (spans[1] - spans[0]) // 2
        packed_parts.append(p)
        absmax_parts.append(a)
    ref_packed, ref_state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    assert torch.equal(torch.cat(packed_parts), ref_packed.reshape(-1))
    state = make_quant_state(torch.cat(absmax_parts), tuple(w.shape), q)
    assert torch.equal(state.absmax, ref_state.absmax)
    if double_quant:
        assert torch.equal(state.offset, ref_state.offset)
        assert torch.equal(state.state2.absmax, ref_state.state2.absmax)
    # And the dequantized weight is what bitsandbytes gives for its own state.
    assert torch.equal(
        F.dequantize_4bit(ref_packed, state).to(torch.bfloat16), F.dequantize_4bit(ref_packed, ref_state)
    )


def _rank_main(rank: int, world: int, port: int, recipe_path: str, model_dirs: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh

    from launcher.rank.build import build_model

    mesh = init_device_mesh("cpu", (world,))
    result = {}
    for tag, model_dir in zip(("bf16", "prequant"), model_dirs, strict=True):
        recipe = load_recipe(recipe_path, [f'model.path="{model_dir}"'])
        built = build_model(recipe, torch.device("cpu"), mesh)
        local_numel, full = {}, {}
        for name, p in built.loss_model.named_parameters():
            local_numel[name] = (p.to_local().numel(), p.numel())
            full[name] = p.full_tensor().clone()  # collective: every rank gathers
        qstates = {
            n: (m.quant_state.absmax.clone(), m.quant_state.offset.clone())
            for n, m in built.loss_model.named_modules()
            if getattr(m, "quant_state", None) is not None
        }
        result[tag] = {"local": local_numel, "full": full, "qs": qstates, "bytes_read": built.stats.bytes_read}
        # lm_head is an FSDP unit of its own that the loss gathers and frees again (parallel/fsdp.py): between
        # forward and backward a rank holds only its shard of it.
        from torch.distributed.tensor import DTensor

        ids = torch.randint(3, 500, (1, 16), generator=torch.Generator().manual_seed(0))
        loss, _ = built.loss_model(ids, ids, None)
        head = built.causal_lm.lm_head
        result[tag]["head"] = (hasattr(head, "unshard"), isinstance(head.weight, DTensor))
        loss.backward()
    torch.save(result, f"{out}/rank{rank}.pt")
    from launcher.rank.worker import leave

    leave(0)  # as qlaunch's ranks end: no process-group teardown, no interpreter shutdown (see leave)


@pytest.fixture(scope="module")
def prequant_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q") / "tiny-nf4"
    r = run_cli("quantize", str(TINY_MODEL), "-o", str(out))
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
def test_ranks_hold_only_their_shard_and_sources_agree(tmp_path, prequant_dir):
    """2 gloo ranks: local shards partition every parameter, each rank reads about half the checkpoint,
    and the gathered model equals the single-process one — bit for bit — from bf16 and pre-quantized sources."""
    recipe = tmp_path / "r.toml"
    recipe.write_text(BASE_RECIPE)
    world = 2
    mp.spawn(
        _rank_main,
        args=(world, free_port(), str(recipe), [str(TINY_MODEL), str(prequant_dir)], str(tmp_path)),
        nprocs=world,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]

    # Single-process reference built in this process (no mesh, whole tensors).
    from launcher.rank.build import build_model

    ref = build_model(load_recipe(recipe), torch.device("cpu"), None)
    ref_params = dict(ref.loss_model.named_parameters())
    total_bytes = sum(f.stat().st_size for f in TINY_MODEL.glob("*.safetensors"))
    for tag in ("bf16", "prequant"):
        locals_ = [r[tag]["local"] for r in ranks]
        for name, (_, full) in locals_[0].items():
            sizes = [loc[name][0] for loc in locals_]
            assert sum(sizes) == full, name  # the shards partition the parameter ...
            assert max(sizes) <= -(-full // world), name  # ... and no rank holds more than its share
        # Reading: each rank reads about its half (plus block/row rounding), never the whole checkpoint.
        for r in ranks:
            assert r[tag]["bytes_read"] < 0.6 * total_bytes, (tag, r[tag]["bytes_read"])
            if tag == "prequant":  # half a byte per quantized weight instead of two
                assert r["prequant"]["bytes_read"] < 0.75 * r["bf16"]["bytes_read"]
        for name, t in ranks[0][tag]["full"].items():
            want = ref_params[name].detach()
            assert t.dtype == want.dtype, name
            assert torch.equal(t.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)), name
        assert all(r[tag]["head"] == (True, True) for r in ranks), [r[tag]["head"] for r in ranks]
        for mod_name, (absmax, offset) in ranks[0][tag]["qs"].items():
            m = ref.loss_model.get_submodule(mod_name)
            assert torch.equal(absmax, m.quant_state.absmax), mod_name
            assert torch.equal(offset, m.quant_state.offset), mod_name


def test_quantize_checkpoint_layout(prequant_dir):
    """The pre-quantized checkpoint stores half a byte per quantized weight plus fp32 block scales."""
    import json

    from safetensors import safe_open

    meta = json.loads((prequant_dir / "qlaunch_quant.json").read_text())
    assert meta["type"] == "nf4" and meta["blocksize"] == 64 and meta["quantized"]
    name = meta["quantized"][0]
    n = meta["shapes"][name][0] * meta["shapes"][name][1]
    with safe_open(str(next(prequant_dir.glob("*.safetensors"))), "pt") as f:
        assert f.get_slice(name + ".qweight").get_shape() == [n // 2]
        assert f.get_slice(name + ".absmax").get_shape() == [n // 64]
        assert "lm_head.weight" in f.keys()  # skipped modules are copied as they are
    assert (prequant_dir / "tokenizer.json").is_file() and (prequant_dir / "config.json").is_file()


# ------------------------------------------------------------------ LLM.int8 (quant.bits = 8)


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory):
    """The tiny model with LLM.int8 layers, one process (backend none), fp32 compute."""
    from launcher.rank.build import build_model

    recipe = tmp_path_factory.mktemp("int8") / "r.toml"
    recipe.write_text(BASE_RECIPE)
    sets = ["quant.bits=8", 'parallel.backend="none"', 'model.dtype="float32"', 'quant.compute_dtype="float32"']
    return build_model(load_recipe(recipe, sets), torch.device("cpu"), None)


def test_int8_weights_are_bitsandbytes_own_quantization(int8_model):
    """Every int8 layer holds exactly what bitsandbytes' Int8Params makes of the bf16 source weight (its
    documented path: quantization on `.to(device)`): the int8 rows (CB, also the parameter's data) and the
    fp32 row scales (SCB), bit for bit. lm_head (quant.skip_modules) stays dense."""
    import bitsandbytes as bnb
    from bitsandbytes.nn import Int8Params
    from safetensors.torch import load_file

    source = {}
    for f in TINY_MODEL.glob("*.safetensors"):
        source.update(load_file(str(f)))
    layers = {n: m for n, m in int8_model.causal_lm.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    assert len(layers) == 2 * 7  # every decoder linear of the 2 layers
    assert not isinstance(int8_model.causal_lm.lm_head, bnb.nn.Linear8bitLt)
    for name, layer in layers.items():
        w = source[name.replace(".base_layer", "") + ".weight"]  # peft nests the base layer
        assert w.dtype == torch.bfloat16, name
        ref = Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
        got = layer.weight
        assert got.dtype == torch.int8 and not got.requires_grad, name
        assert torch.equal(got.CB, ref.CB) and torch.equal(got.data, ref.CB), name
        assert got.SCB.dtype == torch.float32 and torch.equal(got.SCB, ref.SCB), name


def test_int8_merge_is_the_trained_function(int8_model):
    """Training forward of the int8 model (bitsandbytes' CPU training matmul: dequantized weight) equals the
    merged dense model (`qlaunch merge`'s dequantize + B @ A) to fp32 rounding, with non-zero LoRA weights."""
    import copy

    from launcher.launch.merge import merge_into_dense

    built = copy.deepcopy(int8_model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in built.peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ids = torch.randint(3, 500, (2, 24), generator=g)
    built.causal_lm.train()  # bitsandbytes picks its int8 matmul by training mode (see test_deepspeed.py)
    with torch.no_grad():
        want = built.causal_lm(input_ids=ids).logits.float()
        merged = merge_into_dense(built.peft_model, torch.float32).eval()
        got = merged(input_ids=ids).logits.float()
    assert not hasattr(merged, "is_loaded_in_8bit")
    assert float((got - want).norm() / want.norm()) < 1e-5


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process, no group: DCP says so
def test_int8_checkpoint_round_trip(int8_model, tmp_path):
    """backend none with int8 layers: the torch.distributed.checkpoint save/load of LoRA weights and AdamW
    state works (bitsandbytes' extra `SCB` state-dict entry name no attribute, which DCP could not map)."""
    import copy

    from launcher.rank.parallel.torch_engine import TorchEngine

    recipe = tmp_path / "r.toml"
    recipe.write_text(BASE_RECIPE)
    built = copy.deepcopy(int8_model)
    engine = TorchEngine(built.loss_model, load_recipe(recipe, ["quant.bits=8", 'parallel.backend="none"']), 4, "cpu")
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    s, n = engine.model(ids, ids, torch.arange(16).expand(2, 16))
    engine.backward(s / n)
    engine.step()
    engine.save_state(tmp_path)
    saved = {k: v.detach().clone() for k, v in built.loss_model.named_parameters() if v.requires_grad}
    with torch.no_grad():
        for p in engine.params:
            p.add_(1.0)
    engine.load_state(tmp_path)
    for k, v in built.loss_model.named_parameters():
        if v.requires_grad:
            assert torch.equal(v, saved[k]), k


def test_prequantized_checkpoint_refuses_int8(tmp_path):
    """A `qlaunch quantize` directory holds NF4 bytes only: quant.bits = 8 is refused in one line that says
    what to use instead (this runs in preflight, before any run directory or rank exists)."""
    from launcher.errors import UserError
    from launcher.rank.model.fill import open_source

    d = tmp_path / "tiny-nf4"
    d.mkdir()
    for f in TINY_MODEL.iterdir():
        (d / f.name).symlink_to(f)
    meta = {"format": "qlaunch-4bit-v1", "type": "nf4", "blocksize": 64, "quantized": [], "shapes": {}}
    (d / "qlaunch_quant.json").write_text(json.dumps(meta))
    recipe = tmp_path / "r.toml"
    recipe.write_text(BASE_RECIPE)
    rec = load_recipe(recipe, [f'model.path="{d}"', "quant.bits=8", 'parallel.backend="none"'])
    with pytest.raises(UserError) as err:
        open_source(rec, d, None, {}, "cpu")
    msg = str(err.value)
    assert "\n" not in msg
    assert "quant.bits = 8" in msg and "original checkpoint" in msg and "quant.bits = 4" in msg, msg


def test_safetensors_source_reads_exactly_the_requested_bytes():
    """Slices come from positioned reads through one reused buffer: each result stays valid after later
    reads, and the byte count is the slices' size (not whole tensors or files)."""
    from safetensors.torch import load_file

    from launcher.rank.model.sources import SafetensorsSource

    src = SafetensorsSource(TINY_MODEL)
    name = "model.layers.0.mlp.down_proj.weight"
    full = load_file(str(next(TINY_MODEL.glob("*.safetensors"))))[name].reshape(-1)
    a = src.read_flat(name, 0, 100)
    b = src.read_flat(name, 50, full.numel())
    c = src.read_flat(name, 7, 7)
    assert torch.equal(a, full[:100]) and torch.equal(b, full[50:]) and c.numel() == 0
    assert src.bytes_read == (100 + full.numel() - 50) * full.element_size()
