"""Every class of bad input: one line naming the file/key/line and what would be valid, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from launcher.errors import UserError
from launcher.plan.plan import Cluster, make_plan
from launcher.plan.recipe_file import load_recipe
from tests.conftest import BASE_RECIPE, TINY_DATA, TINY_MODEL, assert_one_line_error, run_cli


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
    assert r.stderr.strip().startswith(
        "qlaunch: error: recipes/tiny-cpuu.toml: no such recipe file, nor a bundled recipe (did you mean tiny-cpu?); "
        "bundled: gemma3-12b-rehearsal, "
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
    """GPT-2 is a causal LM transformers builds, but its projections are Conv1D modules, not nn.Linear."""
    d = _model_copy(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    check_error(
        tmp_path,
        BASE_RECIPE.replace(str(TINY_MODEL), str(d)),
        expect=["config.json", "transformer.h.0.attn.c_attn is a Conv1D, not an nn.Linear"],
    )


def _config_dir(tmp_path: Path, model_type: str, **overrides) -> Path:
    """A model directory with only a config.json of MODEL_TYPE (tiny sizes): the refusals come before
    any weight is read."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    d = tmp_path / "model"
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512, pad_token_id=2, bos_token_id=0, eos_token_id=1)  # fmt: skip
    config = AutoConfig.for_model(model_type, **{**sizes, **overrides})
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__name__]
    config.save_pretrained(d)
    shutil.copy(TINY_MODEL / "tokenizer.json", d / "tokenizer.json")
    return d


@pytest.mark.parametrize(
    "model_type, overrides, expect",
    [
        ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
         ["Qwen2MoeForCausalLM is a mixture-of-experts model (num_experts = 4)", "trains mixtral, qwen3_moe only"]),
        ("cohere", {}, ["CohereForCausalLM computes its logits in a way qlaunch's loss does not reproduce"]),
        ("gemma2", dict(attn_logit_softcapping=50.0),
         ["model.attn_implementation = 'sdpa'", "attn_logit_softcapping = 50", 'model.attn_implementation = "eager"']),
    ],
    ids=["moe", "head-side-code", "attention-softcap"],
)  # fmt: skip
def test_architecture_qlaunch_cannot_train(tmp_path, model_type, overrides, expect):
    d = _config_dir(tmp_path, model_type, **overrides)
    check_error(tmp_path, BASE_RECIPE.replace(str(TINY_MODEL), str(d)), expect=expect)


def test_multimodal_checkpoint_refused(tmp_path):
    """Gemma 3 4B-27B hub checkpoints are Gemma3ForConditionalGeneration: text weights under another prefix."""
    d = _model_copy(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    text = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}
    (d / "config.json").write_text(
        json.dumps({"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "text_config": text})
    )
    check_error(
        tmp_path,
        BASE_RECIPE.replace(str(TINY_MODEL), str(d)),
        expect=["Gemma3ForConditionalGeneration is a multimodal checkpoint", "text-only"],
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


def test_quantized_tied_head_refused(tmp_path):
    """A tied head quantized would get packed bytes of its own while the embedding keeps the dense weight."""
    d = _model_copy(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    check_error(
        tmp_path,
        BASE_RECIPE.replace(str(TINY_MODEL), str(d)) + "\n",
        "--set",
        "quant.skip_modules=[]",
        expect=["quant.skip_modules = []", "lm_head shares its weight with the input embedding", "add 'lm_head'"],
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


# ---------------------------------------------------------------- non-finite and out-of-range numbers


def _set_key(text: str, section: str, key: str, literal: str) -> tuple[str, int]:
    """The recipe text with `key = literal` in [section] (replacing the key's line if there is one), and its line."""
    lines = text.splitlines()
    start = lines.index(f"[{section}]")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    at = next((i for i in range(start + 1, end) if lines[i].startswith(f"{key} =")), None)
    if at is None:
        at = start + 1
        lines.insert(at, "")
    lines[at] = f"{key} = {literal}"
    return "\n".join(lines) + "\n", at + 1


FLOAT_KEYS = [
    ("train", "lr"),
    ("lora", "alpha"),
    ("train", "weight_decay"),
    ("train", "epochs"),
    ("train", "grad_clip"),
    ("train", "min_lr_ratio"),
    ("lora", "dropout"),
    ("data", "val_fraction"),
    ("launch", "gpu_memory_gb"),
]
# TOML literal -> the float it parses to, as the message shows it (1e400 overflows to inf).
NON_FINITE = {"inf": "inf", "nan": "nan", "-inf": "-inf", "+inf": "inf", "1e400": "inf", "-1e400": "-inf"}


@pytest.mark.parametrize("literal", list(NON_FINITE))
@pytest.mark.parametrize("section,key", FLOAT_KEYS)
def test_non_finite_floats_are_refused_in_the_file_and_with_set(tmp_path, section, key, literal):
    want = f"{section}.{key} = {NON_FINITE[literal]}: must be a finite number"
    text, line = _set_key(BASE_RECIPE, section, key, literal)
    (tmp_path / "recipe.toml").write_text(text)
    with pytest.raises(UserError) as err:
        load_recipe(tmp_path / "recipe.toml")
    assert str(err.value).startswith(f"{tmp_path / 'recipe.toml'}:{line}: {want}"), str(err.value)
    (tmp_path / "base.toml").write_text(BASE_RECIPE)
    with pytest.raises(UserError) as err:
        load_recipe(tmp_path / "base.toml", [f"{section}.{key}={literal}"])
    assert str(err.value).startswith(f"--set '{section}.{key}={literal}': {want}"), str(err.value)


@pytest.mark.parametrize(
    "override,expect",
    [
        ("train.betas=[0.9, nan]", "train.betas[1] = nan: must be a finite number"),
        ("train.betas=[inf, 0.9]", "train.betas[0] = inf: must be a finite number"),
        ("train.betas=[1.0, 0.999]", "train.betas[0] = 1.0: input should be less than 1"),
        ("train.betas=[0.9, -0.1]", "train.betas[1] = -0.1: input should be greater than or equal to 0"),
        ("train.betas=[0.9]", "train.betas[1] is missing: train.betas needs more items"),
        ("launch.gpus=true", "launch.gpus = true: input should be a number, not true or false"),
        ("train.lr=false", "train.lr = false: input should be a number, not true or false"),
        ("log.profile_steps=[true, 2]", "log.profile_steps[0] = true: input should be a number, not true"),
        ("lora.target_modules=[]", "lora.target_modules = []: input should be 'all-linear' or list should have at"),
        ("train.micro_batch='x'", "train.micro_batch = 'x': input should be a valid integer, unable to parse"),
        ('data.datasets=[{path = "d.jsonl", weight = inf}]', "data.datasets[0].weight = inf: must be a finite"),
        ('data.datasets=[{path = "d.jsonl", weight = 1e9}]', "data.datasets[0].weight = 1000000000.0: input should"),
        ("train.seed=-1", "train.seed = -1: input should be greater than or equal to 0"),
        ("train.seed=2147483648", "train.seed = 2147483648: input should be less than 2147483648"),
        ("lora.init_seed=-1", "lora.init_seed = -1: input should be greater than or equal to 0"),
        ("train.epochs=1e7", "train.epochs = 10000000.0: input should be less than or equal to 1000000"),
        ("train.max_steps=9223372036854775807", "train.max_steps = 9223372036854775807: input should be less"),
        ("train.warmup_steps=10000000000", "train.warmup_steps = 10000000000: input should be less"),
        ("data.seq_len=4194304", "data.seq_len = 4194304: input should be less than or equal to 1048576"),
        ("train.global_batch=4194304", "train.global_batch = 4194304: input should be less than or equal"),
        ("train.micro_batch=0", "train.micro_batch = 0: must be 1..65536 or 'auto'"),
        ("train.micro_batch=1000000", "train.micro_batch = 1000000: must be 1..65536 or 'auto'"),
        ("train.eval_every=10000000000", "train.eval_every = 10000000000: input should be less"),
        ("checkpoint.every_steps=10000000000", "checkpoint.every_steps = 10000000000: input should be less"),
        ("log.every_steps=10000000000", "log.every_steps = 10000000000: input should be less"),
        ("log.profile_steps=[1, 10000000000]", "log.profile_steps = [1, 10000000000]: need 1 <= first <= last <="),
        ("launch.gpus=5000", "launch.gpus = 5000: input should be less than or equal to 1024"),
        ("launch.nnodes=1000000", "launch.nnodes = 1000000: input should be less than or equal to 65536"),
        ("launch.gpu_memory_gb=1e300", "launch.gpu_memory_gb = 1e+300: input should be less than or equal"),
        ("launch.gpu_memory_gb=1e-300", "launch.gpu_memory_gb = 1e-300: input should be greater than or equal to 1"),
    ],
)
def test_out_of_range_numbers_are_refused_at_validation(recipe_file, override, expect):
    with pytest.raises(UserError) as err:
        load_recipe(recipe_file(), [override])
    assert str(err.value).startswith(f"--set {override!r}: {expect}"), str(err.value)


def test_largest_accepted_values_still_validate(recipe_file):
    sets = ["train.seed=2147483647", "lora.init_seed=2147483647", "train.betas=[0.0, 0.9999]", "train.lr=0"]
    rec = load_recipe(recipe_file(), [*sets, "train.max_steps=1000000000", "data.seq_len=1048576"])
    assert (rec.train.seed, rec.train.betas, rec.data.seq_len) == (2**31 - 1, (0.0, 0.9999), 2**20)


def test_infinite_lr_in_the_file_through_the_cli(tmp_path):
    check_error(tmp_path, BASE_RECIPE.replace("lr = 1e-3", "lr = 1e400"), expect=["recipe.toml:18: train.lr = inf"])


def test_negative_seed_with_set_through_the_cli(tmp_path):
    msg = check_error(tmp_path, BASE_RECIPE, "--set", "train.seed=-1", expect=["--set 'train.seed=-1': train.seed"])
    assert "recipe.toml" not in msg


# ---------------------------------------------------------------- --set errors name the override


def test_set_value_error_names_the_override_not_the_file_line(recipe_file):
    with pytest.raises(UserError) as err:
        load_recipe(recipe_file(), ["train.lr=-1"])  # lr is on line 18 of the file, but -1 came from --set
    assert str(err.value).startswith("--set 'train.lr=-1': train.lr = -1: input should be greater"), str(err.value)


def test_set_of_a_whole_table_is_named_for_a_key_inside_it(recipe_file):
    with pytest.raises(UserError) as err:
        load_recipe(recipe_file(), ["lora={rank = 0}"])
    assert str(err.value).startswith("--set 'lora={rank = 0}': lora.rank = 0: input should be greater"), str(err.value)


def test_cross_field_error_from_set_names_the_override(recipe_file):
    with pytest.raises(UserError) as err:
        load_recipe(recipe_file(), ['quant.storage_dtype="float16"'])
    assert str(err.value).startswith("--set 'quant.storage_dtype=\"float16\"': quant.storage_dtype = 'float16' but")


def test_file_errors_keep_their_line_when_another_key_is_set(recipe_file):
    path = recipe_file(BASE_RECIPE.replace("rank = 8", "rank = 0"))
    with pytest.raises(UserError) as err:
        load_recipe(path, ["train.lr=1e-4"])
    assert str(err.value).startswith(f"{path}:8: lora.rank = 0: input should be greater"), str(err.value)


def test_cross_field_error_in_the_file_names_its_key_line(recipe_file):
    path = recipe_file(BASE_RECIPE.replace("micro_batch = 2", "micro_batch = 0"))
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert str(err.value).startswith(f"{path}:16: train.micro_batch = 0: must be 1.."), str(err.value)


# ---------------------------------------------------------------- recipe files that are not a recipe


def test_deeply_nested_toml_array(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    check_error(
        tmp_path, BASE_RECIPE + f"x = {deep}\n", expect=["recipe.toml: arrays or inline tables nest too deeply"]
    )


def test_deeply_nested_inline_tables(tmp_path):
    deep = "{a = " * 5000 + "1" + "}" * 5000
    check_error(tmp_path, f"x = {deep}\n" + BASE_RECIPE, expect=["recipe.toml: arrays or inline tables nest too"])


def test_nesting_python_can_parse_is_still_refused(recipe_file):
    """40 levels parse, but no recipe key needs more than a few, and deeper values would recurse later."""
    with pytest.raises(UserError, match=r"recipe.toml: arrays or tables nest more than 32 levels deep"):
        load_recipe(recipe_file(BASE_RECIPE + "x = " + "[" * 40 + "]" * 40 + "\n"))


def test_deeply_nested_set_value(tmp_path):
    deep = "[" * 50_000 + "]" * 50_000  # one argument of a command line holds at most 128 KiB
    msg = check_error(tmp_path, BASE_RECIPE, "--set", f"lora.target_modules={deep}", expect=["nests arrays or tables"])
    assert msg.startswith("qlaunch: error: --set 'lora.target_modules=[[[[") and len(msg) < 300


def test_recipe_that_is_not_utf8(tmp_path):
    (tmp_path / "recipe.toml").write_bytes(BASE_RECIPE.encode() + b'extra = "caf\xe9"\n')
    line = BASE_RECIPE.count("\n") + 1
    msg = check_error(tmp_path, None, expect=[f"recipe.toml:{line}: not UTF-8 text", "a recipe is a UTF-8 TOML file"])
    assert "\\xe9" not in msg and "0xe9" not in msg, "the file's bytes are not echoed"


def test_recipe_syntax_error_does_not_echo_the_files_characters(recipe_file):
    with pytest.raises(UserError) as err:
        load_recipe(recipe_file(BASE_RECIPE + 'x = "a\x01b"\n'))
    line = BASE_RECIPE.count("\n") + 1
    assert f"Illegal character (at line {line}," in str(err.value) and "x01" not in str(err.value), str(err.value)


def test_recipe_path_is_a_directory(tmp_path):
    (tmp_path / "recipe.toml").mkdir()
    check_error(tmp_path, None, expect=["recipe.toml: is a directory, not a recipe file"])


def test_recipe_path_is_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "recipe.toml")  # opening it for reading would wait for a writer forever
    check_error(tmp_path, None, expect=["recipe.toml: not a regular file (a FIFO, socket or device)"])


def test_recipe_file_too_large(recipe_file):
    with pytest.raises(UserError, match=r"recipe.toml: \d+ bytes is too large for a recipe \(at most 4194304\)"):
        load_recipe(recipe_file(BASE_RECIPE + "#" * (5 * 2**20) + "\n"))


def test_unreadable_recipe(tmp_path, recipe_file):
    path = recipe_file()
    path.chmod(0)
    if os.access(path, os.R_OK):
        pytest.skip("running as root: permissions do not stop reading")
    with pytest.raises(UserError, match=r"recipe.toml: cannot open the recipe \(Permission denied\)"):
        load_recipe(path)


def test_byte_order_mark_is_accepted(recipe_file):
    path = recipe_file()
    path.write_bytes(b"\xef\xbb\xbf" + BASE_RECIPE.encode())
    assert load_recipe(path).name == "t"


# ---------------------------------------------------------------- run names, chat templates


@pytest.mark.parametrize("name", ["../../x", "..", ".", ".hidden", "", "a/b", "a\\b", "x y", "é", "x" * 129, "-\n"])
def test_run_name_must_be_one_plain_directory_name(recipe_file, name):
    path = recipe_file(BASE_RECIPE.replace('name = "t"', f"name = {json.dumps(name)}"))
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert str(err.value).startswith(f"{path}:2: name = {name!r}"[:60]), str(err.value)
    assert "letters, digits, '.', '_' or '-', not starting with '.'" in str(err.value)


@pytest.mark.parametrize("name", ["t", "llama-70b_qlora.v2", "-x", "_", "x" * 128])
def test_valid_run_names(recipe_file, name):
    assert load_recipe(recipe_file(BASE_RECIPE.replace('name = "t"', f'name = "{name}"'))).name == name


def test_run_name_escaping_runs_dir_writes_nothing(tmp_path):
    runs = tmp_path / "a" / "b" / "runs"  # runs/../../escape would be tmp_path/a/escape
    check_error(
        tmp_path,
        BASE_RECIPE.replace('name = "t"', 'name = "../../escape"'),
        "--set",
        f"log.runs_dir='{runs}'",
        expect=["recipe.toml:2: name = '../../escape'"],
    )
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["recipe.toml"]


@pytest.mark.parametrize("template", ["chatml2", "llama-3", "", "{ role }"])
def test_chat_template_that_is_no_name_and_not_jinja(recipe_file, template):
    path = recipe_file(BASE_RECIPE.replace('format = "alpaca"', f'format = "chat"\nchat_template = "{template}"'))
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert str(err.value).startswith(f"{path}:13: data.chat_template = {template!r}: neither a template name (")
    assert "chatml, qwen, llama3, gemma, mistral, phi, phi4, 'tokenizer')" in str(err.value)


@pytest.mark.parametrize("name", ["chatml", "qwen", "llama3", "gemma", "mistral", "phi", "phi4", "tokenizer"])
def test_chat_template_names_are_accepted(recipe_file, name):
    rec = load_recipe(recipe_file(), ['data.format="chat"', f'data.chat_template="{name}"'])
    assert rec.data.chat_template == name


def test_chat_template_with_jinja_is_accepted(recipe_file):
    for template in ["{{ messages[0]['content'] }}", "{% for m in messages %}{{ m.content }}{% endfor %}"]:
        rec = load_recipe(recipe_file(), ['data.format="chat"', f"data.chat_template={json.dumps(template)}"])
        assert rec.data.chat_template == template


TEMPLATE_TEXT = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def test_chat_template_file_is_read_relative_to_the_recipe_into_the_run_recipe(tmp_path, monkeypatch):
    """A .jinja name is a file beside the recipe (not in the current directory); its text replaces the name in
    the resolved recipe, which the run directory keeps, so the run no longer depends on the file."""
    (tmp_path / "proj/templates").mkdir(parents=True)
    (tmp_path / "proj/templates/mine.jinja").write_text(TEMPLATE_TEXT)
    recipe = tmp_path / "proj/recipe.toml"
    recipe.write_text(
        BASE_RECIPE.replace('format = "alpaca"', 'format = "chat"\nchat_template = "templates/mine.jinja"')
    )
    (tmp_path / "work/templates").mkdir(parents=True)
    (tmp_path / "work/templates/mine.jinja").write_text("{{ 'planted' }}")  # same relative name, other directory
    monkeypatch.chdir(tmp_path / "work")
    assert load_recipe(recipe).data.chat_template == TEMPLATE_TEXT
    # with --set, a relative name is where it was typed: the current directory
    assert load_recipe(recipe, ['data.chat_template="templates/mine.jinja"']).data.chat_template == "{{ 'planted' }}"


@pytest.mark.parametrize(
    "content, expect",
    [
        (None, ["data.chat_template = 'missing.jinja':", "missing.jinja does not exist"]),
        ("no braces at all", ["mine.jinja: the chat template file (data.chat_template) holds no Jinja"]),
        (b"\xff\xfe{{ x }}", ["mine.jinja: the chat template file (data.chat_template) is not UTF-8 text"]),
    ],
)
def test_chat_template_file_that_is_missing_or_not_a_template(tmp_path, content, expect):
    name = "missing.jinja" if content is None else "mine.jinja"
    if content is not None:
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    text = BASE_RECIPE.replace('format = "alpaca"', f'format = "chat"\nchat_template = "{name}"')
    check_error(tmp_path, text, expect=expect)


# ---------------------------------------------------------------- paths: relative to the recipe file


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """A recipe in proj/recipes/ naming ../assets/model and data.jsonl beside it, and a current directory
    (work/sub/) where someone planted the same relative names."""
    real = {"model": tmp_path / "proj/assets/model", "data": tmp_path / "proj/recipes/data.jsonl"}
    cwd = tmp_path / "work/sub"
    fake = {"model": tmp_path / "work/assets/model", "data": cwd / "data.jsonl"}
    for group in (real, fake):
        group["model"].mkdir(parents=True)
        shutil.copy(TINY_MODEL / "config.json", group["model"] / "config.json")
        group["data"].parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(TINY_DATA / "train.jsonl", group["data"])
    text = BASE_RECIPE.replace(str(TINY_MODEL), "../assets/model").replace(str(TINY_DATA / "train.jsonl"), "data.jsonl")
    (tmp_path / "proj/recipes/r.toml").write_text(text)
    monkeypatch.chdir(cwd)
    return tmp_path / "proj/recipes/r.toml", real, fake


def test_recipe_paths_resolve_next_to_the_recipe_not_in_the_current_directory(planted):
    recipe, real, _ = planted
    rec = load_recipe(recipe)
    assert rec.model.path == str(real["model"].resolve())
    assert rec.data.datasets[0].path == str(real["data"].resolve())


def test_set_paths_resolve_in_the_current_directory(planted):
    recipe, _, fake = planted
    rec = load_recipe(recipe, ['model.path="../assets/model"', 'data.datasets=[{path = "data.jsonl"}]'])
    assert rec.model.path == str(fake["model"].resolve())
    assert rec.data.datasets[0].path == str(fake["data"].resolve())


def test_missing_recipe_path_is_not_looked_up_in_the_current_directory(planted):
    recipe, real, fake = planted
    shutil.rmtree(real["model"])
    rec = load_recipe(recipe)
    assert rec.model.path == str(real["model"])  # absolute and missing: preflight names it; the planted one is unused


def test_hub_ids_stay_hub_ids(planted, tmp_path):
    recipe, _, _ = planted
    (Path.cwd() / "someorg" / "some-data").mkdir(parents=True)  # planted in the current directory
    rec = load_recipe(recipe, ['model.tokenizer="meta-llama/Llama-3.1-8B"'])
    assert rec.model.tokenizer == "meta-llama/Llama-3.1-8B"
    text = recipe.read_text().replace('"data.jsonl"', '"someorg/some-data"')
    recipe.write_text(text)
    rec = load_recipe(recipe)
    assert rec.data.datasets[0].path == "someorg/some-data"
    from launcher.data.read import classify

    assert classify(rec.data.datasets[0].path, "train", "data.datasets[0].path").kind == "hub"


def test_home_and_absolute_paths_stay_as_they_are(planted, tmp_path, monkeypatch):
    recipe, real, _ = planted
    monkeypatch.setenv("HOME", str(tmp_path / "proj"))
    rec = load_recipe(recipe, ['model.path="~/assets/model"', f'data.val_path="{real["data"]}"'])
    assert (rec.model.path, rec.data.val_path) == (str(real["model"].resolve()), str(real["data"].resolve()))


def test_bundled_recipes_resolve_from_any_directory(tmp_path, monkeypatch):
    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(tmp_path)
    for recipe in sorted((root / "recipes").glob("*.toml")):
        rec = load_recipe(recipe)
        for p in (rec.model.path, rec.model.tokenizer, *(d.path for d in rec.data.datasets), rec.data.val_path):
            assert p is None or (Path(p).is_absolute() and Path(p).exists()), (recipe.name, p)


def test_data_suffixes_agree_with_the_data_loader():
    from launcher.data.source import FILE_KINDS, HUB_ID_PATTERN
    from launcher.plan.recipe_file import DATA_FILE_SUFFIXES, HUB_ID

    assert set(DATA_FILE_SUFFIXES) == set(FILE_KINDS)
    assert HUB_ID.pattern == HUB_ID_PATTERN.pattern


# ---------------------------------------------------------------- data files that are not data


def test_fifo_as_a_data_file(tmp_path):
    from launcher.data.read import classify

    os.mkfifo(tmp_path / "train.jsonl")
    with pytest.raises(UserError, match=r"train.jsonl: not a regular file \(a FIFO, socket or device\) \(data.d"):
        classify(str(tmp_path / "train.jsonl"), "train", "data.datasets[0].path")


def test_deeply_nested_json_row_names_file_and_line(tmp_path):
    data = tmp_path / "deep.jsonl"
    deep = "[" * 100_000 + "]" * 100_000
    data.write_text('{"instruction": "i", "output": "o"}\n' * 3 + f'{{"instruction": "i", "output": {deep}}}\n')
    check_error(
        tmp_path,
        BASE_RECIPE.replace(str(TINY_DATA / "train.jsonl"), str(data)),
        expect=[f"{data}:4: JSON nested too deeply"],
    )


def test_deeply_nested_json_array_file(tmp_path):
    from launcher.data.json_rows import read_json_rows

    data = tmp_path / "deep.json"
    data.write_text('[{"instruction": "i", "output": ' + "[" * 100_000 + "]" * 100_000 + "}]")
    with pytest.raises(UserError, match=r"deep.json: JSON nested too deeply"):
        read_json_rows(data)


# ---------------------------------------------------------------- numbers and booleans are what TOML wrote


@pytest.mark.parametrize(
    "override,expect",
    [
        ("lora.rank=1e3", "lora.rank = 1000.0: input should be an integer, not a float (write 1000)"),
        ("lora.rank=8.5", "lora.rank = 8.5: input should be an integer, not a float"),
        ("lora.rank=1e300", "lora.rank = 1e+300: input should be an integer, not a float\n"),  # no 301-digit hint
        ("launch.gpus=2.0", "launch.gpus = 2.0: input should be an integer, not a float (write 2)"),
        ('lora.rank="8"', "lora.rank = '8': input should be an integer, not a string (write it without quotes)"),
        ('train.lr="1e-3"', "train.lr = '1e-3': input should be a number, not a string (write it without quotes)"),
        ('train.betas=["0.9", 0.99]', "train.betas[0] = '0.9': input should be a number, not a string"),
        ('log.memory_steps=["1", "2"]', "log.memory_steps[0] = '1': input should be an integer, not a string"),
        ("log.profile_steps=[1.0, 2]", "log.profile_steps[0] = 1.0: input should be an integer, not a float"),
        ('train.micro_batch="8"', "train.micro_batch = '8': input should be an integer, not a string"),
        ("quant.blocksize=64.0", "quant.blocksize = 64.0: input should be an integer, not a float (write 64)"),
        ('quant.bits="4"', "quant.bits = '4': input should be an integer, not a string"),
        ("parallel.deepspeed.stage=3.0", "parallel.deepspeed.stage = 3.0: input should be an integer, not a float"),
        ("model.trust_remote_code=1", "model.trust_remote_code = 1: input should be true or false"),
        ('lora.use_dora="yes"', "lora.use_dora = 'yes': input should be true or false"),
        ("train.compile=1", "train.compile = 1: input should be true or false or input should be 'auto'"),
        ("train.lr=1979-05-27", "train.lr = 1979-05-27: input should be a valid number"),
        ("train.lr=07:32:00", "train.lr = 07:32:00: input should be a valid number"),
        ('model.path=""', "model.path = '': input should be a path, not an empty string"),
        ('model.tokenizer=" "', "model.tokenizer = ' ': input should be a path, not an empty string"),
        ('data.val_path=""', "data.val_path = '': input should be a path, not an empty string"),
        ('data.datasets=[{path = ""}]', "data.datasets[0].path = '': input should be a path, not an empty string"),
        ('log.runs_dir=""', "log.runs_dir = '': input should be a path, not an empty string"),
    ],
)
def test_numbers_and_booleans_are_strict(recipe_file, override, expect):
    """pydantic's lax mode took 1e3 as the integer 1000, "1e-3" as a float and 1 as true; a date showed as
    Python's datetime.date(1979, 5, 27); an empty path stood for the recipe's own directory."""
    with pytest.raises(UserError) as err:
        load_recipe(recipe_file(), [override])
    assert (str(err.value) + "\n").startswith(f"--set {override!r}: {expect}"), str(err.value)


def test_strict_numbers_in_the_file_name_their_line(recipe_file):
    path = recipe_file(BASE_RECIPE.replace("rank = 8", "rank = 1e3"))
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert str(err.value) == f"{path}:8: lora.rank = 1000.0: input should be an integer, not a float (write 1000)"


def test_numbers_and_booleans_of_the_right_type_still_validate(recipe_file):
    sets = [
        "train.lr=1",
        "lora.alpha=16",
        "train.betas=[0, 0.5]",
        "model.trust_remote_code=false",
        "train.compile=true",
    ]
    rec = load_recipe(recipe_file(), [*sets, "quant.blocksize=128", 'train.micro_batch="auto"', "lora.dropout=0"])
    assert (rec.train.lr, rec.train.betas, rec.quant.blocksize, rec.train.compile) == (1.0, (0.0, 0.5), 128, True)


def _datasets_as_array_of_tables(text: str) -> str:
    """BASE_RECIPE with its dataset as a [[data.datasets]] table (the key `wieght` misspelt) before [train]."""
    line = next(ln for ln in text.splitlines() if ln.startswith("datasets = "))
    path = line.split('"')[1]
    table = f'[[data.datasets]]\nwieght = 1\npath = "{path}"\n'
    return text.replace(line + "\n", "").replace("[train]", table + "[train]")


@pytest.mark.parametrize("form", ["inline table", "array of tables"])
def test_unknown_key_inside_a_dataset_names_its_index_line_and_sibling(recipe_file, form):
    """It said `unknown key 'data.datasets.wieght' (did you mean data.datasets?)` with no line."""
    if form == "inline table":
        text = BASE_RECIPE.replace("datasets = [{ path", "datasets = [{ wieght = 1, path")
    else:
        text = _datasets_as_array_of_tables(BASE_RECIPE)
    path = recipe_file(text)
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "wieght" in ln)
    with pytest.raises(UserError) as err:
        load_recipe(path)
    want = f"{path}:{line}: unknown key 'data.datasets[0].wieght' (did you mean data.datasets[0].weight?)"
    assert str(err.value) == want, str(err.value)


# ---------------------------------------------------------------- flags: named as flags, checked before anything


def test_flag_values_are_named_by_their_flag_not_as_set(recipe_file):
    from launcher.launch.prepare import flag_overrides as _overrides

    with pytest.raises(UserError) as err:
        load_recipe(recipe_file(), _overrides(None, None, "100000000000000000000"))
    assert str(err.value).startswith("--nnodes 100000000000000000000: launch.nnodes = 100000000000000000000: input")
    with pytest.raises(UserError) as err:
        load_recipe(recipe_file(), _overrides(["train.lr=1e-4"], 5000, None))
    assert str(err.value).startswith("--gpus 5000: launch.gpus = 5000: input should be less than"), str(err.value)
    with pytest.raises(UserError) as err:  # `qlaunch slurm` calls them --gpus-per-node and --nodes
        load_recipe(recipe_file(), _overrides(["launch.master_port=65535"], 2, "2", ("--gpus-per-node", "--nodes")))
    assert str(err.value).startswith("--set 'launch.master_port=65535': launch.master_port"), str(err.value)
    with pytest.raises(UserError) as err:
        load_recipe(recipe_file(), _overrides(None, 2, "100000", ("--gpus-per-node", "--nodes")))
    assert str(err.value).startswith("--nodes 100000: launch.nnodes = 100000: input should be less"), str(err.value)


@pytest.mark.parametrize(
    "overrides,expect",
    [
        (["launch.nnodes=2", "launch.master_port=65535"], "--set 'launch.master_port=65535': launch.master_port = "),
        (["launch.master_port=65534", "launch.nnodes=2"], None),
        (["launch.master_port=65535"], None),  # one node: no node watch
    ],
)
def test_multi_node_master_port_leaves_room_for_the_node_watch(recipe_file, overrides, expect):
    """The node watch binds master_port + 1: 65535 gave an OverflowError traceback after the run dir was written."""
    if expect is None:
        port = next(int(o.split("=")[1]) for o in overrides if o.startswith("launch.master_port="))
        assert load_recipe(recipe_file(), overrides).launch.master_port == port
        return
    with pytest.raises(UserError) as err:
        load_recipe(recipe_file(), overrides)
    assert str(err.value).startswith(expect) and "must be 1..65534" in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "args,expect",
    [
        (
            ["--rdzv-endpoint", "localhost:65535"],
            "--rdzv-endpoint localhost:65535: port 65535 is out of range; use 1..65534",
        ),
        (["--rdzv-endpoint", "localhost:99999"], "--rdzv-endpoint localhost:99999: port 99999 is out of range"),
        (["--rdzv-endpoint", "localhost:0"], "--rdzv-endpoint localhost:0: port 0 is out of range"),
        (["--nnodes", "2", "--master-port", "65535"], "--master-port 65535: launch.master_port = 65535: a multi-node"),
        (["--node-rank", "3"], "--node-rank 3: the run has 1 node(s)"),
    ],
)
def test_multi_node_flags_checked_before_anything_is_written(tmp_path, args, expect):
    """`--node-rank 3` alone ran as a single node and exited 0; the ports gave tracebacks after the run dir."""
    check_error(tmp_path, BASE_RECIPE, *args, "--set", "train.global_batch=8", expect=[expect])


# ---------------------------------------------------------------- where the run goes


def test_empty_resume_is_one_line():
    """`--resume ''` printed `--resume : ...`."""
    from launcher.launch.run import recipe_to_run

    for value in ("", "  "):
        with pytest.raises(UserError, match=r"^--resume '': empty; give auto, a run directory or a checkpoint"):
            recipe_to_run("recipe.toml", value)


def test_run_dir_under_a_file_is_refused_before_the_data_is_prepared(tmp_path):
    from types import SimpleNamespace

    from launcher.launch.placement import open_shared_run_dir, shared_run_path

    (tmp_path / "f").write_text("x")
    for given, want in ((tmp_path / "f", "exists and is not a directory"),
                        (tmp_path / "f" / "a" / "run", f"lies under {tmp_path / 'f'}, which exists and is not a")):  # fmt: skip
        with pytest.raises(UserError) as err:
            shared_run_path(None, SimpleNamespace(), str(given), False)
        assert str(err.value).startswith(f"--run-dir {given}: {want}"), str(err.value)
    assert shared_run_path(None, SimpleNamespace(), str(tmp_path / "new" / "run"), False) == tmp_path / "new" / "run"
    # found only when the directory is made (a parent swapped for a file meanwhile): still one line
    with pytest.raises(UserError, match=r"f/run/logs: cannot create the run directory \(Not a directory\); --run-dir"):
        open_shared_run_dir(tmp_path / "f" / "run", 1, 0, None, False)


def test_config_output_under_a_file_is_one_line(tmp_path):
    (tmp_path / "recipe.toml").write_text(BASE_RECIPE)
    (tmp_path / "f").write_text("x")
    r = run_cli("config", str(tmp_path / "recipe.toml"), "-o", str(tmp_path / "f" / "out"), cwd=tmp_path)
    assert_one_line_error(r, [f"-o {tmp_path / 'f' / 'out'}: cannot write the configs into ", "(Not a directory)"],
                          tmp_path / "runs")  # fmt: skip
