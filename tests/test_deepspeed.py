"""The DeepSpeed backend (ZeRO-2 and ZeRO-3) computes the same function as one process, through the real CLI.

Every run is a real `qlaunch run` (or `accelerate launch`): torch elastic spawns 2 ranks, gloo process groups,
bitsandbytes NF4 layers, a real DeepSpeed engine built from the run directory's deepspeed_config.json.
Loss trajectories are read from rank 0's metrics.jsonl. The reference is parallel.backend = "none" at world 1
with the same global batch.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import BASE_RECIPE, ROOT, TINY_DATA, assert_one_line_error, run_cli

pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed")

# fp32 everywhere: what remains is summation order over ranks and micro-batches.
FP32 = ['model.dtype="float32"', 'quant.compute_dtype="float32"', 'quant.storage_dtype="float32"']
DS = 'parallel.backend="deepspeed"'
ZERO2 = [DS, "parallel.deepspeed.stage=2"]
# persistence_threshold = 0: every parameter of the tiny model is partitioned and re-gathered at each use
# (DeepSpeed's default would keep them all whole after the first gather, hiding a partitioning bug).
ZERO3 = [DS, "parallel.deepspeed.stage=3", "parallel.deepspeed.persistence_threshold=0"]
OFFLOAD = ["parallel.deepspeed.offload_optimizer=true", "parallel.deepspeed.offload_params=true"]


def sets(*overrides: str) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


def read_run(root: Path) -> dict:
    """metrics of the single run under root: per-step records, evals, and the exported adapter."""
    files = sorted(root.glob("**/metrics.jsonl"))
    assert len(files) == 1, files
    recs = [json.loads(x) for x in files[0].read_text().splitlines()]
    adapter = files[0].parent / "adapter" / "adapter_model.safetensors"
    return {
        "dir": files[0].parent,
        "steps": [r for r in recs if r["event"] == "step"],
        "evals": [r["eval_loss"] for r in recs if r["event"] == "eval"],
        "adapter": load_file(str(adapter)) if adapter.exists() else None,
    }


def train(tmp: Path, recipe: Path, tag: str, gpus: int, *overrides: str, env: dict | None = None) -> dict:
    root = tmp / tag
    r = run_cli("run", str(recipe), "--gpus", str(gpus), *sets(f'log.runs_dir="{root}"', *overrides), env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return read_run(root)


def rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def series(run: dict, key: str) -> list[float]:
    return [s[key] for s in run["steps"]]


# ------------------------------------------------------------------ trajectory parity (fp32)

STEPS = 6


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """6 steps, global batch 8: reference (world 1, micro 2, accum 4) vs 2 ranks (micro 2, accum 2).

    Warmup and a cosine schedule exercise the lr schedule; grad_clip 0.5 is below the gradient norm of the
    first steps, so clipping acts on (and must see) the summed gradient."""
    tmp = tmp_path_factory.mktemp("ds-parity")
    recipe = tmp / "r.toml"
    recipe.write_text(
        BASE_RECIPE.replace("max_steps = 2", f"max_steps = {STEPS}").replace("global_batch = 4", "global_batch = 8")
    )
    common = [*FP32, "train.lr=3e-3", "train.warmup_steps=2", "train.grad_clip=0.5", "train.micro_batch=2"]
    return {
        "ref": train(tmp, recipe, "ref", 1, *common, 'parallel.backend="none"'),
        "zero2": train(tmp, recipe, "zero2", 2, *common, *ZERO2),
        # Offload changes how DeepSpeed accumulates gradients over micro-steps (host-side partitions);
        # plain ZeRO-3 is covered by the lr = 0 test and the loading test below.
        "zero3_offload": train(tmp, recipe, "zero3off", 2, *common, *ZERO3, *OFFLOAD),
        # Each decoder layer compiled inside ZeRO-3's whole-layer gather/release (no DeepSpeed hook in the graph),
        # without checkpointing: nothing else then makes the first layer's input require grad (see
        # launcher.rank.parallel.deepspeed.zero3_whole_layers).
        "zero3_compile": train(
            tmp, recipe, "zero3c", 2, *common, *ZERO3, "train.compile=true", "train.gradient_checkpointing=false"
        ),
        "recipe": recipe,
        "common": common,
        "tmp": tmp,
    }


@pytest.mark.parametrize("name", ["zero2", "zero3_offload", "zero3_compile"])
def test_trajectory_parity_fp32(parity, name):
    ref, got = parity["ref"], parity[name]
    loss_ref = series(ref, "loss")
    assert len(loss_ref) == STEPS and loss_ref[-1] < loss_ref[0] - 0.05  # it trains
    norms = series(ref, "grad_norm")
    assert max(norms) > 0.5  # clipping acts on some step
    assert series(got, "lr") == pytest.approx(series(ref, "lr"), rel=1e-12)  # same schedule
    assert rel(series(got, "loss"), loss_ref) <= 1e-3, (name, series(got, "loss"), loss_ref)
    # The gradient norm is computed on the summed gradient before clipping: DeepSpeed's averaging over
    # ranks and 1/accumulation scaling must both be undone for it to match.
    assert rel(series(got, "grad_norm"), norms) <= 1e-3, (name, series(got, "grad_norm"), norms)


@pytest.mark.parametrize("name", ["zero2", "zero3_offload", "zero3_compile"])
def test_exported_adapter_matches_reference(parity, name):
    """The adapter DeepSpeed trained (ZeRO-3: gathered from partitions) is the reference's adapter."""
    ref, got = parity["ref"]["adapter"], parity[name]["adapter"]
    assert ref is not None and got is not None
    assert sorted(got) == sorted(ref)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in ref.items())  # it moved
    for k in ref:
        assert got[k].shape == ref[k].shape, k
        err = (got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp(min=1e-12)
        assert err <= 1e-3, (k, float(err))


def test_accelerate_launch_starts_the_same_training(parity, tmp_path):
    """`accelerate launch --config_file RUN/accelerate_config.yaml -m launcher.rank.worker RUN` (the documented
    interop) on a directory from `qlaunch config` runs exactly what `qlaunch run` ran."""
    import shutil
    import subprocess
    import sys

    out = tmp_path / "acc"
    r = run_cli(
        "config", str(parity["recipe"]), "--gpus", "2", *sets(*parity["common"], *ZERO2), "-o", str(out)
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # as qlaunch's plan sets for CPU ranks
    cmd = [
        accelerate,
        "launch",
        "--config_file",
        str(out / "accelerate_config.yaml"),
        "-m",
        "launcher.rank.worker",
        str(out),
    ]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # Rank 0 shows the progress qlaunch's follower would have shown (its own output still goes to its log).
    shown = p.stdout.splitlines()
    assert any(line.startswith("step 1/") and " loss " in line for line in shown), p.stdout[-3000:]
    assert any(line.startswith("done: ") for line in shown), p.stdout[-3000:]
    assert not any(line.startswith("[rank ") for line in shown), p.stdout[-3000:]
    got, want = read_run(out), parity["zero2"]
    assert rel(series(got, "loss"), series(want, "loss")) <= 1e-6
    assert rel(series(got, "grad_norm"), series(want, "grad_norm")) <= 1e-6


# ------------------------------------------------------------------ lr = 0 invariance (bf16, evals between steps)


def same_batch_data(tmp: Path) -> Path:
    """Four long documents: truncated to seq_len each is exactly one sample, so a global batch of 4 is the same
    set of sequences at every step (only their order over ranks and micro-batches changes)."""
    src = (TINY_DATA / "train.jsonl").read_text().splitlines()
    docs = [" ".join(json.loads(x)["output"] for x in src[i : i + 40]) for i in range(0, 160, 40)]
    path = tmp / "four.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def lr0(tmp: Path, tag: str, *overrides: str, env: dict | None = None) -> dict:
    """4 steps at lr = 0 on 2 ranks (micro 1, accum 2), default bf16 dtypes, an eval (eval mode, no grad) after
    every step on the training set itself."""
    data = same_batch_data(tmp)
    recipe = tmp / "lr0.toml"
    recipe.write_text(BASE_RECIPE.replace("lr = 1e-3", "lr = 0.0").replace("max_steps = 2", "max_steps = 4"))
    common = [
        f'data.datasets=[{{path="{data}"}}]',
        'data.format="text"',
        f'data.val_path="{data}"',
        "train.micro_batch=1",
        "train.global_batch=4",
        "train.eval_every=1",
    ]
    return train(tmp, recipe, tag, 2, *common, *overrides, env=env)


def max_drift(run: dict) -> float:
    """Largest relative change of the training loss, and of the eval loss, over the run."""
    steps, evals = series(run, "loss"), run["evals"]
    assert len(steps) == 4 and len(evals) == 4
    return max(rel(steps, [steps[0]] * 4), rel(evals, [evals[0]] * 4), abs(evals[0] - steps[0]) / steps[0])


# An eval of the same 4 sequences sums their losses in another order than the training step: fp32 rounding.
LR0_TOL = 1e-6


@pytest.mark.parametrize(
    "name,overrides",
    [("zero2_offload", [*ZERO2, "parallel.deepspeed.offload_optimizer=true"]), ("zero3", ZERO3)],
)
def test_lr0_loss_constant_with_eval_between_steps(tmp_path, name, overrides):
    """lr = 0: the loss of the same batch never changes, in training or in the no-grad eval between steps.

    On CPU, bitsandbytes' eval-mode no-grad forward repacks the weight and rewrites the shared quant state;
    ZeRO-3 re-gathers the original bytes at the next use, so state and bytes disagree and the loss drifts
    (see test_lr0_detects_the_cpu_repack_bug)."""
    run = lr0(tmp_path, name, *overrides)
    assert max_drift(run) <= LR0_TOL, (series(run, "loss"), run["evals"])


REPACK = textwrap.dedent(
    """
    # Re-introduces the bug qlaunch's loader prevents: bitsandbytes' own Linear4bit.forward may repack
    # 4-bit weights for its CPU inference kernel. qlaunch's 4-bit layer (launcher.rank.model.quant.QLinear4bit)
    # never calls it and sets support_avx512bf16_for_cpu = False; here it calls it with the repack allowed.
    import bitsandbytes.nn.modules as _m
    from bitsandbytes.functional import has_avx512bf16 as _has

    import launcher.rank.model.quant as _l

    def _repacking_forward(self, x):
        self.support_avx512bf16_for_cpu = _has()
        return _m.Linear4bit.forward(self, x)

    _l.linear4bit_class().forward = _repacking_forward
    """
)


def test_lr0_detects_the_cpu_repack_bug(tmp_path):
    """The invariance test can fail: with bitsandbytes' CPU repacking allowed again (in every rank, through a
    sitecustomize on PYTHONPATH), ZeRO-3's lr = 0 losses drift far beyond the tolerance."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no avx512_bf16: bitsandbytes never repacks here")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(REPACK)
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(hook)])}
    run = lr0(tmp_path, "repack", *ZERO3, env=env)
    assert max_drift(run) > 100 * LR0_TOL, (series(run, "loss"), run["evals"])


# ------------------------------------------------------------------ LLM.int8 (quant.bits = 8) under ZeRO-2

INT8 = "quant.bits=8"
# On CPU, bitsandbytes trains int8 layers through a dequantized weight (its MatMul8bitFp) but evaluates them
# with int8 activations and fp16 outlier columns (MatMul8bitLt): an eval of the very batch a step trained on
# differs from the step's loss by this kernel difference, not by any change of the weights.
INT8_EVAL_VS_TRAIN_TOL = 1e-3


def test_int8_lr0_loss_constant_with_eval_between_steps(tmp_path):
    """lr = 0 with LLM.int8 weights under ZeRO-2 (2 ranks, an eval after every step): the training loss and
    the eval loss never change. The int8 layers move their row scales into the matmul state and swap the
    weight's data on their first forward; nothing may drift from that, or from DeepSpeed's broadcast."""
    run = lr0(tmp_path, "int8", *ZERO2, INT8)
    steps, evals = series(run, "loss"), run["evals"]
    assert len(steps) == 4 and len(evals) == 4
    assert rel(steps, [steps[0]] * 4) <= LR0_TOL, steps
    assert rel(evals, [evals[0]] * 4) <= LR0_TOL, evals
    assert abs(evals[0] - steps[0]) / steps[0] <= INT8_EVAL_VS_TRAIN_TOL, (steps, evals)


def test_int8_trajectory_parity_fp32(tmp_path):
    """LLM.int8: ZeRO-2 on 2 ranks (micro 2, accum 2) follows the single-process run (micro 2, accum 4) for 6
    steps within 1e-3 in loss, gradient norm and the exported adapter (fp32 compute, clipping active)."""
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        BASE_RECIPE.replace("max_steps = 2", f"max_steps = {STEPS}").replace("global_batch = 4", "global_batch = 8")
    )
    common = [*FP32, INT8, "train.lr=3e-3", "train.warmup_steps=2", "train.grad_clip=0.5", "train.micro_batch=2"]
    ref = train(tmp_path, recipe, "ref", 1, *common, 'parallel.backend="none"')
    got = train(tmp_path, recipe, "zero2", 2, *common, *ZERO2)
    loss_ref, norms = series(ref, "loss"), series(ref, "grad_norm")
    assert len(loss_ref) == STEPS and loss_ref[-1] < loss_ref[0] - 0.05  # it trains
    assert max(norms) > 0.5  # clipping acts on some step
    assert rel(series(got, "loss"), loss_ref) <= 1e-3, (series(got, "loss"), loss_ref)
    assert rel(series(got, "grad_norm"), norms) <= 1e-3, (series(got, "grad_norm"), norms)
    assert sorted(got["adapter"]) == sorted(ref["adapter"])
    for k, want in ref["adapter"].items():
        err = (got["adapter"][k] - want).abs().max() / want.abs().max().clamp(min=1e-12)
        assert err <= 1e-3, (k, float(err))


# ------------------------------------------------------------------ what each rank holds (ZeRO-3 loading)


def test_zero3_loads_partitions_not_the_model(tmp_path):
    """ZeRO-3 loading streams units into partitions: after loading, every parameter on each of 2 ranks is its
    1/2 share (DeepSpeed's ds_tensor) and nothing else, the 4-bit scales are whole on every rank, the largest
    transient (one unit filled before partitioning) is a fraction of the model, and the partitioned model
    computes the loss of the unsharded one."""
    got = json.loads(run_python(MEMORY_PROBE, tmp_path).strip().splitlines()[-1])
    for rank in got["ranks"]:
        assert rank["bad"] == [], rank["bad"]  # each parameter: ceil(numel / 2) local elements, no full copy
        assert rank["quant_state_bytes"] == got["full"]["quant_state_bytes"] > 0
        assert rank["param_bytes"] < 0.55 * got["full"]["param_bytes"]
        # Each decoder layer is one ZeRO-3 unit (launcher.rank.parallel.deepspeed.zero3_whole_layers).
        assert rank["hooked_layers"] == 2 and rank["hooked_inside"] == 0, rank
        # Same 4-bit bytes, same scales, same kernels: the same loss (bf16; summation order differs slightly).
        assert abs(rank["loss"] - rank["loss_full"]) <= 1e-5 * abs(rank["loss_full"]), rank
    assert got["max_unit_bytes"] < 0.5 * got["full"]["param_bytes"]


MEMORY_PROBE = textwrap.dedent(
    """
    import json, math, os, sys, tempfile
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    def worker(rank, world, init, out, recipe):
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        from launcher.plan.configs import render_files
        from launcher.plan.plan import Cluster, make_plan
        from launcher.plan.recipe_file import load_recipe
        from launcher.rank.build import build_model
        from launcher.rank.parallel import deepspeed as pds

        rec = load_recipe(recipe, ['parallel.backend="deepspeed"', "parallel.deepspeed.stage=3",
                                   "parallel.deepspeed.persistence_threshold=0", "launch.gpus=2"])
        plan = make_plan(rec, Cluster())
        run = tempfile.mkdtemp()
        for name, text in render_files(rec, plan, run, "LlamaDecoderLayer").items():
            open(os.path.join(run, name), "w").write(text)
        units = []
        orig = pds.load_units
        def spy(root):  # records the size of every unit as it is about to be filled
            got = orig(root)
            units.extend(sum(p.numel() * p.element_size() for p in u.parameters(recurse=r)) for u, r in got)
            return got
        pds.load_units = spy
        device = torch.device("cpu")
        full = build_model(rec, device)  # the unsharded path (backend none, ZeRO-2)
        part = build_model(rec, device, materializer=pds.zero3_materializer(run, plan.dist_backend))
        bad = [n for n, p in part.loss_model.named_parameters()
               if p.data.numel() != 0 or p.ds_tensor.numel() != math.ceil(p.ds_numel / world)]
        mine = {**pds.partitioned_bytes(part.loss_model), "bad": bad}
        engine = pds.DeepSpeedEngine(part, rec, plan, 1, device, run)
        # ZeRO-3 hooks (ds_id) on the decoder layers themselves, none on a module inside one.
        layers = list(part.causal_lm.model.layers)
        mine["hooked_layers"] = sum(hasattr(m, "ds_id") for m in layers)
        mine["hooked_inside"] = sum(hasattr(m, "ds_id") for l in layers for m in l.modules() if m is not l)
        ids = torch.randint(3, 500, (2, 32), generator=torch.Generator().manual_seed(rank))
        pos = torch.arange(32).expand(2, 32)
        with torch.no_grad():
            s, n = engine.model(ids, ids, pos)
            s_full, n_full = full.loss_model(ids, ids, pos)
        mine["loss"], mine["loss_full"] = float(s / n), float(s_full / n_full)
        ranks = [None] * world
        dist.all_gather_object(ranks, mine)
        if rank == 0:
            res = {"full": pds.partitioned_bytes(full.loss_model), "ranks": ranks, "max_unit_bytes": max(units)}
            open(out, "w").write(json.dumps(res))
        # As qlaunch's ranks end (launcher.rank.worker.leave): a teardown of gloo and DeepSpeed's comm threads at
        # exit aborted this probe once ("terminate called without an active exception").
        from launcher.rank.worker import leave
        leave(0)

    if __name__ == "__main__":
        out = tempfile.mktemp()
        mp.spawn(worker, args=(2, "file://" + tempfile.mktemp(), out, sys.argv[1]), nprocs=2)
        print(open(out).read())
    """
)


def run_python(code: str, tmp: Path) -> str:
    """Run a probe script (2 ranks via torch.multiprocessing) on BASE_RECIPE; returns its stdout."""
    import subprocess
    import sys

    script, recipe = tmp / "probe.py", tmp / "r.toml"
    script.write_text(code)
    recipe.write_text(BASE_RECIPE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(script), str(recipe)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


# ------------------------------------------------------------------ bad input


def check_error(tmp_path: Path, *args: str, expect: list[str], env: dict | None = None) -> str:
    r = run_cli(*args, "--set", f'log.runs_dir="{tmp_path / "runs"}"', cwd=tmp_path, env=env)
    return assert_one_line_error(r, expect, tmp_path / "runs")


def test_unknown_zero_stage(tmp_path, recipe_file):
    check_error(
        tmp_path, "run", str(recipe_file()), "--set", DS, "--set", "parallel.deepspeed.stage=1",
        expect=["parallel.deepspeed.stage = 1", "2 or 3"],
    )  # fmt: skip


def test_param_offload_needs_stage3(tmp_path, recipe_file):
    check_error(
        tmp_path, "run", str(recipe_file()), *sets(*ZERO2, "parallel.deepspeed.offload_params=true"),
        expect=["parallel.deepspeed.offload_params needs parallel.deepspeed.stage = 3"],
    )  # fmt: skip


HIDE_DEEPSPEED = textwrap.dedent(
    """
    # An environment without DeepSpeed: the path finder no longer finds it, exactly as if it were not
    # installed (find_spec gives None, import raises ModuleNotFoundError; other packages' probes see the same).
    import importlib.machinery
    import sys

    class _WithoutDeepSpeed(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.partition(".")[0] == "deepspeed":
                return None
            return super().find_spec(name, path, target)

    sys.meta_path[:] = [_WithoutDeepSpeed if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    """
)


def test_deepspeed_missing(tmp_path, recipe_file):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HIDE_DEEPSPEED)
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(hook)])}
    msg = check_error(
        tmp_path, "run", str(recipe_file()), "--set", DS, env=env,
        expect=["parallel.backend = 'deepspeed'", "DeepSpeed is not installed", "parallel.backend = 'fsdp'"],
    )  # fmt: skip
    assert "pip install" in msg
    # Rendering the configs needs no DeepSpeed (e.g. on a login node without it).
    r = run_cli("config", str(recipe_file()), "--set", DS, "-o", str(tmp_path / "cfg"), env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
