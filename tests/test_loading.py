"""Per-rank 4-bit shard loading: same bytes as whole-tensor quantization, only own shards held and read."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launcher.loading import quantize_shard, shard_rows, shard_spans
from launcher.recipe import QuantConfig, load_recipe
from tests.conftest import BASE_RECIPE, TINY_MODEL, run_cli


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("double_quant", [True, False])
def test_shard_quantization_equals_whole_tensor(world, storage, double_quant):
    """Concatenating every rank's packed bytes and scales gives bitsandbytes' whole-tensor quantization,
    including shards that start mid-block (world 3, 7) and the double-quantized state."""
    import bitsandbytes.functional as F

    from launcher.loading import make_quant_state

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, recipe_path: str, model_dirs: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh

    from launcher.loading import build_model

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
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


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
        args=(world, _free_port(), str(recipe), [str(TINY_MODEL), str(prequant_dir)], str(tmp_path)),
        nprocs=world,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]

    # Single-process reference built in this process (no mesh, whole tensors).
    from launcher.loading import build_model

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
