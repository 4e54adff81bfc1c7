"""Every shipped recipe validates, plans and dry-runs; the CLI's help and version work."""

from __future__ import annotations

import re

import pytest

from launcher.plan.bundled import bundled_recipes
from launcher.plan.recipe_file import load_recipe
from tests.conftest import ROOT, run_cli

RECIPES = [p.name for p in bundled_recipes()]


def test_the_bundled_recipes_are_there():
    rehearsals = {
        f"{m}-rehearsal.toml"
        for m in ("llama8b", "llama8b-dpo", "llama3b", "qwen7b", "gemma3-12b", "phi4", "qwen3-30b-a3b")
    }
    assert {"tiny-cpu.toml", "llama70b-qlora.toml", *rehearsals} <= set(RECIPES)


@pytest.mark.parametrize("name", [n for n in RECIPES if n.endswith("-rehearsal.toml")])
def test_rehearsal_recipe_passes_preflight(name, capsys):
    """What `qlaunch run` checks before spawning (a dry run does not): the bundled config builds on meta,
    passes the structural checks and the logit probe, the tied head stays dense, the random source and
    the tiny tokenizer's data (token ids far below the model's vocabulary) are accepted; no warning."""
    from launcher.launch import preflight

    preflight.check(load_recipe(ROOT / "recipes" / name))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_validates(name):
    rec = load_recipe(ROOT / "recipes" / name)
    assert rec.name and rec.quant.storage_dtype == rec.quant.compute_dtype


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_dry_run(name):
    gpus = "8" if "70b" in name else "2"
    r = run_cli("run", f"recipes/{name}", "--gpus", gpus, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert f"--nproc-per-node={gpus}" in r.stdout and "launcher.rank.worker" in r.stdout
    assert "world size: " + gpus in r.stdout


def test_70b_plan_for_8_gpus():
    r = run_cli("plan", "recipes/llama70b-qlora.toml", "--gpus", "8", "--gpu-mem-gb", "80")
    assert r.returncode == 0, r.stderr
    assert "world size: 8" in r.stdout and "fits" in r.stdout


def test_recipes_list_and_explain():
    r = run_cli("recipes")
    assert r.returncode == 0 and "tiny-cpu" in r.stdout
    r = run_cli("explain", "quant.storage_dtype")
    assert r.returncode == 0 and "must equal the dtype FSDP computes in" in r.stdout
    r = run_cli("explain", "lora.rnak")
    assert r.returncode == 2 and "did you mean lora.rank?" in r.stderr


def test_explain_shows_choices_and_keys_inside_lists():
    """A choice field lists its values as a recipe writes them; keys of list entries (data.datasets.path)
    are found, and the list itself shows its entries' keys."""
    from launcher.plan.explain import explain

    assert '["cosine" | "linear" | "constant"; default \'cosine\']' in explain("train.schedule")
    assert '[4 | 8 | "none"; default 4]' in explain("quant.bits")
    assert '[int | "auto"; default 1]' in explain("train.micro_batch")
    assert explain("data.datasets.path").startswith("data.datasets.path: A .jsonl")
    rows = explain("data.datasets").splitlines()
    assert rows[1] == "[[data.datasets]] (each entry)" and any(r.startswith("  weight: ") for r in rows)
    assert "[[" not in explain("train")  # a plain section is a table


@pytest.mark.parametrize(
    "key, want",
    [
        ("train.learning_rate", "train.lr"),  # TrainingArguments' name (difflib would say train.min_lr_ratio)
        ("lora.lora_alpha", "lora.alpha"),
        ("data.max_seq_length", "data.seq_len"),
        ("train.gradient_accumulation_steps", "train.global_batch"),
        ("lora.rnak", "lora.rank"),  # spelling: still difflib's
        ("data.datasets.wieght", "data.datasets.weight"),
    ],
)
def test_unknown_keys_point_to_the_qlaunch_key(key, want):
    from launcher.errors import RecipeError
    from launcher.plan.explain import explain
    from launcher.plan.key_aliases import ALIASES
    from launcher.plan.recipe import SCHEMA_KEYS

    assert all(target in SCHEMA_KEYS for target in ALIASES.values())  # every alias names a real key
    with pytest.raises(RecipeError, match=rf"unknown key '{re.escape(key)}' \(did you mean {re.escape(want)}\?\)"):
        explain(key)


def test_version_and_help():
    from launcher import __version__

    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"qlaunch {__version__}"
    r = run_cli("--help")
    assert r.returncode == 0
    commands = ["run", "plan", "config", "recipes", "explain", "quantize", "merge", "doctor", "report", "slurm"]
    for cmd in commands:
        assert cmd in r.stdout, cmd
        sub = run_cli(cmd, "--help")
        assert sub.returncode == 0 and "Usage:" in sub.stdout, cmd
