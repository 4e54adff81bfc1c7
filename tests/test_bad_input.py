"""Every class of bad input: one line naming the file/key/line and what would be valid, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from launcher.errors import UserError
from launcher.plan import Cluster, make_plan
from launcher.recipe import load_recipe
from tests.conftest import BASE_RECIPE, TINY_MODEL, assert_one_line_error, run_cli


def check_error(tmp_path: Path, recipe_text: str | None, *extra: str, expect: list[str], recipe_name="recipe.toml"):
    """Run `qlaunch run` in tmp_path; assert exit 2, a single 'qlaunch: error:' line, no run directory."""
    path = tmp_path / recipe_name
    if recipe_text is not None:
        path.write_text(recipe_text)
    r = run_cli("run", str(path), *extra, cwd=tmp_path)
    return assert_one_line_error(r, expect, tmp_path / "runs")


def test_toml_syntax_error_names_line_and_column(tmp_path):
    msg = check_error(tmp_path, BASE_RECIPE.replace("rank = 8", "rank = = 8"), expect=["recipe.toml", "TOML syntax"])
    assert "line 8" in msg and "column" in msg


def test_unknown_key_suggests_closest(tmp_path):
    check_error(
        tmp_path,
        BASE_RECIPE.replace("rank = 8", "rnak = 8"),
        expect=["recipe.toml:8", "unknown key 'lora.rnak'", "did you mean lora.rank?"],
    )


def test_unknown_section_suggests_closest(tmp_path):
    check_error(tmp_path, BASE_RECIPE + "\n[trian]\nlr = 1\n", expect=["unknown key 'trian'", "did you mean train?"])


def test_wrong_type(tmp_path):
    check_error(
        tmp_path, BASE_RECIPE.replace("rank = 8", 'rank = "eight"'), expect=["recipe.toml:8", "lora.rank", "integer"]
    )


def test_out_of_range(tmp_path):
    check_error(
        tmp_path, BASE_RECIPE.replace("rank = 8", "rank = 0"), expect=["lora.rank = 0", "greater than or equal to 1"]
    )


def test_bad_choice_lists_valid_values(tmp_path):
    check_error(tmp_path, BASE_RECIPE.replace("bits = 4", "bits = 3"), expect=["quant.bits = 3", "4", "8", "'none'"])


def test_missing_required_key(tmp_path):
    text = BASE_RECIPE.replace(f'path = "{TINY_MODEL}"', 'dtype = "bfloat16"')
    check_error(tmp_path, text, expect=["missing required key 'model.path'"])


def test_unknown_recipe_path_suggests_bundled(tmp_path):
    r = run_cli("run", "recipes/tiny-cpuu.toml", cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 2
    assert (
        r.stderr.strip()
        == "qlaunch: error: recipes/tiny-cpuu.toml: recipe file not found (did you mean recipes/tiny-cpu.toml?)"
    )


def test_set_unknown_key(tmp_path):
    check_error(tmp_path, BASE_RECIPE, "--set", "train.lrr=1", expect=["--set 'train.lrr=1'", "did you mean train.lr?"])


def test_set_bad_literal(tmp_path):
    check_error(tmp_path, BASE_RECIPE, "--set", "train.lr=[1,", expect=["--set 'train.lr=[1,'", "not a TOML value"])


def test_set_value_validated_like_file(tmp_path):
    check_error(tmp_path, BASE_RECIPE, "--set", "train.lr=-1", expect=["train.lr = -1", "greater than or equal to 0"])


def test_storage_dtype_must_match_fsdp_dtype(tmp_path):
    check_error(
        tmp_path,
        BASE_RECIPE,
        "--set",
        'quant.storage_dtype="float16"',
        expect=["quant.storage_dtype = 'float16'", "set quant.storage_dtype = 'bfloat16'"],
    )


def test_global_batch_not_divisible(tmp_path):
    check_error(
        tmp_path,
        BASE_RECIPE,
        "--set",
        "train.global_batch=6",
        expect=["train.global_batch = 6", "micro_batch x world size = 2 x 2 = 4", "valid global batches include 4, 8"],
    )


def test_more_gpus_than_the_machine_has(tmp_path):
    """Planning against a 2-GPU machine: --gpus 4 is refused before anything starts."""
    recipe = tmp_path / "r.toml"
    recipe.write_text(BASE_RECIPE)
    rec = load_recipe(recipe, ["launch.gpus=4", "train.global_batch=8"])
    with pytest.raises(UserError, match=r"--gpus 4 but this machine has 2 CUDA device\(s\); use --gpus 1..2"):
        make_plan(rec, Cluster(cuda_devices=2))


def test_8bit_with_fsdp_refused(tmp_path):
    check_error(
        tmp_path,
        BASE_RECIPE.replace("bits = 4", "bits = 8"),
        expect=["quant.bits = 8 cannot be sharded by FSDP", "stage = 2"],
    )


def test_fsdp_cpu_offload_without_a_gpu(tmp_path):
    check_error(
        tmp_path,
        BASE_RECIPE,
        "--set",
        "parallel.fsdp.cpu_offload=true",
        expect=["parallel.fsdp.cpu_offload = true needs CUDA GPUs", "set it to false"],
    )


def test_model_path_does_not_exist(tmp_path):
    check_error(
        tmp_path,
        BASE_RECIPE.replace(str(TINY_MODEL), "/nonexistent/model/dir"),
        expect=["model.path", "no such directory"],
    )


def test_lora_target_not_in_architecture(tmp_path):
    check_error(
        tmp_path,
        BASE_RECIPE,
        "--set",
        'lora.target_modules=["q_proj", "qq_proj"]',
        expect=["'qq_proj' matches no linear layer", "q_proj", "down_proj"],
    )


def _model_copy(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(TINY_MODEL, d)
    return d


def test_unsupported_architecture(tmp_path):
    d = _model_copy(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    check_error(
        tmp_path,
        BASE_RECIPE.replace(str(TINY_MODEL), str(d)),
        expect=["GPT2LMHeadModel is not supported", "LlamaForCausalLM"],
    )


def test_corrupt_safetensors_header(tmp_path):
    d = _model_copy(tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])  # truncated: the header promises more than the file holds
    check_error(
        tmp_path, BASE_RECIPE.replace(str(TINY_MODEL), str(d)), expect=["model.safetensors: corrupt safetensors file"]
    )


def test_missing_shard_file(tmp_path):
    d = _model_copy(tmp_path)
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    check_error(
        tmp_path,
        BASE_RECIPE.replace(str(TINY_MODEL), str(d)),
        expect=["shard file model-00002-of-00002.safetensors is missing"],
    )


def test_wrong_dtype_in_checkpoint(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    d = _model_copy(tmp_path)
    sd = load_file(str(d / "model.safetensors"))
    sd["model.norm.weight"] = torch.ones_like(sd["model.norm.weight"], dtype=torch.int32)
    save_file(sd, str(d / "model.safetensors"))
    check_error(
        tmp_path,
        BASE_RECIPE.replace(str(TINY_MODEL), str(d)),
        expect=["model.norm.weight has dtype I32", "BF16, F16 or F32"],
    )


def test_wrong_shape_in_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file

    d = _model_copy(tmp_path)
    sd = load_file(str(d / "model.safetensors"))
    sd["model.norm.weight"] = sd["model.norm.weight"][:10].clone()
    save_file(sd, str(d / "model.safetensors"))
    check_error(tmp_path, BASE_RECIPE.replace(str(TINY_MODEL), str(d)), expect=["model.norm.weight' has shape (10,)"])


def test_tied_embeddings_refused(tmp_path):
    d = _model_copy(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    check_error(
        tmp_path,
        BASE_RECIPE.replace(str(TINY_MODEL), str(d)),
        expect=["tie_word_embeddings = true", "not supported yet"],
    )


@pytest.mark.parametrize("key", ["profile_steps", "memory_steps"])
def test_profile_steps_out_of_order(tmp_path, key):
    check_error(
        tmp_path,
        BASE_RECIPE + f"[log]\n{key} = [3, 2]\n",
        expect=[f"log.{key} = [3, 2]", "1 <= first <= last"],
    )


def test_memory_steps_with_compile_on(tmp_path):
    check_error(
        tmp_path,
        BASE_RECIPE.replace("[train]\n", "[train]\ncompile = true\n") + "[log]\nmemory_steps = [2, 3]\n",
        expect=["log.memory_steps cannot record compiled layers", "train.compile = false"],
    )
