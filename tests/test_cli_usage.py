"""Command-line usage errors through the installed `qlaunch` console script: one line with a usage hint, exit 2.

The console script is what users run (`python -m launcher.cli` is not): it calls `launcher.cli.main`, which
must turn typer's usage errors (typer >= 0.2x raises its own vendored copies of click's exception classes,
older typers click's) into one 'qlaunch: error:' line instead of a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BASE_RECIPE, ROOT

QLAUNCH = Path(sys.executable).parent / "qlaunch"
pytestmark = pytest.mark.skipif(
    not QLAUNCH.is_file(), reason=f"no installed qlaunch console script next to {sys.executable}"
)


def qlaunch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH: the script imports this checkout's launcher package, whichever checkout installed it.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([str(QLAUNCH), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def recipe(tmp_path) -> str:
    (tmp_path / "recipe.toml").write_text(BASE_RECIPE)
    return "recipe.toml"


# name -> (arguments with {recipe}, fragments the one error line must contain). The fragments hold for
# typer's vendored click and for click itself.
USAGE_ERRORS = {
    "unknown flag": (
        ["run", "--gpu", "2", "{recipe}"],
        ["no such option", "--gpu", "(did you mean --gpus?); see 'qlaunch run --help'"],
    ),
    "flag of another command": (
        ["plan", "{recipe}", "--dry-run"],
        ["no such option", "--dry-run", "qlaunch plan --help"],
    ),
    "not a number": (["run", "{recipe}", "--gpus", "two"], ["invalid value for '--gpus'", "qlaunch run --help"]),
    "below the minimum": (["run", "{recipe}", "--gpus", "0"], ["invalid value for '--gpus'", "qlaunch run --help"]),
    "above the maximum": (["run", "{recipe}", "--gpus", "5000"], ["invalid value for '--gpus'", "qlaunch run --help"]),
    "infinite float": (["plan", "{recipe}", "--gpu-mem-gb", "inf"], ["invalid value for '--gpu-mem-gb'"]),
    "nan float": (["run", "{recipe}", "--node-timeout", "nan"], ["invalid value for '--node-timeout'"]),
    "port out of range": (["run", "{recipe}", "--master-port", "70000"], ["invalid value for '--master-port'"]),
    "unknown command": (["runn", "{recipe}"], ["no such command 'runn'", "; see 'qlaunch --help'"]),
    "missing argument": (["run"], ["missing argument", "; see 'qlaunch run --help'"]),
    "missing option": (["merge", "somewhere"], ["missing option", "--out", "; see 'qlaunch merge --help'"]),
    "option without its value": (
        ["plan", "{recipe}", "--gpus"],
        ["'--gpus' requires an argument", "qlaunch plan --help"],
    ),
    "flag given a value": (["run", "{recipe}", "--dry-run=3"], ["'--dry-run' does not take a value", "qlaunch run"]),
    "extra argument": (["explain", "lora", "rank"], ["unexpected extra argument", "rank", "qlaunch explain --help"]),
    "unknown root option": (["--gpus", "2"], ["no such option", "--gpus", "; see 'qlaunch --help'"]),
}


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_error_is_one_line_with_a_hint_and_exit_2(tmp_path, recipe, case):
    args, fragments = USAGE_ERRORS[case]
    r = qlaunch(*(a.format(recipe=recipe) for a in args), cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert r.stdout == "", r.stdout
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qlaunch: error: "), r.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not (tmp_path / "runs").exists()


def test_bare_qlaunch_prints_the_help_and_exits_0(tmp_path):
    r = qlaunch(cwd=tmp_path)
    assert (r.returncode, r.stderr) == (0, ""), r.stdout + r.stderr
    assert "Usage: qlaunch" in r.stdout and "run" in r.stdout and "Traceback" not in r.stdout
    assert r.stdout.count("Usage: qlaunch") == 1, "the help is printed once"


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["run", "--help"], ["plan", "-h"]])
def test_help_exits_0(tmp_path, args):
    r = qlaunch(*args, cwd=tmp_path)
    assert (r.returncode, r.stderr) == (0, ""), r.stdout + r.stderr
    assert "Usage: qlaunch" in r.stdout


def test_version_exits_0(tmp_path):
    from launcher import __version__

    r = qlaunch("--version", cwd=tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"qlaunch {__version__}\n", "")


def test_plain_click_exceptions_are_handled_like_typers():
    """A typer that raises click's own classes (other versions, e.g. on GPU machines) gets the same lines."""
    click = pytest.importorskip("click")
    from launcher.cli import _exception_classes, usage_error_line

    for name in ("UsageError", "ClickException", "Exit", "Abort"):
        assert getattr(click.exceptions, name) in _exception_classes(name)
    root = click.Context(click.Group("qlaunch"), info_name="qlaunch")
    ctx = click.Context(click.Command("run"), info_name="run", parent=root)
    err = click.exceptions.NoSuchOption("--gpu", possibilities=["--gpus"], ctx=ctx)
    assert usage_error_line(err, []) == "no such option '--gpu' (did you mean --gpus?); see 'qlaunch run --help'"
    missing = click.exceptions.MissingParameter(ctx=ctx, param=click.Argument(["recipe"]))
    assert usage_error_line(missing, []) == "missing argument 'RECIPE'; see 'qlaunch run --help'"
    # Raised by click's parser without a context: the command is taken from the command line.
    bare = click.exceptions.BadOptionUsage("--gpus", "Option '--gpus' requires an argument.")
    assert usage_error_line(bare, ["plan", "r.toml", "--gpus"]) == (
        "option '--gpus' requires an argument; see 'qlaunch plan --help'"
    )


COMMANDS = ["run", "slurm", "plan", "config", "recipes", "explain", "quantize", "doctor", "report", "merge", "generate"]
COMMANDS += ["recipes cp"]  # a command's own sub-command


def _examples(help_text: str) -> list[list[str]]:
    """The command lines under a help text's 'Example:'/'Examples:' heading."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() in ("Example:", "Examples:"))
    out = []
    for line in lines[start + 1 :]:
        words = line.strip().split()
        if not words:
            return out
        assert words[0] == "qlaunch", f"an example wrapped onto a second line: {line!r}"
        out.append(words[1:])
    return out


def test_every_command_help_has_examples_and_the_cheap_ones_run(tmp_path):
    """Each command's --help ends its description with examples; those of the commands that only read
    (explain, plan, recipes) are run as written, from the project root, and exit 0."""
    for command in COMMANDS:
        words = command.split()
        r = qlaunch(*words, "--help", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        examples = _examples(r.stdout)
        assert examples and all(e[: len(words)] == words for e in examples), (command, r.stdout)
        if command in ("explain", "plan", "recipes"):
            for e in examples:
                ran = qlaunch(*e, cwd=ROOT)
                assert ran.returncode == 0 and "Traceback" not in ran.stderr, (e, ran.stderr)


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_script_for_a_named_shell(tmp_path, shell):
    r = qlaunch("--show-completion", shell, cwd=tmp_path)
    assert r.returncode == 0 and f"_QLAUNCH_COMPLETE=complete_{shell}" in r.stdout, r.stdout + r.stderr


def test_completion_completes_commands_and_options(tmp_path):
    """What the installed bash script asks the program: the words so far, the one being completed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "_QLAUNCH_COMPLETE": "complete_bash"}
    for words, cword, want in (
        ("qlaunch ru", 1, "run"),
        ("qlaunch run --gp", 2, "--gpus"),
        ("qlaunch exp", 1, "explain"),
    ):
        e = {**env, "COMP_WORDS": words, "COMP_CWORD": str(cword)}
        r = subprocess.run([str(QLAUNCH)], cwd=tmp_path, env=e, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.split() == [want], (words, r.stdout, r.stderr)


def test_install_completion_writes_into_the_users_shell_files(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(home)}
    r = subprocess.run([str(QLAUNCH), "--install-completion", "bash"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0 and "bash completion installed in" in r.stdout, r.stdout + r.stderr
    assert "qlaunch" in (home / ".bashrc").read_text()
    assert any("_QLAUNCH_COMPLETE" in p.read_text() for p in home.rglob("*") if p.is_file() and p.name != ".bashrc")
