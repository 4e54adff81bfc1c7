"""`qlaunch report`: PNG plots + summary table from a recorded run; the optional TensorBoard/W&B sinks."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
from PIL import Image

from launcher.errors import UserError
from launcher.rank import sinks
from launcher.rundir import RunDir
from launcher.ui import report
from tests.conftest import run_cli

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture
def run(tmp_path) -> RunDir:
    """A run directory holding the recorded tiny run's metrics, its checkpoints and adapter."""
    d = tmp_path / "runs" / "tiny-cpu" / "20261127-104126"
    (d / "logs").mkdir(parents=True)
    shutil.copy(GOLDEN / "metrics-tiny.jsonl", d / "metrics.jsonl")
    for step in (20, 30):  # keep_last = 2
        (d / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    return RunDir(d)


@pytest.fixture
def preference_run(tmp_path) -> RunDir:
    """A run directory holding the recorded tiny ORPO run's metrics (see tests/test_live.py)."""
    d = tmp_path / "runs" / "tiny-dpo" / "20261204-133456"
    (d / "logs").mkdir(parents=True)
    shutil.copy(GOLDEN / "metrics-orpo-tiny.jsonl", d / "metrics.jsonl")
    return RunDir(d)


def golden_events(name: str) -> list[dict]:
    return [json.loads(line) for line in (GOLDEN / name).read_text().splitlines()]


def assert_drawn_png(p: Path) -> None:
    import matplotlib.image as mpimg

    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(p)
    assert img.shape[0] > 300 and img.shape[1] > 600  # 8x4.5 in at 110 dpi
    assert img[..., :3].std() > 0.05  # not a blank canvas: lines and text were drawn


def test_report_writes_readable_pngs_and_a_summary(run):

    got, rows, plots = report.report(run.path)
    assert got == run
    assert [p.name for p in plots] == ["loss.png", "lr.png", "throughput.png", "memory.png"]
    for p in plots:
        assert p.parent == run.path / "plots"
        assert_drawn_png(p)
    table = dict(rows)
    assert table["status"] == "completed"
    assert table["steps"] == "30 of 30"
    assert table["final loss"].startswith("5.8526 (first 6.2724")
    last_eval = [json.loads(x) for x in run.metrics.read_text().splitlines() if '"eval"' in x][-1]["eval_loss"]
    assert table["eval loss"].startswith(f"5.8479 (perplexity {math.exp(last_eval):,.2f})")
    assert "at step 30 (best" in table["eval loss"]
    for p in plots:  # every plot says which run it is
        assert Image.open(p).info["Title"] == f"{run.path.parent.name}: {p.stem}", p
    assert table["peak memory"].startswith("0.58 GiB peak host memory (RSS); per rank: r0 0.48 r1 0.58")
    assert "tok/s per rank (median)" in table["throughput"]  # CPU processes, not GPUs
    assert table["checkpoints"].startswith("3 written, 2 on disk; last runs/tiny-cpu/")
    assert table["wall time"] == "0:00:18"
    assert table["adapter"].endswith("/adapter")


def test_a_preference_run_gets_reward_panels_and_a_rewards_row(preference_run):
    _, rows, plots = report.report(preference_run.path)
    names = ["loss.png", "rewards.png", "reward_accuracy.png", "lr.png", "throughput.png", "memory.png"]
    assert [p.name for p in plots] == names
    for p in plots:
        assert_drawn_png(p)
    assert "perplexity" not in dict(rows)["eval loss"]  # a DPO/ORPO loss is no cross-entropy
    assert dict(rows)["rewards"] == (
        "train margin 7.869e-05, accuracy 0.438 at step 6; eval margin 0.0001054, accuracy 0.531 at step 6"
    )
    # What the panels plot: every step's train numbers, and the eval ones at the eval steps.
    events = golden_events("metrics-orpo-tiny.jsonl")
    steps = [e for e in events if e["event"] == "step"]
    evals = [e for e in events if e["event"] == "eval"]
    prefs = report.series(events).prefs
    for name in ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"):
        assert prefs[name] == ([1, 2, 3, 4, 5, 6], [e[name] for e in steps])
        assert prefs[f"eval_{name}"] == ([3, 6], [e[f"eval_{name}"] for e in evals])
    assert prefs["reward_accuracy"][1] == [0.46875, 0.53125, 0.5, 0.46875, 0.5625, 0.4375]


def test_an_sft_run_gets_no_reward_panel(run):
    assert report.series(golden_events("metrics-tiny.jsonl")).prefs == {}
    _, rows, plots = report.report(run.path)
    assert "rewards" not in dict(rows)
    assert not any("reward" in p.name for p in plots)
    assert not list((run.path / "plots").glob("reward*"))


def test_a_preference_step_with_a_reward_that_is_no_number_is_skipped(preference_run):
    lines = preference_run.metrics.read_text().splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith('{"event": "step"'))
    lines[at] = json.dumps({**json.loads(lines[at]), "reward_margin": "big"})  # was a traceback in float()
    preference_run.metrics.write_text("\n".join(lines) + "\n")
    warnings: list[str] = []
    _, _, plots = report.report(preference_run.path, warn=warnings.append)
    assert len(warnings) == 1 and "skipped 1 malformed line(s)" in warnings[0]
    assert report.series(report.read_events(preference_run.metrics)[0]).prefs["reward_margin"][0] == [2, 3, 4, 5, 6]
    assert "rewards.png" in [p.name for p in plots]


def test_report_of_an_interrupted_run_and_of_a_runs_folder(run):
    lines = run.metrics.read_text().splitlines()
    run.metrics.write_text("\n".join(lines[:12]) + '\n{"event": "step", "ti')  # killed mid-write
    got, rows, plots = report.report(run.path.parent)  # runs/<name>: the newest run
    assert got == run
    table = dict(rows)
    assert table["status"].startswith("incomplete")
    assert table["steps"] == "5 of 30"
    assert len(plots) == 4


def test_report_command_prints_the_table(run):
    r = run_cli("report", str(run.path))
    assert r.returncode == 0, r.stderr
    for needle in ("final loss", "5.8526", "throughput", "peak memory", "wall time", "checkpoints", "plots"):
        assert needle in r.stdout
    assert (run.path / "plots" / "loss.png").is_file()
    bad = run_cli("report", str(run.path / "nope"))
    assert bad.returncode == 2 and "no metrics.jsonl" in bad.stderr


def test_sink_scalars_follow_the_metrics_records():
    step = {"event": "step", "time": 1.0, "step": 3, "loss": 2.5, "lr": 1e-4, "tokens_per_s": 100.0}
    assert sinks.scalars({**step, "rank_gpu_reserved_gb": [1.0, 2.0]}) == (
        3,
        {
            "train/loss": 2.5,
            "train/lr": 1e-4,
            "perf/tokens_per_s": 100.0,
            "memory/rank0_gpu_reserved_gb": 1.0,
            "memory/rank1_gpu_reserved_gb": 2.0,
        },
    )
    assert sinks.scalars({"event": "eval", "step": 3, "eval_loss": 2.0}) == (3, {"eval/loss": 2.0})
    assert sinks.scalars({"event": "adapter", "path": "x"}) == (None, {})


def test_tensorboard_load_time_is_the_terminals():
    """time/load_s is the whole load the live view reports as "model loaded in", not only its weights part."""
    from launcher import progress

    events = [{"event": "loading", "time": 100.0, "phase": "model"},
              {"event": "loaded", "time": 114.3, "seconds": 1.2, "wall_s": 14.3, "bytes_read": 0}]  # fmt: skip
    st = progress.RunState()
    for e in events:
        progress.update(st, e)
    assert progress.format_event(events[1], st).startswith("model loaded in 14.3s (weights 1.2s")
    assert sinks.scalars(events[1]) == (0, {"time/load_s": 14.3, "time/load_weights_s": 1.2})


PREFERENCE_TAGS = [
    "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "logps_chosen", "logps_rejected",
    "nll_loss", "log_odds_ratio",
]  # fmt: skip


def test_sink_scalars_of_a_preference_run_carry_its_rewards():
    events = golden_events("metrics-orpo-tiny.jsonl")
    step = next(e for e in events if e["event"] == "step")
    at, values = sinks.scalars(step)
    assert at == 1
    assert {tag: values[f"train/{tag}"] for tag in PREFERENCE_TAGS} == {tag: step[tag] for tag in PREFERENCE_TAGS}
    assert values["train/loss"] == step["loss"] and values["train/grad_norm"] == step["grad_norm"]
    ev = next(e for e in events if e["event"] == "eval")
    assert sinks.scalars(ev) == (
        3,
        {"eval/loss": ev["eval_loss"], **{f"eval/{t}": ev[f"eval_{t}"] for t in PREFERENCE_TAGS}},
    )
    # A DPO step has no ORPO terms: those tags are not written at all (never as 0 or NaN).
    dpo = {k: v for k, v in step.items() if k not in ("nll_loss", "log_odds_ratio")}
    assert not {"train/nll_loss", "train/log_odds_ratio"} & set(sinks.scalars(dpo)[1])


def test_missing_optional_packages_warn_once_and_go_on(recipe_file, tmp_path, capsys):
    from launcher.plan.recipe_file import load_recipe

    rec = load_recipe(recipe_file(), ["log.tensorboard=true", "log.wandb=true"])
    said: list[str] = []
    out = sinks.open_sinks(rec, tmp_path, said.append)
    have_tb = importlib.util.find_spec("tensorboard") is not None
    have_wandb = importlib.util.find_spec("wandb") is not None
    assert len(out) == have_tb + have_wandb
    assert len(said) == (not have_tb) + (not have_wandb)
    if not have_tb:
        assert any("tensorboard package is not installed" in m for m in said)
    for s in out:
        s.close()
    assert capsys.readouterr().out.count("warning:") == len(said)  # also in rank 0's log


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_event_files_hold_the_run(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = sinks.TensorBoardSink(tmp_path / "tb")
    for line in (GOLDEN / "metrics-tiny.jsonl").read_text().splitlines():
        import json

        tb.write(json.loads(line))
    tb.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 31))
    assert loss[-1].value == pytest.approx(5.8526, abs=1e-4)
    assert [e.step for e in acc.Scalars("eval/loss")] == [10, 20, 30]
    assert not [t for t in acc.Tags()["scalars"] if "reward" in t or "logps" in t]  # SFT: no preference tags


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_event_files_hold_a_preference_runs_rewards(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = golden_events("metrics-orpo-tiny.jsonl")
    tb = sinks.TensorBoardSink(tmp_path / "tb")
    for e in events:
        tb.write(e)
    tb.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    steps = [e for e in events if e["event"] == "step"]
    evals = [e for e in events if e["event"] == "eval"]
    for name in PREFERENCE_TAGS:
        assert f"train/{name}" in tags and f"eval/{name}" in tags, name
        train = acc.Scalars(f"train/{name}")
        assert [s.step for s in train] == [1, 2, 3, 4, 5, 6]
        assert [s.value for s in train] == pytest.approx([e[name] for e in steps], rel=1e-6)  # float32 on disk
        ev = acc.Scalars(f"eval/{name}")
        assert [s.step for s in ev] == [3, 6]
        assert [s.value for s in ev] == pytest.approx([e[f"eval_{name}"] for e in evals], rel=1e-6)
    assert [s.value for s in acc.Scalars("eval/reward_accuracy")] == [0.53125, 0.53125]


def _step_line(run: RunDir) -> dict:
    import json

    return next(e for e in map(json.loads, run.metrics.read_text().splitlines()) if e["event"] == "step")


def _corrupt(run: RunDir, case: str) -> None:
    """Put one malformed line, as a crashed run or a tamperer leaves it, among the recorded run's lines."""
    import json

    step = _step_line(run)
    no = {k: v for k, v in step.items() if k not in ("loss", "time")}
    bad = {
        "step without loss": json.dumps({k: v for k, v in step.items() if k != "loss"}),
        "step a string": json.dumps({**step, "step": "one"}),
        "a JSON array": json.dumps([1, 2, 3]),
        "a JSON number": "5",
        "no time": json.dumps({**no, "loss": 1.0}),
        "loss null": json.dumps({**step, "loss": None}),
        "rss not a list": json.dumps({**step, "rank_host_rss_gb": 5}),
        "loaded without time": json.dumps({"event": "loaded", "seconds": 1.0}),
        "time true": json.dumps({**step, "time": True}),
        "step a float": json.dumps({**step, "step": 2.5}),
        "torn line": '{"event": "step", "ti',
        "not UTF-8": b'{"event": "step", "x": "\xff"}'.decode("latin-1"),
        "nested deeply": "[" * 100_000,
        "a huge number": '{"event": "step", "time": 1' + "0" * 5000 + "}",
    }[case]
    lines = run.metrics.read_bytes().split(b"\n")
    run.metrics.write_bytes(b"\n".join([*lines[:15], bad.encode("latin-1"), *lines[15:]]))


MALFORMED = [
    "step without loss", "step a string", "a JSON array", "a JSON number", "no time", "loss null", "rss not a list",
    "loaded without time", "time true", "step a float", "torn line", "not UTF-8", "nested deeply", "a huge number",
]  # fmt: skip


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_metrics_line_is_skipped_with_one_warning(run, case):
    """Each used to be a traceback (KeyError, ValueError, AttributeError, TypeError) from `qlaunch report`."""
    _, want, _ = report.report(run.path)
    _corrupt(run, case)
    warnings: list[str] = []
    _, rows, plots = report.report(run.path, warn=warnings.append)
    assert rows == want and len(plots) == 4
    assert warnings == [
        f"warning: {run.metrics}: skipped 1 malformed line(s) (a killed run's last line is often cut short; other "
        "lines were not written by qlaunch)"
    ]


def test_metrics_with_no_usable_event_is_one_line(run):
    run.metrics.write_text('[1]\n{"event": "step"}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl: no metrics recorded yet \(2 malformed line\(s\)"):
        report.report(run.path)


def test_metrics_file_that_is_a_fifo_does_not_block(run):
    import os

    run.metrics.unlink()
    os.mkfifo(run.metrics)
    with pytest.raises(UserError, match="no metrics.jsonl here"):  # found as no regular file, never opened
        report.report(run.path)


def test_report_command_on_a_tampered_metrics_file_prints_one_warning(run):
    for case in ("step a string", "a JSON array", "loss null"):
        _corrupt(run, case)
    import json

    lines = run.metrics.read_text().splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith('{"event": "step"'))
    lines[at] = json.dumps({**json.loads(lines[at]), "lr": 1e308})  # valid but absurd: numpy overflows plotting it
    run.metrics.write_text("\n".join(lines) + "\n")
    r = run_cli("report", str(run.path))
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [f"warning: {run.metrics}: skipped 3 malformed line(s) (a killed run's last line "
                                     "is often cut short; other lines were not written by qlaunch)"]  # fmt: skip
    assert "final loss" in r.stdout


def test_smoothing_is_tensorboards_debiased_moving_average():
    assert report.smoothed([4.0, 4.0, 4.0]) == pytest.approx([4.0, 4.0, 4.0])  # no pull towards 0 at the start
    got = report.smoothed([1.0, 0.0], weight=0.5)
    assert got == pytest.approx([1.0, (0.5 * 0.5 * 1.0 + 0.5 * 0.0) / (1 - 0.25)])
    noisy = [5.0 + (-1) ** i for i in range(40)]
    assert max(report.smoothed(noisy)[10:]) - min(report.smoothed(noisy)[10:]) < 0.2 * 2  # the zigzag damped
    assert report.perplexity(0.0) == "1.00" and report.perplexity(1e4) == "overflow"
