"""The run's DeepSpeed JSON and accelerate YAML, rendered from the recipe and the plan.

One source of truth: both files are pure functions of (Recipe, Plan), written into every run directory,
and the DeepSpeed worker reads RUN/deepspeed_config.json itself rather than deriving the values again.
`accelerate launch --config_file RUN/accelerate_config.yaml -m launcher.rank.worker RUN` starts the same
training as `qlaunch run` (see docs/backends.md): the worker still takes every setting from the run
directory; the YAML tells accelerate's launcher how many processes to start and describes the same
FSDP2 / DeepSpeed settings in accelerate's vocabulary.

Where a value has no DeepSpeed or accelerate equivalent (qlaunch's own lr schedule, its global-token loss
normalisation), the worker supplies it; see launcher/rank/parallel/deepspeed.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from launcher.plan.plan import Plan
from launcher.plan.recipe import Recipe

DEEPSPEED_CONFIG_FILE = "deepspeed_config.json"

ACCELERATE_CONFIG_FILE = "accelerate_config.yaml"

# accelerate's and DeepSpeed's names of the compute dtype.
MIXED_PRECISION = {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}

# Elements per gradient-reduction / weight-gather bucket (see deepspeed_config).
BUCKET = 50_000_000

# AdamW's epsilon; torch's default, which TorchEngine (the FSDP and single-process path) also uses.
ADAM_EPS = 1e-8


def mixed_precision(recipe: Recipe) -> str:
    """'bf16' | 'fp16' | 'no': the dtype matmuls run in (and FSDP gathers in), i.e. quant.compute_dtype."""
    return MIXED_PRECISION[recipe.quant.compute_dtype]


def deepspeed_config(recipe: Recipe, plan: Plan) -> dict[str, Any]:
    """The complete DeepSpeed config the worker passes to `deepspeed.initialize`."""
    ds, t = recipe.parallel.deepspeed, recipe.train
    pin = plan.device == "cuda"  # pinned host buffers only make sense with a GPU to copy to
    zero: dict[str, Any] = {
        "stage": ds.stage,
        "offload_optimizer": {"device": "cpu", "pin_memory": pin} if ds.offload_optimizer else {"device": "none"},
        "contiguous_gradients": True,
        "reduce_scatter": True,
        # Only LoRA weights have gradients: 5e7 elements hold all of them for an 8B model at rank 16. DeepSpeed's
        # 5e8 default allocates a bucket that size (2 GB in fp32) for nothing.
        "reduce_bucket_size": BUCKET,
    }
    if ds.stage == 2:
        zero["allgather_bucket_size"] = BUCKET  # the updated LoRA weights, gathered after each step
    if ds.stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin} if ds.offload_params else {"device": "none"}
        zero["stage3_param_persistence_threshold"] = ds.persistence_threshold
        # Only the LoRA adapter is saved; never gather the 4-bit base into one 16-bit state dict.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    mp = mixed_precision(recipe)
    return {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": float(t.grad_clip) if t.grad_clip is not None else 0.0,
        "bf16": {"enabled": mp == "bf16"},
        # Dynamic loss scaling (loss_scale 0): a step whose scaled gradients overflow is skipped.
        "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16} if mp == "fp16" else {"enabled": False},
        # LoRA gradients are small: reducing them in fp32 costs little and matches FSDP's reduce_dtype.
        "communication_data_type": "fp32",
        "zero_optimization": zero,
        # torch's AdamW (torch_adam) on every path: the same update rule as the other backends, and no
        # DeepSpeed C++/CUDA op to compile; with optimizer offload it runs on the host copy of the LoRA state.
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": list(t.betas),
                "eps": ADAM_EPS,
                "weight_decay": t.weight_decay,
                "torch_adam": True,
            },
        },
        "steps_per_print": 2**31 - 1,  # qlaunch writes metrics.jsonl; keep DeepSpeed's own progress lines out
        "wall_clock_breakdown": False,
    }


def accelerate_config(
    recipe: Recipe,
    plan: Plan,
    run_dir: str | Path,
    layer_cls: str,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
) -> dict[str, Any]:
    """accelerate's config (as `accelerate config` would write it) for the same run.

    `layer_cls` is the model's decoder layer class (FSDP wraps one per layer; see `decoder_layer_class`).
    For the DeepSpeed backend the YAML only points at RUN/deepspeed_config.json: accelerate refuses
    precision, accumulation, clipping or offload keys next to a DeepSpeed config file.
    """
    cfg: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
    }
    if plan.backend == "deepspeed":
        cfg["distributed_type"] = "DEEPSPEED"
        cfg["deepspeed_config"] = {
            "deepspeed_config_file": str(Path(run_dir) / DEEPSPEED_CONFIG_FILE),
            # The worker partitions the 4-bit model layer by layer while loading (deepspeed.zero.Init).
            "zero3_init_flag": recipe.parallel.deepspeed.stage == 3,
            # torch's elastic launcher on every node, as `qlaunch run` uses; not pdsh/ssh.
            "deepspeed_multinode_launcher": "standard",
        }
    elif plan.backend == "fsdp":
        f = recipe.parallel.fsdp
        cfg["distributed_type"] = "FSDP"
        cfg["mixed_precision"] = mixed_precision(recipe)
        cfg["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": layer_cls,
            "fsdp_reshard_after_forward": plan.reshard_after_forward,  # the recipe's, or the planner's for 'auto'
            # Each rank materialises only its own shards (launcher/rank/model/).
            "fsdp_cpu_ram_efficient_loading": True,
            # accelerate's launcher insists on this next to RAM-efficient loading; FSDP2 ignores it.
            "fsdp_sync_module_states": True,
            "fsdp_offload_params": f.cpu_offload,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_activation_checkpointing": bool(recipe.train.gradient_checkpointing),
        }
    else:
        cfg["distributed_type"] = "NO"
        cfg["mixed_precision"] = mixed_precision(recipe)
    cfg.update(
        {
            "machine_rank": node_rank,
            "num_machines": plan.nnodes,
            "num_processes": plan.world_size,
            "main_training_function": "main",
            "rdzv_backend": "static",
            "same_network": True,
            "main_process_port": recipe.launch.master_port,
            "use_cpu": False,
        }
    )
    if plan.nnodes > 1:
        cfg["main_process_ip"] = master_addr
    return cfg


def render_json(config: dict[str, Any]) -> str:
    return json.dumps(config, indent=2) + "\n"


def render_yaml(config: dict[str, Any]) -> str:
    import yaml

    head = "# Written by qlaunch from this run's recipe.toml; the worker reads its settings from the run directory.\n"
    return head + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def render_files(
    recipe: Recipe,
    plan: Plan,
    run_dir: str | Path,
    layer_cls: str,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
) -> dict[str, str]:
    """{file name: text} of both configs, ready for rundir.write_files."""
    return {
        ACCELERATE_CONFIG_FILE: render_yaml(
            accelerate_config(recipe, plan, run_dir, layer_cls, node_rank, master_addr)
        ),
        DEEPSPEED_CONFIG_FILE: render_json(deepspeed_config(recipe, plan)),
    }
