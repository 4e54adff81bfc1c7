"""DeepSpeed (ZeRO-2/3) checkpoints and exact resume, through real `qlaunch run` processes (2 gloo ranks).

The checkpoint directory keeps qlaunch's protocol (step_N.tmp -> step_N -> COMPLETE, meta.json, RNG files);
inside it, DeepSpeed's own files: each rank writes its optimizer partition, nothing is gathered to one rank.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import BASE_RECIPE, run_cli, sigterm_after_step
from tests.test_checkpoint import adapter, metrics, only_run

pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed")

RECIPE = BASE_RECIPE.replace("max_steps = 2", "max_steps = 8").replace("lr = 1e-3", "lr = 2e-3")
DS = 'parallel.backend="deepspeed"'
STAGES = {
    "zero2": [DS, "parallel.deepspeed.stage=2"],
    # persistence_threshold = 0: every parameter is partitioned, so every one goes through the partitioned path.
    "zero3": [DS, "parallel.deepspeed.stage=3", "parallel.deepspeed.persistence_threshold=0"],
}


def sets(*overrides: str) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


def steps(run: Path) -> dict[int, tuple[float, float, float]]:
    """step -> (loss, lr, grad_norm) from rank 0's metrics."""
    return {m["step"]: (m["loss"], m["lr"], m["grad_norm"]) for m in metrics(run) if m["event"] == "step"}


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("dsrec") / "r.toml"
    p.write_text(RECIPE)
    return p


@pytest.fixture(scope="module", params=sorted(STAGES))
def uninterrupted(request, tmp_path_factory, recipe_path) -> tuple[str, Path]:
    """8 steps with a checkpoint every 4 (warmup-free cosine over 8 steps: the lr changes at every step)."""
    stage = request.param
    root = tmp_path_factory.mktemp(f"full-{stage}")
    r = run_cli("run", str(recipe_path), *sets(f'log.runs_dir="{root}"', *STAGES[stage], "checkpoint.every_steps=4"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return stage, only_run(root)


def test_resume_from_step_4_reproduces_the_uninterrupted_run(tmp_path, recipe_path, uninterrupted):
    """Steps 5..8 after `--resume RUN/checkpoints/step_00000004` are bitwise those of the uninterrupted run
    (same data, same arithmetic on CPU: weights, AdamW moments, step counts and the lr schedule all come back
    exactly), and so is the exported adapter."""
    stage, full = uninterrupted
    ckpt = full / "checkpoints" / "step_00000004"
    assert (ckpt / "COMPLETE").is_file()
    r = run_cli("run", str(recipe_path), *sets(f'log.runs_dir="{tmp_path}"', *STAGES[stage]), "--resume", str(ckpt))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    resumed = only_run(tmp_path)
    assert [m["step"] for m in metrics(resumed) if m["event"] == "resumed"] == [4]
    want, got = steps(full), steps(resumed)
    assert sorted(got) == [5, 6, 7, 8]
    assert len({want[s][1] for s in got}) == 4  # the lr differs at every resumed step
    assert {s: got[s] for s in got} == {s: want[s] for s in got}  # loss, lr and grad norm, bitwise
    a, b = adapter(full), adapter(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a)  # lora_B starts at 0: it trained


def test_checkpoint_holds_per_rank_deepspeed_files_and_no_code(uninterrupted):
    """Each rank wrote its own optimizer partition; the module file holds only the LoRA weights (no 4-bit
    scales, no frozen weights); DeepSpeed's converter scripts are not left in the directory."""
    stage, full = uninterrupted
    ckpt = full / "checkpoints" / "step_00000004"
    files = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
    optim = [f for f in files if f.endswith("_optim_states.pt")]
    assert len(optim) == 2 and {"0", "1"} == {f.split("zero_pp_rank_")[1].split("_")[0] for f in optim}, files
    assert not any(f.endswith(".py") for f in files) and not (ckpt / "dcp").exists(), files
    assert set(json.loads((ckpt / "meta.json").read_text())["files"]) == set(files) - {"meta.json", "COMPLETE"}
    for f in files:
        if f.endswith("_model_states.pt"):
            module = torch.load(ckpt / f, weights_only=True)["module"]
            assert module and all(".lora_A." in k or ".lora_B." in k for k in module), sorted(module)[:5]


def test_deepspeed_files_are_loaded_without_unpickling_code(tmp_path, uninterrupted):
    """The loader qlaunch installs on DeepSpeed's checkpoint engine reads the real files, and refuses a file
    whose pickle would call a function (which DeepSpeed's own loader, weights_only=False, executes)."""
    from launcher.errors import UserError
    from launcher.rank.parallel.deepspeed import _tensor_only_loads

    _, full = uninterrupted

    class Engine:  # stands in for DeepSpeed's TorchCheckpointEngine: only .load is replaced
        pass

    ce = Engine()
    _tensor_only_loads(ce)
    for f in (full / "checkpoints" / "step_00000004" / "deepspeed").iterdir():
        assert isinstance(ce.load(str(f), map_location="cpu"), dict)
    marker = tmp_path / "ran"
    crafted = tmp_path / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": Touch(str(marker))}, crafted)
    with pytest.raises(UserError, match=r"refusing to unpickle \S*open"):
        ce.load(str(crafted), map_location="cpu")
    assert not marker.exists()
    torch.load(crafted, weights_only=False)  # the file does run code when fully unpickled
    assert marker.exists()


class Touch:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_sigterm_saves_a_zero3_checkpoint_exits_75_and_resume_continues(tmp_path, recipe_path):
    root = tmp_path / "runs"
    args = ["run", str(recipe_path), *sets(f'log.runs_dir="{root}"', *STAGES["zero3"], "train.max_steps=400")]
    rc, out, err, seconds = sigterm_after_step(args, root)
    assert seconds < 60
    assert rc == 75, out + err
    run = only_run(root)
    info = json.loads((run / "preempted.json").read_text())
    stopped = info["step"]
    assert (Path(info["checkpoint"]) / "COMPLETE").is_file()
    assert (Path(info["checkpoint"]) / "deepspeed").is_dir()
    r = run_cli("run", str(recipe_path), "--resume", str(run),
                *sets(f'log.runs_dir="{tmp_path / "again"}"', *STAGES["zero3"], f"train.max_steps={stopped + 2}"))  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    resumed = only_run(tmp_path / "again")
    assert [m["step"] for m in metrics(resumed) if m["event"] == "resumed"] == [stopped]
    assert sorted(steps(resumed)) == [stopped + 1, stopped + 2]


def test_resume_on_another_world_size_names_the_one_that_works(tmp_path, recipe_path, uninterrupted):
    """ZeRO's optimizer files are partitions over the ranks that wrote them: a 2-rank checkpoint resumed on 1
    rank stops with one line naming --gpus 2, not a DeepSpeed traceback."""
    stage, full = uninterrupted
    ckpt = full / "checkpoints" / "step_00000004"
    r = run_cli("run", str(recipe_path), "--gpus", "1", "--resume", str(ckpt),
                *sets(f'log.runs_dir="{tmp_path}"', *STAGES[stage]))  # fmt: skip
    assert r.returncode != 0
    assert "written by 2 ranks cannot be resumed on 1; resume with --gpus 2" in r.stdout + r.stderr, r.stdout[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
