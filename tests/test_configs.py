"""The generated accelerate YAML and DeepSpeed JSON: golden renders, and what accelerate's and DeepSpeed's own
parsers make of them.

Renderers are pure functions of (Recipe, Plan), tested without processes. accelerate's FSDP does not engage on
CPU, so its side is checked through the objects its launcher and plugins build from the files; DeepSpeed's
config class parses the JSON in a subprocess (it needs a process group for the data-parallel size).
Regenerate the golden files with QLAUNCH_UPDATE_GOLDEN=1 after an intended change, and review the diff.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from unittest import mock

import pytest
import yaml

from launcher.plan.configs import (
    ACCELERATE_CONFIG_FILE,
    DEEPSPEED_CONFIG_FILE,
    accelerate_config,
    deepspeed_config,
    render_files,
    render_json,
    render_yaml,
)
from launcher.plan.model_info import decoder_layer_class
from launcher.plan.plan import Cluster, make_plan
from launcher.plan.recipe import Recipe
from launcher.plan.recipe_file import apply_overrides, validate
from tests.conftest import BASE_RECIPE, ROOT, run_cli

GOLDEN = Path(__file__).resolve().parent / "golden"
RUN = Path("runs/t/20260101-000000")  # a run directory as the renderers see it (real runs pass an absolute path)

DS3 = ['parallel.backend="deepspeed"', "parallel.deepspeed.stage=3"]
DS2_OFFLOAD = [
    'parallel.backend="deepspeed"',
    "parallel.deepspeed.stage=2",
    "parallel.deepspeed.offload_optimizer=true",
]


def recipe(*overrides: str) -> Recipe:
    return validate(apply_overrides(tomllib.loads(BASE_RECIPE), list(overrides)))


def plan_for(rec: Recipe, gpus: int = 0):
    return make_plan(rec, Cluster(cuda_devices=gpus))


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("QLAUNCH_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"{path} missing; run with QLAUNCH_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{name} differs from its golden file (QLAUNCH_UPDATE_GOLDEN=1 to accept)"


# ------------------------------------------------------------------ golden renders

CASES = {
    # name: (overrides, cuda devices on the launching machine)
    "zero3_cpu": (DS3 + ["launch.gpus=2", "parallel.deepspeed.persistence_threshold=0"], 0),
    "zero3_offload_gpu": (
        DS3
        + ["launch.gpus=8", "train.global_batch=32"]
        + ["parallel.deepspeed.offload_optimizer=true", "parallel.deepspeed.offload_params=true"],
        8,
    ),
    "zero2_offload_gpu_2nodes": (DS2_OFFLOAD + ["launch.gpus=4", "launch.nnodes=2", "train.global_batch=32"], 4),
    "fsdp_gpu": (
        ["launch.gpus=4", "train.global_batch=16", "parallel.fsdp.cpu_offload=true", "train.grad_clip=0.5"],
        4,
    ),
    "none_fp32": (
        [
            'parallel.backend="none"',
            "launch.gpus=1",
            'quant.compute_dtype="float32"',
            'quant.storage_dtype="float32"',
        ],
        0,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_renders(case):
    overrides, gpus = CASES[case]
    rec = recipe(*overrides)
    p = plan_for(rec, gpus)
    files = render_files(rec, p, RUN, "LlamaDecoderLayer", node_rank=1 if p.nnodes > 1 else 0, master_addr="node0")
    golden(f"{case}.{DEEPSPEED_CONFIG_FILE}", files[DEEPSPEED_CONFIG_FILE])
    golden(f"{case}.{ACCELERATE_CONFIG_FILE}", files[ACCELERATE_CONFIG_FILE])
    # The text is the dict, nothing added or lost on the way.
    assert json.loads(files[DEEPSPEED_CONFIG_FILE]) == deepspeed_config(rec, p)
    assert yaml.safe_load(files[ACCELERATE_CONFIG_FILE]) == accelerate_config(
        rec, p, RUN, "LlamaDecoderLayer", 1 if p.nnodes > 1 else 0, "node0"
    )


def test_deepspeed_values_follow_recipe_and_plan():
    rec = recipe(*DS2_OFFLOAD, "launch.gpus=2", "train.global_batch=12", "train.micro_batch=3", "train.grad_clip=0.25")
    p = plan_for(rec)
    c = deepspeed_config(rec, p)
    assert (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"], c["train_batch_size"]) == (3, 2, 12)
    assert c["train_batch_size"] == p.micro_batch * p.grad_accum * p.world_size
    assert c["gradient_clipping"] == 0.25
    assert c["zero_optimization"]["stage"] == 2
    assert c["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert "offload_param" not in c["zero_optimization"]  # a stage-3 key
    assert c["bf16"] == {"enabled": True} and c["fp16"] == {"enabled": False}
    assert c["optimizer"]["params"]["lr"] == rec.train.lr and c["optimizer"]["params"]["torch_adam"] is True

    fp32 = recipe(*DS3, "launch.gpus=1", 'quant.compute_dtype="float32"', 'quant.storage_dtype="float32"')
    c = deepspeed_config(fp32, plan_for(fp32, gpus=1))
    assert c["bf16"]["enabled"] is False and c["fp16"]["enabled"] is False
    assert c["zero_optimization"]["offload_param"] == {"device": "none"}

    # grad_clip None (no clipping; reachable through the API, TOML has no null) renders as DeepSpeed's 0.0 = off
    unclipped = fp32.model_copy(update={"train": fp32.train.model_copy(update={"grad_clip": None})})
    assert deepspeed_config(unclipped, plan_for(unclipped, gpus=1))["gradient_clipping"] == 0.0


def test_layer_class_comes_from_the_model():
    assert decoder_layer_class(recipe()) == "LlamaDecoderLayer"


# ------------------------------------------------------------------ accelerate's own parsers


def accelerate_launch_env(yaml_path: Path, run_dir: Path) -> tuple[object, dict[str, str]]:
    """What `accelerate launch --config_file YAML -m launcher.rank.worker RUN` computes: its args and the environment
    it hands the processes (from which accelerate's plugins read their settings)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(yaml_path), "-m", "launcher.rank.worker", str(run_dir)]
    )
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)  # as accelerate's launch_command does
        cmd, env = prepare_deepspeed_cmd_env(args)
        assert cmd is None  # torch's elastic launcher, not pdsh
    else:
        env = prepare_multi_gpu_env(args)
    return args, env


def write_configs(tmp_path: Path, rec: Recipe, gpus: int) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name, text in render_files(rec, plan_for(rec, gpus), run_dir, "LlamaDecoderLayer").items():
        (run_dir / name).write_text(text)
    return run_dir


def test_accelerate_reads_fsdp2_config(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    rec = recipe(
        "launch.gpus=4",
        "train.global_batch=8",
        "parallel.fsdp.cpu_offload=true",
        "parallel.fsdp.reshard_after_forward=false",
    )
    run_dir = write_configs(tmp_path, rec, gpus=4)
    cfg = load_config_from_file(str(run_dir / ACCELERATE_CONFIG_FILE))
    assert cfg.distributed_type == DistributedType.FSDP
    assert (cfg.num_processes, cfg.num_machines, cfg.mixed_precision) == (4, 1, "bf16")

    args, env = accelerate_launch_env(run_dir / ACCELERATE_CONFIG_FILE, run_dir)
    assert (args.num_processes, args.nproc_per_node) == (4, "4")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = FullyShardedDataParallelPlugin()
        plugin.set_mixed_precision("bf16")
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy

    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is False
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert isinstance(plugin.cpu_offload, CPUOffloadPolicy)
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert plugin.activation_checkpointing is True
    assert plugin.cpu_ram_efficient_loading is True
    assert plugin.mixed_precision_policy.param_dtype == torch.bfloat16


def test_accelerate_reads_deepspeed_config(tmp_path):
    pytest.importorskip("deepspeed")
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    rec = recipe(
        *DS3,
        "launch.gpus=2",
        "train.micro_batch=1",
        "train.global_batch=8",
        "parallel.deepspeed.offload_optimizer=true",
        "parallel.deepspeed.offload_params=true",
    )
    run_dir = write_configs(tmp_path, rec, gpus=0)
    cfg = load_config_from_file(str(run_dir / ACCELERATE_CONFIG_FILE))
    assert cfg.distributed_type == DistributedType.DEEPSPEED
    assert cfg.deepspeed_config["deepspeed_config_file"] == str(run_dir / DEEPSPEED_CONFIG_FILE)
    assert cfg.mixed_precision is None  # precision lives in the JSON; accelerate refuses both

    args, env = accelerate_launch_env(run_dir / ACCELERATE_CONFIG_FILE, run_dir)
    assert (args.num_processes, args.nproc_per_node) == (2, "2")
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = DeepSpeedPlugin()  # also runs accelerate's "no settings beside a config file" check
    assert plugin.zero_stage == 3
    assert plugin.zero3_init_flag is True
    assert plugin.offload_optimizer_device == "cpu" and plugin.offload_param_device == "cpu"
    assert plugin.gradient_accumulation_steps == 4  # 8 = micro 1 x 2 ranks x 4
    assert plugin.gradient_clipping == 1.0
    assert plugin.deepspeed_config["bf16"] == {"enabled": True}
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 1


def test_accelerate_reads_single_process_config(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    rec = recipe('parallel.backend="none"', "launch.gpus=1")
    run_dir = write_configs(tmp_path, rec, gpus=0)
    cfg = load_config_from_file(str(run_dir / ACCELERATE_CONFIG_FILE))
    assert cfg.distributed_type == DistributedType.NO
    assert (cfg.num_processes, cfg.mixed_precision) == (1, "bf16")


# ------------------------------------------------------------------ DeepSpeed's own config class

PARSE = textwrap.dedent(
    """
    import json, sys, tempfile
    import torch.distributed as dist
    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig

    path, world = sys.argv[1], int(sys.argv[2])
    dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)

    class DataParallel:  # DeepSpeed's hook for the data-parallel size (the launch has `world` ranks)
        def get_data_parallel_world_size(self):
            return world

    c = DeepSpeedConfig(path, mpu=DataParallel())
    z = c.zero_config
    print(json.dumps({
        "stage": int(z.stage),
        "offload_optimizer": None if z.offload_optimizer is None else getattr(z.offload_optimizer.device, "value", z.offload_optimizer.device),
        "offload_param": None if z.offload_param is None else getattr(z.offload_param.device, "value", z.offload_param.device),
        "persistence": z.param_persistence_threshold,
        "bf16": c.bfloat16_config.enabled,
        "fp16": c.float16_config.enabled,
        "micro": c.train_micro_batch_size_per_gpu,
        "accum": c.gradient_accumulation_steps,
        "batch": c.train_batch_size,
        "clip": c.gradient_clipping,
        "optimizer": c.optimizer_name,
        "optimizer_params": c.optimizer_params,
        "comm_dtype": str(c.communication_data_type),
    }))
    """
)


def deepspeed_parse(path: Path, world: int) -> dict:
    r = subprocess.run([sys.executable, "-c", PARSE, str(path), str(world)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_deepspeed_accepts_the_json(tmp_path):
    pytest.importorskip("deepspeed")
    rec = recipe(
        *DS3,
        "launch.gpus=2",
        "train.micro_batch=2",
        "train.global_batch=8",
        "train.grad_clip=0.5",
        "parallel.deepspeed.offload_params=true",
        "parallel.deepspeed.offload_optimizer=true",
        "parallel.deepspeed.persistence_threshold=0",
    )
    path = tmp_path / DEEPSPEED_CONFIG_FILE
    path.write_text(render_json(deepspeed_config(rec, plan_for(rec))))
    got = deepspeed_parse(path, world=2)
    assert got == {
        "stage": 3,
        "offload_optimizer": "cpu",
        "offload_param": "cpu",
        "persistence": 0,
        "bf16": True,
        "fp16": False,
        "micro": 2,
        "accum": 2,
        "batch": 8,
        "clip": 0.5,
        "optimizer": "adamw",
        "optimizer_params": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "torch_adam": True},
        "comm_dtype": "torch.float32",
    }


def test_deepspeed_accepts_zero2_fp32(tmp_path):
    pytest.importorskip("deepspeed")
    rec = recipe(
        'parallel.backend="deepspeed"',
        "parallel.deepspeed.stage=2",
        "launch.gpus=2",
        'quant.compute_dtype="float32"',
        'quant.storage_dtype="float32"',
    )
    path = tmp_path / DEEPSPEED_CONFIG_FILE
    path.write_text(render_json(deepspeed_config(rec, plan_for(rec))))
    got = deepspeed_parse(path, world=2)
    assert (got["stage"], got["bf16"], got["fp16"], got["offload_optimizer"]) == (2, False, False, "none")
    assert (got["micro"], got["accum"], got["batch"]) == (2, 1, 4)


# ------------------------------------------------------------------ the CLI


def test_config_command_writes_a_launchable_run_dir(tmp_path, recipe_file):
    path = recipe_file()
    out = tmp_path / "cfg"
    r = run_cli("config", str(path), "--gpus", "2", "--set", 'parallel.backend="deepspeed"', "-o", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("recipe.toml", "plan.json", ACCELERATE_CONFIG_FILE, DEEPSPEED_CONFIG_FILE):
        assert (out / name).is_file(), name
    acc = yaml.safe_load((out / ACCELERATE_CONFIG_FILE).read_text())
    assert acc["deepspeed_config"]["deepspeed_config_file"] == str(out.resolve() / DEEPSPEED_CONFIG_FILE)
    assert acc["num_processes"] == 2
    plan = json.loads((out / "plan.json").read_text())
    ds = json.loads((out / DEEPSPEED_CONFIG_FILE).read_text())
    assert ds["gradient_accumulation_steps"] == plan["grad_accum"]
    assert ds["train_micro_batch_size_per_gpu"] == plan["micro_batch"]
    assert f"accelerate launch --config_file {out.resolve() / ACCELERATE_CONFIG_FILE}" in r.stdout


def test_worker_takes_settings_from_the_json_not_the_recipe(tmp_path):
    """One source of truth: the DeepSpeed worker acts on RUN/deepspeed_config.json as written."""
    from launcher.rank.parallel.deepspeed import read_config, zero3_materializer

    rec = recipe(*DS3, "launch.gpus=2")
    run_dir = write_configs(tmp_path, rec, gpus=0)
    assert zero3_materializer(run_dir, "gloo") is not None
    edited = read_config(run_dir)
    edited["zero_optimization"]["stage"] = 2
    (run_dir / DEEPSPEED_CONFIG_FILE).write_text(render_json(edited))
    assert zero3_materializer(run_dir, "gloo") is None


def test_render_yaml_is_accelerate_shaped():
    rec = recipe(*DS3)
    text = render_yaml(accelerate_config(rec, plan_for(rec), RUN, "LlamaDecoderLayer"))
    assert text.startswith("# ")  # a comment line accelerate's YAML loader ignores
    assert yaml.safe_load(text)["distributed_type"] == "DEEPSPEED"


def test_gpu_plans_grow_allocator_segments_unless_the_user_set_the_allocator():
    """FSDP re-allocates gathered layers all step long: GPU runs get expandable segments by default; a
    user's own PYTORCH_CUDA_ALLOC_CONF (gathered at the edge into the Cluster) is kept; CPU runs get none."""
    rec = recipe()
    assert plan_for(rec, 2).env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    mine = make_plan(rec, Cluster(cuda_devices=2, cuda_alloc_conf="backend:cudaMallocAsync"))
    assert mine.env["PYTORCH_CUDA_ALLOC_CONF"] == "backend:cudaMallocAsync"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in plan_for(rec, 0).env


def test_cpu_offload_gets_a_cpu_backend_beside_nccl():
    """FSDP2 CPU offload keeps shards and gradients in host memory, and the gradient norm reduces them:
    NCCL alone has no CPU backend (measured: "No backend type associated with device type cpu" at the first
    optimizer step), so such a GPU run's process group pairs NCCL with gloo."""
    assert plan_for(recipe("launch.gpus=2"), 2).dist_backend == "nccl"
    assert plan_for(recipe("launch.gpus=2", "parallel.fsdp.cpu_offload=true"), 2).dist_backend == "cuda:nccl,cpu:gloo"
    assert plan_for(recipe("launch.gpus=2", "parallel.fsdp.cpu_offload=true")).dist_backend == "gloo"  # CPU run
