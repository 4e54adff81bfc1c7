"""`qlaunch doctor`: verdicts (pure, from written-down facts) and the command on this CPU machine."""

from __future__ import annotations

from launcher.launch import doctor
from launcher.launch.doctor import Facts, judge_machine, judge_versions
from tests.conftest import run_cli

GiB = 2**30
CPU_CI = {**doctor.TESTED["CPU CI"], **{p: "99" for p in doctor.MINIMUM if p not in doctor.TESTED["CPU CI"]}}


def status(checks, name):
    return next(c.status for c in checks if c.name == name)


def test_tested_versions_pass_and_untested_ones_warn():
    checks = judge_versions(CPU_CI, "3.11.7")
    assert {c.status for c in checks if c.name in doctor.TESTED["CPU CI"]} == {"ok"}
    gpu = {**CPU_CI, "torch": "2.11.0+cu130", "transformers": "5.17.0", "accelerate": "1.15.0"}
    assert status(judge_versions(gpu), "torch") == "ok"  # matches the GPU hosts' combination
    newer = judge_versions({**CPU_CI, "transformers": "5.30.0"})
    assert status(newer, "transformers") == "warn"
    assert "untested" in next(c.detail for c in newer if c.name == "transformers")


def test_missing_or_too_old_required_packages_are_blocking():
    checks = judge_versions({**CPU_CI, "peft": None, "torch": "2.4.1"}, "3.10.2")
    assert status(checks, "peft") == "fail" and status(checks, "torch") == "fail"
    assert status(checks, "python") == "fail"
    assert doctor.exit_code(checks) == 1
    assert status(judge_versions({**CPU_CI, "deepspeed": None}), "deepspeed") == "info"  # optional


def test_no_gpu_is_a_warning_unless_required():
    facts = Facts(versions=CPU_CI, dist={"gloo": True, "nccl": False})
    assert status(judge_machine(facts), "GPUs") == "warn"
    assert doctor.exit_code(judge_machine(facts)) == 0
    assert status(judge_machine(facts, require_gpu=True), "GPUs") == "fail"


def test_machine_limits_and_environment():
    gpus = [{"name": "NVIDIA H100", "memory": 80 * GiB, "capability": "9.0", "bf16": True}] * 2
    facts = Facts(
        gpus=gpus,
        peer={(0, 1): True, (1, 0): False},
        dist={"gloo": True, "nccl": True},
        shm_bytes=64 * 2**20,
        nofile=(1024, 4096),
        env={"NCCL_NVLS_ENABLE": "1", "NCCL_DEBUG": "WARN"},
        disk_path="runs",
        disk_free=GiB // 2,
    )
    checks = judge_machine(facts)
    assert status(checks, "GPU 1") == "ok" and status(checks, "peer access") == "warn"
    assert status(checks, "/dev/shm") == "warn" and "--shm-size" in next(
        c.detail for c in checks if c.name == "/dev/shm"
    )
    assert status(checks, "open files") == "warn"
    assert status(checks, "NCCL_NVLS_ENABLE") == "warn" and status(checks, "NCCL_DEBUG") == "info"
    assert status(checks, "free disk") == "fail"
    assert doctor.exit_code(checks) == 1


def test_doctor_command_on_this_machine(tmp_path):
    import torch

    r = run_cli("doctor", "--runs-dir", str(tmp_path / "runs"))
    out = r.stdout
    for needle in ("torch", "bitsandbytes", "/dev/shm", "open files", "free disk"):
        assert needle in out, needle
    assert r.returncode == (1 if " fail " in out else 0), out
    if not torch.cuda.is_available():  # CPU CI: no GPU is a warning, not a crash
        gpu_row = next(line for line in out.splitlines() if "no CUDA GPU visible" in line)
        assert " warn " in gpu_row
        assert r.returncode == 0, out


def test_runs_dir_that_is_a_file_fails_instead_of_free_disk_ok(tmp_path):
    """`doctor --runs-dir /etc/hostname` said `free disk ok ... free at /etc/hostname`."""
    (tmp_path / "hostname").write_text("box\n")
    for runs_dir, what in ((tmp_path / "hostname", "is"), (tmp_path / "hostname" / "runs", "lies under")):
        facts = doctor.gather(runs_dir)
        checks = judge_machine(facts)
        assert status(checks, "runs dir") == "fail" and "free disk" not in [c.name for c in checks]
        detail = next(c.detail for c in checks if c.name == "runs dir")
        assert detail.startswith(f"{runs_dir} {what}") and "not a directory" in detail, detail
        assert doctor.exit_code(checks) == 1
    assert doctor.runs_dir_problem(tmp_path / "runs", tmp_path) is None


def test_doctor_prints_no_third_party_lines(tmp_path):
    """bitsandbytes' `Failed to load CPU gemm_4bit_forward ... kernels` line came before the table."""
    r = run_cli("doctor", "--runs-dir", str(tmp_path / "runs"))
    assert r.stderr == "" and "kernels" not in r.stdout, r.stderr


def test_quieting_the_libraries_needs_no_transformers(monkeypatch, capsys):
    """doctor must report a missing or broken transformers, not fail importing it to quiet its logger."""
    import logging
    import sys
    import warnings

    from launcher.launch.quiet import quiet_libraries

    monkeypatch.setitem(sys.modules, "transformers.utils", None)  # importing it now raises ImportError
    with quiet_libraries():
        logging.getLogger("some.library").warning("a notice")
        warnings.warn("a FutureWarning", FutureWarning, stacklevel=1)
    assert capsys.readouterr().err == ""
    assert logging.root.manager.disable == logging.NOTSET
