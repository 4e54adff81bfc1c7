"""Recipes are package data: a bundled name works from any directory and from an installed wheel;
`qlaunch recipes` is a table; `qlaunch recipes cp` writes a copy that runs from anywhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from launcher.plan.bundled import ASSETS_DIR, RECIPES_DIR, bundled_recipes, portable_text, recipe_path
from tests.conftest import ROOT, assert_one_line_error, run_cli

WIDE = {"COLUMNS": "250"}  # rich wraps the table to the terminal; a pipe counts as 80 columns


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


# ---------------------------------------------------------------- the wheel


def build_wheel(tmp_path: Path) -> Path:
    """A wheel of this checkout, built from a copy of its sources (the build writes build/ and egg-info
    beside them, which must not land in the repository)."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copytree(ROOT / "launcher", src / "launcher", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path / "wheel"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = out.glob("qlaunch-*.whl")
    return wheel


def test_a_wheel_install_runs_a_bundled_recipe_by_name_from_any_directory(tmp_path):
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"launcher/bundled/recipes/{n}.toml" for n in recipe_names()}
    shipped |= {
        f"launcher/bundled/assets/{p.relative_to(ASSETS_DIR).as_posix()}" for p in ASSETS_DIR.rglob("*") if p.is_file()
    }
    for must in ("tiny-llama/model.safetensors", "tiny-llama/tokenizer.json", "tiny-data/train.jsonl"):
        assert f"launcher/bundled/assets/{must}" in shipped
    assert "launcher/bundled/assets/configs/llama-3-70b/config.json" in shipped
    assert shipped <= names, sorted(shipped - names)

    installed = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(installed)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Only the unpacked wheel on the path: not the repository (the venv's editable install comes after it).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(installed), **WIDE}

    def python(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=timeout
        )

    where = python("-c", "import launcher; print(launcher.__file__)")
    assert Path(where.stdout.strip()).resolve().is_relative_to(installed.resolve()), where.stdout + where.stderr

    listed = python("-m", "launcher.cli", "recipes")
    assert listed.returncode == 0 and "tiny-cpu" in listed.stdout and "tiny-llama" in listed.stdout, listed.stderr

    r = python("-m", "launcher.cli", "run", "tiny-cpu", "--gpus", "2", "--set", "train.max_steps=2", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (run_dir,) = (elsewhere / "runs" / "tiny-cpu").iterdir()
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    resolved = tomllib.loads((run_dir / "recipe.toml").read_text())
    # The bundled recipe of the unpacked wheel ran, with that copy's model and data.
    for path in (resolved["model"]["path"], resolved["data"]["datasets"][0]["path"], resolved["data"]["val_path"]):
        assert Path(path).is_relative_to(installed.resolve() / "launcher" / "bundled" / "assets"), path


# ---------------------------------------------------------------- names where a recipe file is taken


def test_a_bundled_name_with_or_without_toml_and_an_existing_file_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-cpu.toml").mkdir()  # a directory is never the recipe meant
    assert recipe_path("tiny-cpu") == recipe_path("tiny-cpu.toml") == RECIPES_DIR / "tiny-cpu.toml"
    (tmp_path / "tiny-cpu").write_text("name = 'mine'\n")  # a file of that name here is what was meant
    assert recipe_path("tiny-cpu") == Path("tiny-cpu")
    assert recipe_path("sub/tiny-cpu") == Path("sub/tiny-cpu")  # a path is never a name


@pytest.mark.parametrize(
    "command",
    [
        ["plan"],
        ["config", "-o", "cfg"],
        ["slurm", "--nodes", "2", "--gpus-per-node", "4"],
    ],
    ids=["plan", "config", "slurm"],
)
def test_other_commands_take_a_bundled_name_from_any_directory(tmp_path, command):
    name = "llama70b-qlora" if command[0] == "slurm" else "tiny-cpu"
    r = run_cli(command[0], name, *command[1:], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    if command[0] == "config":
        rec = tomllib.loads((tmp_path / "cfg" / "recipe.toml").read_text())
        assert rec["model"]["path"] == str(ASSETS_DIR / "tiny-llama")
    if command[0] == "slurm":  # the job runs the same name on the nodes, where it resolves the same way
        (script,) = (tmp_path / "runs" / "llama70b-qlora").glob("*.sbatch")
        assert " run llama70b-qlora --gpus 4" in script.read_text()


def test_run_with_an_unknown_name_is_one_line_listing_the_bundled_names(tmp_path):
    r = run_cli("run", "tiny-cpuu", "--gpus", "2", cwd=tmp_path)
    line = assert_one_line_error(
        r, ["tiny-cpuu: no such recipe file, nor a bundled recipe (did you mean tiny-cpu?)"], tmp_path / "runs"
    )
    assert line.endswith("bundled: " + ", ".join(recipe_names()))
    assert list(tmp_path.iterdir()) == []  # nothing written at all (no data cache either)


# ---------------------------------------------------------------- qlaunch recipes


def test_every_bundled_recipe_opens_with_what_it_is_for():
    for path in bundled_recipes():
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and len(first) <= 120, path.name


def test_recipes_is_a_table_of_name_model_gpus_and_purpose(tmp_path):
    r = run_cli("recipes", cwd=tmp_path, env=WIDE)
    assert r.returncode == 0, r.stderr
    header = r.stdout.splitlines()[0].split()
    assert [w for w in header if w.isalpha()] == ["name", "model", "GPUs", "for"]
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[2:] if line.strip()}
    assert sorted(rows) == recipe_names()
    for name in recipe_names():
        text = (RECIPES_DIR / f"{name}.toml").read_text()
        data = tomllib.loads(text)
        model = Path(data["model"]["path"]).name
        cells = [c.strip() for c in rows[name].split("│")]
        assert cells[0] == name
        assert cells[1] == (f"{model} (random)" if data["model"].get("init") == "random" else model)
        assert cells[2] == str(data["launch"]["gpus"])
        assert cells[3] == text.splitlines()[0].removeprefix("# ")


# ---------------------------------------------------------------- qlaunch recipes cp


def test_portable_text_makes_only_the_relative_local_paths_absolute(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "d.jsonl").write_text("{}\n")
    text = (
        "# uses 'm' and ../m in prose\n"
        '[model]\npath = "m"\ntokenizer = "org/tok"\n'
        "[data]\ndatasets = [{ path = 'd.jsonl' }, { path = \"gone.jsonl\" }]\n"
        f'val_path = "{tmp_path / "d.jsonl"}"\n'
    )
    out = portable_text(text, tmp_path)
    assert out == (
        "# uses 'm' and ../m in prose\n"
        f'[model]\npath = "{tmp_path / "m"}"\ntokenizer = "org/tok"\n'
        f'[data]\ndatasets = [{{ path = "{tmp_path / "d.jsonl"}" }}, {{ path = "gone.jsonl" }}]\n'
        f'val_path = "{tmp_path / "d.jsonl"}"\n'
    )


def test_a_copied_recipe_plans_and_configures_from_another_directory(tmp_path):
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    r = run_cli("recipes", "cp", "tiny-cpu", "mine", cwd=here)
    assert r.returncode == 0 and r.stdout.strip() == "wrote mine/tiny-cpu.toml", r.stdout + r.stderr
    copy = here / "mine" / "tiny-cpu.toml"
    bundled = (RECIPES_DIR / "tiny-cpu.toml").read_text()
    text = copy.read_text()
    assert "../assets" not in text and f'path = "{ASSETS_DIR / "tiny-llama"}"' in text
    assert [ln for ln in text.splitlines() if ln.startswith("#")] == [
        ln for ln in bundled.splitlines() if ln.startswith("#")
    ]  # comments kept
    assert len(text.splitlines()) == len(bundled.splitlines())  # and the layout

    plan = run_cli("plan", str(copy), "--gpus", "2", cwd=there)
    assert plan.returncode == 0 and "recipe: tiny-cpu" in plan.stdout, plan.stderr
    cfg = run_cli("config", str(copy), "-o", "cfg", cwd=there)
    assert cfg.returncode == 0, cfg.stderr
    rec = tomllib.loads((there / "cfg" / "recipe.toml").read_text())
    assert rec["data"]["val_path"] == str(ASSETS_DIR / "tiny-data" / "val.jsonl")

    copy.write_text(text + "# my edit\n")
    again = run_cli("recipes", "cp", "tiny-cpu", "mine", cwd=here)
    assert_one_line_error(again, ["mine/tiny-cpu.toml: already exists", "--force"], here / "runs")
    assert copy.read_text().endswith("# my edit\n")  # kept
    forced = run_cli("recipes", "cp", "tiny-cpu.toml", str(copy), "--force", cwd=there)
    assert forced.returncode == 0 and copy.read_text() == text, forced.stderr


def test_copying_an_unknown_name_lists_the_bundled_ones(tmp_path):
    r = run_cli("recipes", "cp", "phi4-rehersal", cwd=tmp_path)
    line = assert_one_line_error(
        r, ["phi4-rehersal: no bundled recipe of that name (did you mean phi4-rehearsal?)"], tmp_path / "runs"
    )
    assert line.endswith("bundled: " + ", ".join(recipe_names()))
    assert list(tmp_path.iterdir()) == []
