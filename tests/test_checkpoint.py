"""Checkpoints, exact resume and fault tolerance, through real `qlaunch run` processes (2 gloo ranks), and
the pure parts (checksums, choosing what to resume from, the compatibility check) on real files."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launcher.errors import UserError
from launcher.rank.checkpoint import load, save
from launcher.rank.checkpoint_dir import (
    check_compatible,
    check_loadable,
    collect_digests,
    file_owner,
    file_sizes,
    find_resume_target,
    fingerprint,
    harmless,
    is_complete,
    newest_complete,
    sha256,
    write_own_digests,
)
from tests.conftest import BASE_RECIPE, ROOT, assert_one_line_error, run_cli, sigterm_after_step

slow = pytest.mark.slow  # the tests that spawn `qlaunch run`

RECIPE = BASE_RECIPE.replace("max_steps = 2", "max_steps = 8").replace("lr = 1e-3", "lr = 2e-3")


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def step_losses(run: Path) -> dict[int, float]:
    """step -> loss; after an elastic restart the re-run steps overwrite the first attempt's."""
    return {m["step"]: m["loss"] for m in metrics(run) if m["event"] == "step"}


def only_run(root: Path) -> Path:
    runs = sorted(root.glob("*/*/recipe.toml"))
    assert len(runs) == 1, runs
    return runs[0].parent


def _kill_tree(proc: subprocess.Popen) -> None:
    """Leave nothing running if the test fails midway (torchrun's workers live in their own sessions)."""
    if proc.poll() is None:
        subprocess.run(["pkill", "-9", "-P", str(proc.pid)], check=False)
        proc.kill()
        proc.wait()


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("rec") / "r.toml"
    p.write_text(RECIPE)
    return p


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, recipe_path) -> Path:
    """8 steps, checkpoint every 4 (so step 4 can be resumed from), nothing interrupted."""
    root = tmp_path_factory.mktemp("full")
    r = run_cli("run", str(recipe_path), "--set", f'log.runs_dir="{root}"', "--set", "checkpoint.every_steps=4")
    assert r.returncode == 0, r.stdout + r.stderr
    return only_run(root)


@slow
def test_resume_from_step_k_reproduces_the_uninterrupted_run(tmp_path, recipe_path, uninterrupted):
    ckpt = uninterrupted / "checkpoints" / "step_00000004"
    assert (ckpt / "COMPLETE").is_file()
    r = run_cli("run", str(recipe_path), "--set", f'log.runs_dir="{tmp_path}"', "--resume", str(ckpt))
    assert r.returncode == 0, r.stdout + r.stderr
    resumed = only_run(tmp_path)
    want, got = step_losses(uninterrupted), step_losses(resumed)
    assert sorted(got) == [5, 6, 7, 8]
    assert [got[s] for s in got] == [want[s] for s in got]  # bitwise on CPU: same data, same arithmetic
    a, b = adapter(uninterrupted), adapter(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@slow
def test_kill_a_rank_elastic_restart_finishes_with_the_same_adapter(tmp_path, recipe_path, uninterrupted):
    """kill -9 of rank 1 after the step-2 checkpoint: torch elastic restarts the group, the ranks resume
    from their newest complete checkpoint, and the final adapter is bitwise the uninterrupted one."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "launcher.cli", "run", str(recipe_path), "--set", f'log.runs_dir="{tmp_path}"']
    cmd += ["--set", "checkpoint.every_steps=2", "--set", "launch.max_restarts=1", "--set", "train.max_steps=8"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    killed = False
    try:
        while time.time() < deadline and proc.poll() is None and not killed:
            runs = list(tmp_path.glob("*/*/metrics.jsonl"))
            if runs and any(m["event"] == "checkpoint" for m in metrics(runs[0].parent)):
                log = (runs[0].parent / "logs" / "rank1.log").read_text()
                pid = int(re.search(r"start pid=(\d+)", log).group(1))
                os.kill(pid, signal.SIGKILL)
                killed = True
            time.sleep(0.2)
        out, _ = proc.communicate(timeout=300)
    finally:
        _kill_tree(proc)
    assert killed, out
    assert proc.returncode == 0, out
    run = only_run(tmp_path)
    assert any(m["event"] == "resumed" for m in metrics(run)), "the restarted ranks did not resume"
    a, b = adapter(uninterrupted), adapter(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert step_losses(run) == step_losses(uninterrupted)


@slow
def test_sigterm_saves_a_checkpoint_exits_75_and_resume_continues(tmp_path, recipe_path):
    root = tmp_path / "runs"
    args = ["run", str(recipe_path), "--set", f'log.runs_dir="{root}"', "--set", "train.max_steps=400"]
    rc, out, err, seconds = sigterm_after_step(args, root)
    assert seconds < 60
    assert rc == 75, out + err
    run = only_run(root)
    info = json.loads((run / "preempted.json").read_text())
    assert "--resume" in err and str(run) in err
    stopped = info["step"]
    assert (Path(info["checkpoint"]) / "COMPLETE").is_file()
    r = run_cli("run", str(recipe_path), "--set", f'log.runs_dir="{tmp_path / "again"}"', "--resume", str(run),
                "--set", f"train.max_steps={stopped + 2}")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    resumed = only_run(tmp_path / "again")
    assert [m["step"] for m in metrics(resumed) if m["event"] == "resumed"] == [stopped]
    assert sorted(step_losses(resumed)) == [stopped + 1, stopped + 2]


@slow
def test_sigusr1_to_every_process_of_the_run_checkpoints_and_exits_75(tmp_path, recipe_path):
    """SLURM's time-limit warning reaches qlaunch, torchrun and the ranks at once (the whole job step):
    torchrun must survive it while the ranks save, so the run ends as a preemption, not a failure."""
    import signal

    root = tmp_path / "runs"
    args = ["run", str(recipe_path), "--set", f'log.runs_dir="{root}"', "--set", "train.max_steps=400"]
    rc, out, err, seconds = sigterm_after_step(args, root, sig=signal.SIGUSR1, group=True)
    assert rc == 75, out + err
    info = json.loads((only_run(root) / "preempted.json").read_text())
    assert (Path(info["checkpoint"]) / "COMPLETE").is_file()


@slow
def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path, recipe_path, uninterrupted):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(uninterrupted, run)
    newest = run / "checkpoints" / "step_00000008"
    shard = next((newest / "dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:10])  # truncated file, marker still present
    r = run_cli("run", str(recipe_path), "--set", f'log.runs_dir="{tmp_path / "out"}"', "--resume", str(run))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning: skipping checkpoint step_00000008" in r.stdout and "bytes" in r.stdout
    resumed = only_run(tmp_path / "out")
    assert [m["step"] for m in metrics(resumed) if m["event"] == "resumed"] == [4]
    # A checkpoint whose COMPLETE marker is missing (interrupted save) is ignored the same way.
    (run / "checkpoints" / "step_00000004" / "COMPLETE").unlink()
    r = run_cli("run", str(recipe_path), "--set", f'log.runs_dir="{tmp_path / "out2"}"', "--resume", str(run))
    assert r.returncode == 2 and "no complete checkpoint" in r.stderr


@slow
def test_resume_refuses_a_math_change_and_allows_a_harmless_one(tmp_path, recipe_path, uninterrupted):
    r = run_cli("run", str(recipe_path), "--set", f'log.runs_dir="{tmp_path}"', "--resume", str(uninterrupted),
                "--set", "lora.rank=16")  # fmt: skip
    assert r.returncode == 2
    assert "changes the math of the run (lora.rank: 8 -> 16)" in r.stderr
    assert not tmp_path.joinpath("t").exists()
    r = run_cli("run", str(recipe_path), "--set", f'log.runs_dir="{tmp_path}"', "--resume", str(uninterrupted),
                "--set", "train.max_steps=9")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(step_losses(only_run(tmp_path))) == [9]


# ================================================================== checksums (real files, no ranks)


def _fake_checkpoint(d: Path, world: int = 2, step: int = 2, saved_at: float = 1.0, checksums: bool = True) -> Path:
    """A checkpoint directory laid out and sealed as checkpoint.save leaves it (placeholder contents)."""
    (d / "dcp").mkdir(parents=True)
    (d / "dcp" / ".metadata").write_bytes(b"m" * 10)
    for r in range(world):
        (d / "dcp" / f"__{r}_0.distcp").write_bytes(bytes(range(50 + r)))
        (d / f"rng_rank{r}.pt").write_bytes(b"r" * 8)
    reseal(d, {"step": step, "time": saved_at, "world_size": world}, checksums)
    (d / "COMPLETE").write_text("ok\n")
    return d


def reseal(d: Path, meta: dict | None = None, checksums: bool = True) -> None:
    """Record the directory's current sizes (and checksums) in meta.json, as whoever wrote it would."""
    meta = meta if meta is not None else json.loads((d / "meta.json").read_text())
    meta = {**meta, "files": file_sizes(d)}
    meta.pop("sha256", None)
    if checksums:
        meta["sha256"] = collect_digests(d)
    (d / "meta.json").write_text(json.dumps(meta))


def flip_a_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))  # same size: only a checksum tells


def test_each_rank_hashes_the_files_it_wrote_and_rank_0_the_rest(tmp_path):
    assert [file_owner(n) for n in ("dcp/__3_0.distcp", "rng_rank2.pt", "python_rng_rank1.json",
            "deepspeed/bf16_zero_pp_rank_5_mp_rank_00_optim_states.pt", "dcp/.metadata",
            "deepspeed/mp_rank_00_model_states.pt")] == [3, 2, 1, 5, 0, 0]  # fmt: skip
    d = _fake_checkpoint(tmp_path / "step_00000002")
    (d / "meta.json").unlink()
    write_own_digests(d, 1)
    own = json.loads((d / ".sha256_rank1.json").read_text())
    assert sorted(own) == ["dcp/__1_0.distcp", "rng_rank1.pt"]
    # Rank 0 takes rank 1's digests as they are (it does not read those files again) and hashes the rest.
    (d / ".sha256_rank1.json").write_text(json.dumps({**own, "rng_rank1.pt": "from-rank-1"}))
    digests = collect_digests(d)
    assert digests["rng_rank1.pt"] == "from-rank-1" and not list(d.glob(".sha256_rank*"))
    assert digests["dcp/__0_0.distcp"] == sha256(d / "dcp" / "__0_0.distcp")
    assert sorted(digests) == sorted(file_sizes(d))


def test_same_size_corruption_is_found_by_the_checksum_and_resume_falls_back(tmp_path):
    root = tmp_path / "checkpoints"
    older = _fake_checkpoint(root / "step_00000002", step=2)
    newer = _fake_checkpoint(root / "step_00000004", step=4)
    flip_a_byte(newer / "dcp" / "__1_0.distcp")
    ok, why = is_complete(newer)
    assert not ok and why.startswith("dcp/__1_0.distcp does not match the checksum"), why
    assert is_complete(newer, checksums=False) == (True, "")  # prune's cheap check: sizes only
    warnings: list[str] = []
    assert newest_complete(root, warn=warnings.append) == older
    assert warnings == [f"warning: skipping checkpoint step_00000004: {why}"]
    # Named explicitly: one line, no fallback.
    with pytest.raises(UserError, match=r"not a usable checkpoint \(dcp/__1_0.distcp does not match the checksum"):
        find_resume_target(str(newer), tmp_path, "t")
    # A checkpoint written before checksums were recorded keeps working on its sizes alone.
    reseal(newer, checksums=False)
    assert is_complete(newer) == (True, "")


def test_meta_json_cannot_point_a_resume_at_other_files(tmp_path):
    """meta.json is data from the checkpoint directory: its file list may not leave the directory, name a
    link, a FIFO or a device (which would hang the checksum), or claim an absurd world size."""
    outside = tmp_path / "secret"
    outside.write_bytes(b"SECRET")
    d = _fake_checkpoint(tmp_path / "ck" / "step_00000002")
    good = json.loads((d / "meta.json").read_text())
    os.mkfifo(d / "fifo")
    (d / "link").symlink_to(outside)
    cases = {
        "../../secret": "'files' is not a map of file names inside the checkpoint",
        str(outside): "'files' is not a map of file names inside the checkpoint",
        "fifo": "fifo is not a regular file",
        "link": "link is not a regular file",
    }
    for name, why in cases.items():
        (d / "meta.json").write_text(json.dumps({**good, "files": {name: 6}}))
        ok, got = is_complete(d)
        assert not ok and why in got and "SECRET" not in got, (name, got)
        (d / "meta.json").write_text(json.dumps({**good, "sha256": {name: "0" * 64}}))
        ok, got = is_complete(d)
        assert not ok and (why.replace("'files' is not a map of file names", "'sha256' is not a map of file names")
                           if "map" in why else why) in got, (name, got)  # fmt: skip
    for bad in ({"world_size": 10**12}, {"world_size": "2"}, {"files": []}):
        (d / "meta.json").write_text(json.dumps({**good, **bad}))
        assert not is_complete(d)[0], bad
    (d / "meta.json").write_text("[1, 2]")
    assert is_complete(d) == (False, "meta.json is not a JSON object")


def test_resume_auto_warns_about_every_checkpoint_it_skips_and_fails_when_none_is_usable(tmp_path):
    runs = tmp_path / "runs"
    a2 = _fake_checkpoint(runs / "t" / "20260101-000000" / "checkpoints" / "step_00000002", saved_at=1.0)
    a4 = _fake_checkpoint(runs / "t" / "20260101-000000" / "checkpoints" / "step_00000004", saved_at=2.0)
    b6 = _fake_checkpoint(runs / "t" / "4242" / "checkpoints" / "step_00000006", saved_at=3.0)  # a SLURM job id
    (b6 / "COMPLETE").unlink()  # interrupted while saving
    flip_a_byte(a4 / "rng_rank0.pt")
    warnings: list[str] = []
    assert find_resume_target("auto", runs, "t", warn=warnings.append) == a2.resolve()
    assert warnings == [
        "warning: skipping checkpoint 4242/step_00000006: no COMPLETE marker (interrupted while saving)",
        "warning: skipping checkpoint 20260101-000000/step_00000004: rng_rank0.pt does not match the checksum "
        "recorded when it was saved (corrupted since)",
    ]
    (a2 / "dcp" / "__0_0.distcp").write_bytes(b"short")
    with pytest.raises(UserError) as info:
        find_resume_target("auto", runs, "t", warn=lambda _m: None)
    msg = str(info.value)
    assert msg.startswith(f"--resume auto: 3 checkpoint(s) of t under {runs / 't'}, none usable: 4242/step_00000006 (")
    assert "20260101-000000/step_00000004 (rng_rank0.pt does not match" in msg
    assert "20260101-000000/step_00000002 (dcp/__0_0.distcp has 5 bytes, 50 were written)" in msg
    # No checkpoint at all (a job requeued before its first one): start from step 0.
    assert find_resume_target("auto", tmp_path / "empty", "t") is None
    (runs / "t" / "999" / "checkpoints" / "step_00000002.tmp").mkdir(parents=True)
    assert find_resume_target("auto", tmp_path / "empty", "t") is None


def test_resume_from_a_run_with_no_usable_checkpoint_says_why_for_each(tmp_path):
    run = tmp_path / "run"
    d = _fake_checkpoint(run / "checkpoints" / "step_00000002")
    flip_a_byte(d / "dcp" / ".metadata")
    with pytest.raises(UserError, match=r"the run has no complete checkpoint \(step_00000002 \(dcp/.metadata does"):
        find_resume_target(str(run), tmp_path, "t", warn=lambda _m: None)
    (tmp_path / "fresh" / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match=r"no complete checkpoint \(it saved none; set checkpoint.every_steps\)"):
        find_resume_target(str(tmp_path / "fresh"), tmp_path, "t")


# ================================================================== what a resume may change (pure)


def _recipe(tmp_path: Path, *overrides: str):
    from launcher.plan.recipe_file import load_recipe

    p = tmp_path / "r.toml"
    p.write_text(RECIPE)
    return load_recipe(p, list(overrides))


def _saved(tmp_path: Path, fingerprint: dict) -> Path:
    d = tmp_path / "ck"
    d.mkdir(exist_ok=True)
    (d / "meta.json").write_text(json.dumps({"step": 4, "fingerprint": fingerprint}))
    return d


def test_every_key_changes_the_math_except_the_documented_harmless_ones(tmp_path):
    base = _recipe(tmp_path)
    ck = _saved(tmp_path, json.loads(json.dumps(fingerprint(base))))  # as meta.json holds it
    assert not any(harmless(k) for k in fingerprint(base))
    refused = {
        "data.val_fraction=0.1": "data.val_fraction: 0.0 -> 0.1",
        'data.chat_template="{{ messages }}"': "data.chat_template: None -> '{{ messages }}'",
        'data.output_column="answer"': "data.output_column: 'output' -> 'answer'",
        f'model.tokenizer="{ROOT / "assets" / "tiny-llama"}"': "model.tokenizer: None -> ",
        "lora.rank=16": "lora.rank: 8 -> 16",
        "train.lr=1e-4": "train.lr: 0.002 -> 0.0001",
        'parallel.backend="none"': "parallel.backend: 'fsdp' -> 'none'",
    }
    for override, detail in refused.items():
        with pytest.raises(UserError, match="changes the math of the run") as info:
            check_compatible(ck, _recipe(tmp_path, override))
        assert f"({detail}" in str(info.value), (override, str(info.value))
    allowed = ["train.max_steps=100", "train.micro_batch=1", "train.gradient_checkpointing=false", "train.eval_every=5",
               "train.compile=false", "checkpoint.every_steps=3", "launch.gpus=1", "log.every_steps=7", 'name="other"',
               "parallel.fsdp.cpu_offload=true", "parallel.deepspeed.offload_optimizer=true"]  # fmt: skip
    for override in allowed:
        check_compatible(ck, _recipe(tmp_path, override))
    with pytest.raises(UserError) as info:  # up to three changes named, the rest counted
        check_compatible(
            ck, _recipe(tmp_path, "lora.rank=4", "lora.alpha=4", "train.seed=3", "data.seq_len=32", "train.lr=1.0")
        )
    assert str(info.value).count(" -> ") == 3 and "; and 2 more)" in str(info.value)


# The fingerprint qlaunch wrote before it covered the whole recipe (whole sections for quant and lora).
OLD_MATH_KEYS = ("model.path", "model.init", "model.dtype", "quant", "lora", "data.datasets", "data.format",
                 "data.seq_len", "data.packing", "data.overlong", "data.train_on_prompt", "train.global_batch",
                 "train.lr", "train.schedule", "train.warmup_steps", "train.min_lr_ratio", "train.weight_decay",
                 "train.betas", "train.grad_clip", "train.seed", "parallel.backend")  # fmt: skip


def test_a_checkpoint_with_the_old_fingerprint_still_resumes_when_nothing_changed(tmp_path):
    from launcher.plan.recipe import recipe_to_dict

    base = _recipe(tmp_path)
    d = recipe_to_dict(base)
    old = {}
    for key in OLD_MATH_KEYS:
        cur = d
        for part in key.split("."):
            cur = cur[part]
        old[key] = cur
    ck = _saved(tmp_path, json.loads(json.dumps(old)))
    check_compatible(ck, base)
    check_compatible(ck, _recipe(tmp_path, "data.val_fraction=0.1"))  # not recorded then
    with pytest.raises(UserError, match=r"\(lora.rank: 8 -> 16\)"):
        check_compatible(ck, _recipe(tmp_path, "lora.rank=16"))


# ================================================================== through the CLI (real checkpoints)


def _copy_run(uninterrupted: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(uninterrupted, dest)
    return dest


def _crafted_metadata(flag: Path) -> bytes:
    """Protocol 4: os.system('touch FLAG') reached by a dotted name through a DCP module."""
    mod, name, cmd = (s.encode() for s in ("torch.distributed.checkpoint.filesystem", "os.system", f"touch {flag}"))
    return b"\x80\x04\x8c%c%s\x8c%c%s\x93\x8c%c%s\x85R." % (len(mod), mod, len(name), name, len(cmd), cmd)


@slow
def test_checkpoints_record_every_files_checksum(uninterrupted):
    for ckpt in (uninterrupted / "checkpoints").iterdir():
        meta = json.loads((ckpt / "meta.json").read_text())
        assert sorted(meta["sha256"]) == sorted(meta["files"]) and not list(ckpt.glob(".sha256_rank*"))
        assert all(sha256(ckpt / name) == digest for name, digest in meta["sha256"].items())
        assert {"dcp/__0_0.distcp", "dcp/__1_0.distcp", "dcp/.metadata", "rng_rank1.pt"} <= set(meta["sha256"])


@slow
def test_same_size_corruption_falls_back_or_is_refused_in_one_line(tmp_path, recipe_path, uninterrupted):
    run = _copy_run(uninterrupted, tmp_path / "copy")
    flip_a_byte(next((run / "checkpoints" / "step_00000008" / "dcp").glob("*.distcp")))
    out = tmp_path / "out"
    r = run_cli("run", str(recipe_path), "--set", f'log.runs_dir="{out}"', "--resume", str(run))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning: skipping checkpoint step_00000008: dcp/__" in r.stdout and "checksum" in r.stdout
    assert [m["step"] for m in metrics(only_run(out)) if m["event"] == "resumed"] == [4]
    assert step_losses(only_run(out)) == {s: v for s, v in step_losses(uninterrupted).items() if s > 4}
    # Named explicitly, the corrupt checkpoint is an error, found before anything is written.
    r = run_cli("run", str(recipe_path), "--set", f'log.runs_dir="{tmp_path / "out2"}"',
                "--resume", str(run / "checkpoints" / "step_00000008"))  # fmt: skip
    assert_one_line_error(r, ["not a usable checkpoint (dcp/__", "does not match the checksum"], tmp_path / "out2")


@slow
def test_resume_auto_with_no_usable_checkpoint_fails_in_one_line(tmp_path, recipe_path, uninterrupted):
    runs = tmp_path / "runs"
    run = _copy_run(uninterrupted, runs / "t" / "20260101-000000")
    flip_a_byte(run / "checkpoints" / "step_00000008" / "rng_rank1.pt")
    (run / "checkpoints" / "step_00000004" / "COMPLETE").unlink()
    r = run_cli("run", str(recipe_path), "--set", f'log.runs_dir="{runs}"', "--resume", "auto")
    assert_one_line_error(r, ["--resume auto: 2 checkpoint(s) of t", "none usable",
                              "20260101-000000/step_00000008 (rng_rank1.pt does not match the checksum",
                              "20260101-000000/step_00000004 (no COMPLETE marker"], tmp_path / "nothing")  # fmt: skip
    assert "warning: skipping checkpoint 20260101-000000/step_00000008" in r.stdout
    assert sorted(p.name for p in (runs / "t").iterdir()) == ["20260101-000000"]  # no run directory written


@slow
def test_crafted_metadata_through_the_cli_is_one_line_and_never_runs(tmp_path, recipe_path, uninterrupted):
    """The launching process checks the metadata of the checkpoint it resumes from before any rank starts;
    the ranks check what they load themselves (here: the run's own newer checkpoint, which they prefer)."""
    flag = tmp_path / "PWNED"
    run = _copy_run(uninterrupted, tmp_path / "copy")
    newest = run / "checkpoints" / "step_00000008"
    (newest / "dcp" / ".metadata").write_bytes(_crafted_metadata(flag))
    out = tmp_path / "out"
    r = run_cli("run", str(recipe_path), "--set", f'log.runs_dir="{out}"', "--resume", str(newest), cwd=tmp_path)
    assert_one_line_error(r, ["not a usable checkpoint (dcp/.metadata has"], out)  # meta.json not rewritten
    reseal(newest)  # the author of a crafted directory rewrites meta.json too
    r = run_cli("run", str(recipe_path), "--set", f'log.runs_dir="{out}"', "--resume", str(newest), cwd=tmp_path)
    assert_one_line_error(r, [f"checkpoint metadata {newest / 'dcp' / '.metadata'}: refusing to unpickle it"], out)
    assert not flag.exists()
    # The ranks: a run directory reused for a resume holds the crafted checkpoint, which the ranks prefer
    # (an elastic restart resumes from its own run's newest) over the checked --resume target.
    r = run_cli("run", str(recipe_path), "--run-dir", str(run), "--resume", str(run / "checkpoints" / "step_00000004"),
                "--set", "train.max_steps=9", cwd=tmp_path)  # fmt: skip
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert lines == [f"qlaunch: error: checkpoint metadata {newest / 'dcp' / '.metadata'}: refusing to unpickle it: "
                     "it names a global that is not a DCP metadata class or torch value type (nothing in it was run; "
                     "qlaunch resumes only from metadata as DCP writes it)"], r.stderr  # fmt: skip
    assert not flag.exists() and not (tmp_path / "PWNED").exists()


# ================================================================== what a resume reads (a real DCP checkpoint)


def _engine(tmp_path: Path, width: int = 4):
    from torch import nn

    from launcher.rank.parallel.torch_engine import TorchEngine

    torch.manual_seed(0)
    engine = TorchEngine(nn.Sequential(nn.Linear(width, 4)), _recipe(tmp_path), total_steps=8, device_type="cpu")
    engine.model(torch.ones(2, width)).sum().backward()
    engine.step()  # so the optimizer has state to save
    return engine


@pytest.fixture
def real_ckpt(tmp_path) -> Path:
    """A checkpoint as checkpoint.save writes it (one process: torch DCP, RNG files, sealed meta.json)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP: "torch.distributed is disabled ... single process"
        return save(tmp_path / "run" / "checkpoints", 2, _engine(tmp_path), _recipe(tmp_path), {}, 3)


class _Hang(Exception):
    pass


def _no_hang(fn, *args, seconds: int = 10):
    """fn(*args), failing the test (instead of hanging it) if it blocks, e.g. opening a FIFO."""

    def alarm(_signum, _frame):
        raise _Hang(f"{fn.__name__} blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        return fn(*args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _unlist(d: Path, name: str) -> None:
    meta = json.loads((d / "meta.json").read_text())
    for key in ("files", "sha256"):
        meta[key].pop(name)
    (d / "meta.json").write_text(json.dumps(meta))


def _rehash(d: Path, name: str) -> None:
    """What a tamperer does after changing a file: record its new size and checksum."""
    meta = json.loads((d / "meta.json").read_text())
    meta["files"][name] = (d / name).stat().st_size
    meta["sha256"][name] = sha256(d / name)
    (d / "meta.json").write_text(json.dumps(meta))


def _edit_meta(d: Path, edit) -> None:
    meta = json.loads((d / "meta.json").read_text())
    edit(meta)
    (d / "meta.json").write_text(json.dumps(meta))


def test_a_real_checkpoint_passes_every_check_and_loads(real_ckpt, tmp_path):
    assert is_complete(real_ckpt) == (True, "")
    check_loadable(real_ckpt)
    check_compatible(real_ckpt, _recipe(tmp_path))
    assert load(real_ckpt, _engine(tmp_path))["step"] == 2


def test_a_meta_json_fifo_never_hangs_a_resume(real_ckpt, tmp_path):
    """Finding 3: meta.json that is a FIFO, in a checkpoint that is otherwise complete."""
    (real_ckpt / "meta.json").unlink()
    os.mkfifo(real_ckpt / "meta.json")
    assert _no_hang(is_complete, real_ckpt) == (
        False,
        "meta.json is not a regular file (a link, a directory or a device)",
    )
    run = real_ckpt.parent.parent
    for arg in (str(real_ckpt), str(run)):
        with pytest.raises(UserError, match="meta.json is not a regular file"):
            _no_hang(find_resume_target, arg, tmp_path, "t", lambda _m: None)
    auto_root = tmp_path / "runs"
    (auto_root / "t").mkdir(parents=True)
    (auto_root / "t" / "20260101-000000").symlink_to(run)  # a runs_dir may be reached through links
    with pytest.raises(UserError, match=r"none usable: 20260101-000000/step_00000002 \(meta.json is not a regular"):
        _no_hang(find_resume_target, "auto", auto_root, "t", lambda _m: None)


@pytest.mark.parametrize("name", ["python_rng_rank0.json", "rng_rank0.pt"])
def test_an_unlisted_or_irregular_rank_file_is_refused_never_loaded(real_ckpt, tmp_path, name):
    """Findings 4 and 11: a rank file dropped from meta.json and replaced by a FIFO or a link out of the
    checkpoint; and with checksums present, any file meta.json does not list."""
    outside = tmp_path / "outside"
    outside.write_bytes((real_ckpt / name).read_bytes())  # a valid file: only where it lies is wrong
    _unlist(real_ckpt, name)
    (real_ckpt / name).unlink()
    for plant, why in (
        (os.mkfifo, "is not a regular file"),
        (lambda p: p.symlink_to(outside), "is not a regular file"),
    ):
        plant(real_ckpt / name)
        ok, got = _no_hang(is_complete, real_ckpt)
        assert not ok and got == f"{name} {why} (a link, a directory or a device)", got
        with pytest.raises(UserError, match=f"{name} {why}"):
            _no_hang(load, real_ckpt, _engine(tmp_path))  # the ranks check too
        (real_ckpt / name).unlink()
    # A regular file, but not listed: refused (the ranks would load it unverified).
    (real_ckpt / name).write_bytes(outside.read_bytes())
    ok, got = is_complete(real_ckpt)
    assert not ok and got == f"{name} is not listed in meta.json (a file without a recorded checksum is never loaded)"
    with pytest.raises(UserError, match=f"{name} is not listed in meta.json"):
        load(real_ckpt, _engine(tmp_path))
    # Also an extra file anywhere else in it, and a link to a directory.
    _rehash(real_ckpt, name)
    assert is_complete(real_ckpt) == (True, "")
    (real_ckpt / "dcp" / "__7_0.distcp").write_bytes(b"x")
    assert is_complete(real_ckpt)[1].startswith("dcp/__7_0.distcp is not listed in meta.json")
    (real_ckpt / "dcp" / "__7_0.distcp").unlink()
    (real_ckpt / "extra").symlink_to(tmp_path)
    assert is_complete(real_ckpt)[1] == "extra is a link (a checkpoint is read only where it was written)"


def test_a_checkpoint_directory_that_is_a_link_is_refused(real_ckpt, tmp_path):
    """Finding 10: checkpoints/step_N -> a copy elsewhere; a resume from the run never leaves the run."""
    import shutil

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(real_ckpt, elsewhere)
    assert is_complete(elsewhere) == (True, "")
    root = real_ckpt.parent
    (root / "step_00000006").symlink_to(elsewhere)
    warnings: list[str] = []
    run = root.parent
    assert find_resume_target(str(run), tmp_path, "t", warn=warnings.append) == real_ckpt.resolve()
    assert warnings == [
        "warning: skipping checkpoint step_00000006: the checkpoint directory is a link "
        "(a checkpoint is read only where it was written)"
    ]
    assert newest_complete(root, warn=lambda _m: None) == real_ckpt  # the ranks' own choice
    with pytest.raises(UserError, match=f"directory is a link; .* only where it lies \\(name {elsewhere} itself"):
        find_resume_target(str(root / "step_00000006"), tmp_path, "t")
    # A link inside it (dcp/ -> the copy's) is refused the same way.
    shutil.rmtree(real_ckpt / "dcp")
    (real_ckpt / "dcp").symlink_to(elsewhere / "dcp")
    assert not is_complete(real_ckpt)[0]
    with pytest.raises(UserError, match="the run has no complete checkpoint"):
        find_resume_target(str(run), tmp_path, "t", warn=lambda _m: None)
    # A run whose checkpoints/ is a link to another run's.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "checkpoints").symlink_to(elsewhere.parent / "run" / "checkpoints")
    with pytest.raises(UserError, match="checkpoints is a link; a run's checkpoints are read only where it wrote"):
        find_resume_target(str(tmp_path / "other"), tmp_path, "t")


def test_a_missing_or_malformed_fingerprint_is_incompatible(real_ckpt, tmp_path):
    """Finding 17: no fingerprint used to compare nothing and call any recipe compatible."""
    for edit, why in (
        (lambda m: m.pop("fingerprint"), "meta.json has no recipe fingerprint object"),
        (lambda m: m.update(fingerprint=[1]), "meta.json has no recipe fingerprint object"),
        (lambda m: m.update(fingerprint={}), "fingerprint lacks model.path, lora, train.lr, train.seed"),
        (lambda m: m["fingerprint"].pop("train.lr"), "meta.json's recipe fingerprint lacks train.lr,"),
    ):
        fresh = json.loads((real_ckpt / "meta.json").read_text())
        edit(fresh)
        (real_ckpt / "meta.json").write_text(json.dumps(fresh))
        for recipe in (_recipe(tmp_path), _recipe(tmp_path, "lora.rank=4")):
            with pytest.raises(UserError, match=re.escape(why)) as info:
                check_compatible(real_ckpt, recipe)
            assert "cannot be checked against the recipe" in str(info.value)
        save(real_ckpt.parent, 2, _engine(tmp_path), _recipe(tmp_path), {}, 3)  # restore


def _system_pickle(flag: Path) -> bytes:
    """Protocol 0: os.system('touch FLAG') by GLOBAL + REDUCE, what plain pickle.load would run."""
    return b"cposix\nsystem\n(V" + f"touch {flag}".encode() + b"\ntR."


def test_loading_turns_any_read_unpickle_or_shape_error_into_one_line(real_ckpt, tmp_path):
    """Finding 17: tampered files (checksums rewritten) failed in the ranks with tracebacks (exit 1)."""
    flag = tmp_path / "PWNED"
    rng = real_ckpt / "rng_rank0.pt"
    good = rng.read_bytes()
    rng.write_bytes(_system_pickle(flag))
    _rehash(real_ckpt, "rng_rank0.pt")
    for check in (check_loadable, lambda d: load(d, _engine(tmp_path))):
        with pytest.raises(UserError, match=r"rank 0's RNG state is not one qlaunch wrote \(UnpicklingError\)"):
            check(real_ckpt)
    assert not flag.exists()
    # The same in protocol 4, which torch.load warns about on stderr (a second line): no warning escapes.
    import pickle
    import warnings

    class System:
        def __reduce__(self):
            return (os.system, (f"touch {flag}",))

    rng.write_bytes(pickle.dumps({"torch": System()}, protocol=4))
    _rehash(real_ckpt, "rng_rank0.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserError, match=r"rank 0's RNG state is not one qlaunch wrote \(UnpicklingError\)"):
            check_loadable(real_ckpt)
    assert not flag.exists()
    rng.write_bytes(good)
    _rehash(real_ckpt, "rng_rank0.pt")
    # The weights into a model of another shape, and a shard whose bytes are gone: one line each.
    with pytest.raises(UserError, match=r"its weights or optimizer state do not load into this run \(\w+"):
        load(real_ckpt, _engine(tmp_path, width=8))
    # One tensor's bytes in the shard replaced by a pickle that calls os.system (same length, checksum fixed).
    from launcher.rank import safe_dcp

    storage = safe_dcp.read_metadata(real_ckpt / "dcp").storage_data
    info = next(v for k, v in storage.items() if k.fqn == "model.0.weight")
    shard = real_ckpt / "dcp" / info.relative_path
    data = bytearray(shard.read_bytes())
    data[info.offset : info.offset + info.length] = _system_pickle(flag).ljust(info.length, b"\0")
    shard.write_bytes(bytes(data))
    _rehash(real_ckpt, f"dcp/{info.relative_path}")
    with pytest.raises(UserError) as before_spawning:
        check_loadable(real_ckpt)  # the launching process finds it too
    with pytest.raises(UserError) as err:
        load(real_ckpt, _engine(tmp_path))
    assert (
        str(before_spawning.value)
        == str(err.value)
        == (
            f"checkpoint {real_ckpt / 'dcp'}: {info.relative_path} does not load (UnpicklingError): the shard is damaged "
            "or not as DCP writes it (nothing in it was run)"
        )
    )
    assert not flag.exists()


def test_what_the_ranks_would_refuse_is_found_before_spawning(real_ckpt):
    """Finding 20: these failed only in the ranks, after the run directory was written."""
    cases = [
        (lambda d: _edit_meta(d, lambda m: m.update(step="4")), "meta.json has no step number"),
        (lambda d: _edit_meta(d, lambda m: m["scheduler"].update(lr_lambdas=["x"])), "'scheduler' is not the state"),
        (lambda d: _edit_meta(d, lambda m: m["scheduler"].update(last_epoch="1")), "'scheduler' is not the state"),
        (lambda d: _edit_meta(d, lambda m: m.pop("scheduler")), "'scheduler' is not the state"),
        (
            lambda d: (
                (d / "python_rng_rank0.json").write_text("[3, [1, 2, 3], null]"),
                _rehash(d, "python_rng_rank0.json"),
            ),
            "rank 0's RNG state is not one qlaunch wrote (ValueError)",
        ),
        (
            lambda d: ((d / "python_rng_rank0.json").write_text("[[[[" * 10000), _rehash(d, "python_rng_rank0.json")),
            "rank 0's RNG state is not one qlaunch wrote",
        ),
    ]
    meta, py = (real_ckpt / "meta.json").read_bytes(), (real_ckpt / "python_rng_rank0.json").read_bytes()
    for tamper, why in cases:
        tamper(real_ckpt)
        with pytest.raises(UserError, match=re.escape(why)):
            check_loadable(real_ckpt)
        (real_ckpt / "meta.json").write_bytes(meta)
        (real_ckpt / "python_rng_rank0.json").write_bytes(py)
    check_loadable(real_ckpt)
    import shutil

    shutil.rmtree(real_ckpt / "dcp")
    _edit_meta(
        real_ckpt, lambda m: [m[k].pop(n) for k in ("files", "sha256") for n in list(m[k]) if n.startswith("dcp/")]
    )
    assert is_complete(real_ckpt) == (
        False,
        "neither dcp/ nor deepspeed/ is there (the weights and optimizer state are missing)",
    )


@slow
def test_tampered_checkpoints_are_one_line_before_spawning_or_in_the_ranks(tmp_path, recipe_path, uninterrupted):
    """Findings 17 and 20 through the CLI, checksums rewritten as a tamperer would: what can be checked
    before spawning is (no run directory); what only a rank can find (a shard's tensor bytes replaced by
    a pickle) is one line, exit 2, and nothing in it runs."""
    from launcher.rank import safe_dcp

    flag = tmp_path / "PWNED"
    run = _copy_run(uninterrupted, tmp_path / "copy")
    step4, step8 = run / "checkpoints" / "step_00000004", run / "checkpoints" / "step_00000008"
    out = tmp_path / "out"
    (step4 / "python_rng_rank1.json").write_text("[3, [1, 2, 3], null]")
    _rehash(step4, "python_rng_rank1.json")
    r = run_cli("run", str(recipe_path), "--set", f'log.runs_dir="{out}"', "--resume", str(step4))
    assert_one_line_error(r, [f"checkpoint {step4}: rank 1's RNG state is not one qlaunch wrote (ValueError)"], out)
    _edit_meta(step8, lambda m: m.pop("fingerprint"))
    r = run_cli(
        "run", str(recipe_path), "--set", f'log.runs_dir="{out}"', "--set", "lora.rank=4", "--resume", str(step8)
    )
    assert_one_line_error(r, [f"--resume {step8}: meta.json has no recipe fingerprint object"], out)
    # The ranks prefer the run's own newest checkpoint (an elastic restart) over the checked --resume target.
    _edit_meta(step8, lambda m: m.update(fingerprint=json.loads((step4 / "meta.json").read_text())["fingerprint"]))
    (step4 / "python_rng_rank1.json").write_bytes(
        (uninterrupted / "checkpoints" / step4.name / "python_rng_rank1.json").read_bytes()
    )
    _rehash(step4, "python_rng_rank1.json")
    storage = safe_dcp.read_metadata(step8 / "dcp").storage_data
    info = next(v for k, v in storage.items() if k.fqn.startswith("model.") and v.relative_path == "__0_0.distcp")
    shard = step8 / "dcp" / info.relative_path
    data = bytearray(shard.read_bytes())
    data[info.offset : info.offset + info.length] = _system_pickle(flag).ljust(info.length, b"\0")
    shard.write_bytes(bytes(data))
    _rehash(step8, "dcp/__0_0.distcp")
    r = run_cli("run", str(recipe_path), "--run-dir", str(run), "--resume", str(step4), "--set", "train.max_steps=9",
                cwd=tmp_path)  # fmt: skip
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert lines == [f"qlaunch: error: checkpoint {step8 / 'dcp'}: __0_0.distcp does not load (UnpicklingError): "
                     "the shard is damaged or not as DCP writes it (nothing in it was run)"], r.stderr  # fmt: skip
    assert not flag.exists()
