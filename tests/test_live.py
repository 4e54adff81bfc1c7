"""The launching terminal's view of a run, rendered from a recorded metrics stream.

tests/golden/metrics-tiny.jsonl is rank 0's metrics.jsonl of a real `qlaunch run recipes/tiny-cpu.toml
--set checkpoint.every_steps=10` (2 CPU ranks), with the run directory made relative.
tests/golden/metrics-orpo-tiny.jsonl is the same of a preference run: `qlaunch run recipes/tiny-dpo-cpu.toml
--gpus 1 --set train.objective="orpo" --set train.max_steps=6 --set train.eval_every=3 --set
data.val_path=".../assets/tiny-data/preference-chat.jsonl"` (ORPO reports every DPO number and two more).
Set QLAUNCH_UPDATE_GOLDEN=1 to rewrite the golden text files after an intended change of the view.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from rich.console import Console

from launcher import progress
from launcher.rundir import RunDir
from launcher.ui import live

GOLDEN = Path(__file__).parent / "golden"
EVENTS = [json.loads(line) for line in (GOLDEN / "metrics-tiny.jsonl").read_text().splitlines()]
ORPO = [json.loads(line) for line in (GOLDEN / "metrics-orpo-tiny.jsonl").read_text().splitlines()]
ORPO_ONLY = ("nll_loss", "log_odds_ratio", "eval_nll_loss", "eval_log_odds_ratio")
DPO = [{k: v for k, v in e.items() if k not in ORPO_ONLY} for e in ORPO]  # what a DPO run's events carry


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("QLAUNCH_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; rerun with QLAUNCH_UPDATE_GOLDEN=1 if intended"


def snapshot(events: list[dict], at: list[int], title: str = "tiny-cpu  fsdp x 2 (cpu)") -> str:
    """The view after each event index in `at`, as plain text of a fixed-width, colourless console."""
    console = Console(width=100, record=True, force_terminal=False, color_system=None, file=io.StringIO())
    st = progress.RunState(title=title, layers=2)
    for i, e in enumerate(events):
        progress.update(st, e)
        if i in at:
            console.rule(f"after event {i} ({e['event']})")
            console.print(live.render(st))
    return console.export_text()


def test_live_view_snapshot():
    # Starting, mid-loading, training with an ETA, writing a checkpoint, and the final frame.
    idx = {e["event"]: i for i, e in reversed(list(enumerate(EVENTS)))}  # first index of each event
    step5 = next(i for i, e in enumerate(EVENTS) if e.get("step") == 5 and e["event"] == "step")
    writing = idx["checkpointing"]
    text = snapshot(EVENTS, [0, 2, step5, writing, len(EVENTS) - 1])
    assert "\x1b" not in text
    check_golden("live-tiny.txt", text)
    # The numbers the issue asks for are all on screen by the end.
    final = text.rsplit("after event", 1)[1]
    for needle in ("30/30", "5.8526", "eval 5.8479 (step 30)", "per rank", "r0 0.48 r1 0.58 GiB", "done"):
        assert needle in final, needle


def test_plain_lines_snapshot_have_no_control_codes():
    lines = list(progress.plain_lines(EVENTS, progress.RunState(layers=2)))
    text = "\n".join(lines) + "\n"
    assert "\x1b" not in text and "\r" not in text
    check_golden("plain-tiny.txt", text)
    assert lines[0] == "loading model ..."
    assert "loading model: layer 2/2" in lines
    assert any(ln.startswith("step 12/30 ") and "ETA 0:00:" in ln for ln in lines)
    assert lines[-1].startswith("done: 30 steps in ")


def test_a_preference_run_shows_its_reward_margin_and_accuracy():
    first_eval = next(i for i, e in enumerate(ORPO) if e["event"] == "eval")
    text = snapshot(ORPO, [first_eval, len(ORPO) - 1], title="tiny-dpo  fsdp x 1 (cpu)")
    check_golden("live-orpo-tiny.txt", text)
    at_eval, final = text.split("after event")[1:]
    # Under the loss: the last step's margin, accuracy and the two rewards; ORPO's own terms; the last eval's.
    assert "margin -0.0001129  acc 0.500  chosen -0.6276  rejected -0.6275" in at_eval
    assert "eval rewards  margin 0.0001854  acc 0.531 (step 3)" in at_eval
    assert "margin 7.869e-05  acc 0.438  chosen -0.6277  rejected -0.6278" in final
    assert "nll 5.9926  log odds ratio -0.6932" in final
    assert "eval rewards  margin 0.0001054  acc 0.531 (step 6)" in final
    dpo = snapshot(DPO, [len(DPO) - 1]).split("after event")[1]
    assert "margin 7.869e-05  acc 0.438" in dpo and "eval rewards" in dpo
    assert "nll" not in dpo and "log odds" not in dpo  # ORPO's terms only where there are some


def test_a_preference_run_has_margin_and_accuracy_in_its_plain_lines():
    lines = list(progress.plain_lines(ORPO, progress.RunState(layers=2)))
    assert lines[6] == (
        "step 1/6  loss 6.3401  margin 0.0001157  acc 0.469  lr 1.50e-03  grad 1.185  7788 tok/s (7788/rank)  "
        "peak r0 0.45 GiB (host RSS)  ETA 0:00:03"
    )
    assert "eval  step 3  loss 6.2720  margin 0.0001854  acc 0.531" in lines
    assert "eval  step 6  loss 6.2593  margin 0.0001054  acc 0.531" in lines
    assert list(progress.plain_lines(DPO, progress.RunState(layers=2))) == lines  # the plain line shows no ORPO term


def test_an_sft_run_shows_no_rewards():
    plain = "\n".join(progress.plain_lines(EVENTS, progress.RunState(layers=2)))
    final = snapshot(EVENTS, [len(EVENTS) - 1])
    for text in (plain, final):
        assert "margin" not in text and "acc " not in text and "rewards" not in text


def test_eta_uses_the_step_rate_after_the_first_step():
    st = progress.RunState()
    progress.update(st, {"event": "start", "time": 0.0, "total_steps": 100, "world": 1, "first_step_after_s": 1})
    base = {"event": "step", "total_steps": 100, "loss": 1.0, "lr": 1e-4, "tokens_per_s_per_gpu": 1.0}
    progress.update(st, {**base, "time": 50.0, "step": 1, "step_time_s": 50.0})  # warm-up step: slow
    assert st.eta() == 99 * 50.0
    progress.update(st, {**base, "time": 60.0, "step": 11, "step_time_s": 1.0})  # then 1 step/s
    assert st.eta() == 89.0


def test_gpu_memory_per_rank_wins_over_host_rss():
    st = progress.RunState()
    step = {"event": "step", "time": 1.0, "step": 1, "total_steps": 2, "loss": 2.0, "lr": 1e-4}
    progress.update(st, {**step, "host_rss_gb": 3.0, "gpu_reserved_gb": 10.0, "rank_gpu_reserved_gb": [10.0, 12.5]})
    progress.update(st, {"event": "done", "time": 2.0, "host_rss_gb": 3.5})  # host-only numbers must not replace
    assert st.peak_kind == "GPU reserved"
    assert progress.fmt_peaks(st) == "r0 10.00 r1 12.50 GiB (GPU reserved)"


def test_loading_progress_reports_layers_and_bytes_per_second():
    st = progress.RunState(layers=32)
    progress.update(st, {"event": "loading", "time": 100.0, "phase": "model", "rank": 0})
    e = {"event": "loading", "time": 104.0, "phase": "model", "tensor": "model.layers.7.mlp.down_proj.weight"}
    progress.update(st, {**e, "bytes_read": 2 * 2**30})
    assert progress.format_event(e, st) == "loading model: layer 8/32, 2.00 GiB read, 512.0 MiB/s"


def _writer_script(metrics: Path) -> str:
    # A real child process appending events over time, the way rank 0 does.
    return textwrap.dedent(
        f"""
        import json, time
        events = {[e for e in EVENTS if e["event"] in ("start", "step", "done")][:6]!r}
        with open({str(metrics)!r}, "a", buffering=1) as fh:
            for e in events:
                fh.write(json.dumps(e) + "\\n")
                time.sleep(0.05)
        """
    )


def test_follow_tails_a_growing_file_plain_when_not_a_tty(tmp_path):
    run = RunDir(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", _writer_script(run.metrics)])
    out = io.StringIO()
    live.follow_plain(run, proc, out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("training 30 steps on 2 rank(s)")
    assert [ln.split()[1] for ln in lines if ln.startswith("step ")] == ["1/30", "2/30", "3/30", "4/30", "5/30"]
    assert "\x1b" not in out.getvalue()


def test_follow_live_draws_on_a_terminal(tmp_path):
    run = RunDir(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", _writer_script(run.metrics)])
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=100, color_system="standard")
    live.follow_live(run, proc, console)
    out = buf.getvalue()
    assert "\x1b[" in out  # cursor movement and colour: this is the terminal path
    assert "5/30" in out and "tokens/s" in out


def test_a_diverged_run_gets_its_line():
    from launcher.progress import format_event

    line = format_event({"event": "diverged", "step": 4, "loss": "nan", "grad_norm": "inf", "time": 1.0})
    assert line == "stopped at step 4: loss nan, gradient norm inf"


def test_per_rank_figures_say_gpu_only_for_gpu_ranks():
    """A CPU run's ranks are processes, not GPUs: its per-rank speed says 'rank'; a run whose ranks report
    GPU memory says 'gpu'."""
    step = {"event": "step", "step": 1, "total_steps": 2, "loss": 1.0, "lr": 1e-3, "grad_norm": 0.5,
            "tokens_per_s": 200.0, "tokens_per_s_per_gpu": 100.0, "step_time_s": 1.0}  # fmt: skip
    for memory, unit in (({"host_rss_gb": 1.0}, "rank"), ({"gpu_reserved_gb": 2.0, "host_rss_gb": 1.0}, "gpu")):
        st = progress.RunState()
        e = {**step, **memory}
        progress.update(st, e)
        assert f"200 tok/s (100/{unit})" in progress.format_event(e, st), (unit, progress.format_event(e, st))
