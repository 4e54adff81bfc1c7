"""Recipe -> plan on the launching host: the one load -> model shape -> plan -> resolve sequence that `run`,
`plan`, `config` and `slurm` share, and what `plan` and `config` show or write from it."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from launcher.errors import UserError
from launcher.launch.placement import check_node_rank, local_cluster
from launcher.plan.memory import ModelShape
from launcher.plan.model_info import model_shape
from launcher.plan.plan import Cluster, Plan, make_plan, parse_nnodes, planned_gpu_memory, resolve_recipe
from launcher.plan.recipe import Recipe
from launcher.plan.recipe_file import FlagOverride, load_recipe

# When the model's config.json is read for its shape: always ("read": a missing or bad one is then left for
# preflight to name, unless an "auto" setting needs it), only when an "auto" setting needs it, or never.
ModelRead = Literal["read", "if_auto", "never"]


@dataclass(frozen=True)
class Prepared:
    recipe: Recipe  # resolved: the planner's choices ("auto" settings) filled in
    plan: Plan
    cluster: Cluster
    shape: ModelShape | None  # None when not read or not readable


def flag_overrides(
    set_: list[str] | None, gpus: int | None, nnodes: str | None, flags: tuple[str, str] = ("--gpus", "--nnodes")
) -> list[str]:
    """The --set items, then the recipe keys the flags stand for (an error in one names the flag: FLAGS are
    the command's names for launch.gpus and launch.nnodes)."""
    out = list(set_ or [])
    if gpus is not None:
        out.append(FlagOverride(f"launch.gpus={gpus}", f"{flags[0]} {gpus}"))
    if nnodes is not None:  # MIN of MIN:MAX goes to the Cluster
        out.append(FlagOverride(f"launch.nnodes={parse_nnodes(nnodes)[1]}", f"{flags[1]} {nnodes}"))
    return out


def has_auto(rec: Recipe) -> bool:
    return rec.train.micro_batch == "auto" or rec.train.gradient_checkpointing == "auto"


def absolute_runs_dir(rec: Recipe) -> Recipe:
    """log.runs_dir as an absolute path (at the edge: it is relative to where qlaunch runs), so the resolved
    recipe in the run directory places a resumed run beside the first one from any directory."""
    return rec.model_copy(
        update={"log": rec.log.model_copy(update={"runs_dir": str(Path(rec.log.runs_dir).resolve())})}
    )


def planner_shape(rec: Recipe, required: bool) -> ModelShape | None:
    """The model's shape for the planner: config.json's sizes, with the decoder layer and the parameters
    outside it as the model built on meta has them (fused projections, extra norms and biases, a tie or a
    soft-cap that the config's class defaults to). A meta build is about a second for 70B. When the model
    does not build here the config's sizes are used with Llama's layer (`layer` stays None); preflight
    names what is wrong before a run starts."""
    shape = model_shape(rec, required=required)
    if shape is None:
        return None
    from launcher.plan.model_info import load_config, quiet_transformers, resolve_model_dir

    try:
        config = load_config(rec, resolve_model_dir(rec))
        from launcher.rank.model.skeleton import build_skeleton, is_tied, layer_shape, outside_layer_params

        with quiet_transformers():
            skeleton = build_skeleton(rec, config)
        built = dict(layer=layer_shape(skeleton), root_params=outside_layer_params(skeleton), tied=is_tied(skeleton))
        return ModelShape.from_config(config.get_text_config(), **built)
    except Exception:  # any reason it does not build is preflight's to report, in its own words
        return shape


def prepare(
    recipe_file: str,
    overrides: list[str],
    cluster: Cluster,
    *,
    node_rank: int = 0,
    model: ModelRead = "read",
    absolute_runs: bool = False,
) -> Prepared:
    """Load and validate the recipe, check this node's rank against its node count, read the model's shape,
    plan, and resolve the planner's choices into the recipe."""
    rec = load_recipe(recipe_file, overrides)
    if absolute_runs:
        rec = absolute_runs_dir(rec)
    check_node_rank(node_rank, rec.launch.nnodes)
    auto = has_auto(rec)
    read = model == "read" or (model == "if_auto" and auto)
    shape = planner_shape(rec, required=auto) if read else None
    plan = make_plan(rec, cluster, model=shape)
    return Prepared(resolve_recipe(rec, plan), plan, cluster, shape)


def warn_memory(plan: Plan) -> None:
    m = plan.memory
    if plan.device == "cuda" and m and not m["fits"]:
        print(
            f"warning: estimated {m['total_gib']:.1f} GiB per GPU exceeds {m['gpu_memory_gib']:.0f} GiB; "
            "`qlaunch plan` shows the breakdown and what to change",
            file=sys.stderr,
        )


def print_plan(rec: Recipe, plan: Plan) -> None:
    print(f"recipe: {rec.name}  backend: {plan.backend}  device: {plan.device} ({plan.dist_backend})")
    print(
        f"world size: {plan.world_size} = {plan.nnodes} node(s) x {plan.nproc_per_node}  "
        f"global batch {plan.global_batch} = micro {plan.micro_batch} x {plan.world_size} ranks x {plan.grad_accum} accum"
        + ("" if plan.gradient_checkpointing else "  (no gradient checkpointing)")
        + ("  (layers kept gathered)" if plan.backend == "fsdp" and not plan.reshard_after_forward else "")
    )
    q = rec.quant
    quant = {"none": "none", 8: "8-bit LLM.int8"}.get(q.bits, f"4-bit {q.type} (storage {q.storage_dtype})")
    print(f"model: {rec.model.path} ({rec.model.init})  quant: {quant}  lora r={rec.lora.rank} alpha={rec.lora.alpha}")


def planned_for(plan: Plan, cluster, gpu_mem: int) -> str:
    """What the memory estimate is for, said before it: on a machine without a GPU the run itself uses CPU
    processes, yet the estimate is for the GPUs the recipe is meant for."""
    cards = f"{plan.world_size} GPU(s) of {gpu_mem / 2**30:.0f} GiB"
    if cluster.cuda_devices:
        return f"planned for: {cards} (this machine has {cluster.cuda_devices} CUDA GPU(s))"
    return (
        f"planned for: {cards}; this machine has no GPU, so `qlaunch run` here starts {plan.world_size} CPU "
        "process(es) (gloo) and the estimate is what each GPU would need (--gpu-mem-gb sets the card's size)"
    )


def show_plan(recipe_file: str, overrides: list[str], gpu_mem_gb: float | None) -> None:
    """`qlaunch plan`: the plan as `run` would make it here, and the per-GPU memory estimate with advice."""
    from rich.console import Console

    from launcher.plan import memory
    from launcher.plan.memory_advice import render, suggestions

    cluster = local_cluster()
    if gpu_mem_gb is not None:
        cluster = replace(cluster, gpu_memory_bytes=int(gpu_mem_gb * 2**30))
    p = prepare(recipe_file, overrides, cluster)
    rec, plan, shape = p.recipe, p.plan, p.shape
    print_plan(rec, plan)
    if shape is None:
        print("memory estimate: unavailable (the model's config.json could not be read)")
        return
    if shape.layer is None:
        print("(the model does not build here: its layers are counted as Llama's from config.json)")
    gpu_mem = planned_gpu_memory(rec, cluster)  # the card, or launch.gpu_memory_gb when smaller
    print(planned_for(plan, cluster, gpu_mem))
    est = memory.estimate(
        rec, shape, plan.world_size, plan.micro_batch, plan.gradient_checkpointing, gpu_mem, plan.nproc_per_node
    )
    tips = suggestions(rec, shape, est)
    Console(highlight=False).print(render(est, tips, plan.backend))


def write_config_dir(recipe_file: str, overrides: list[str], out: str, node_rank: int, master_addr: str) -> None:
    """`qlaunch config`: the accelerate and DeepSpeed configs, the resolved recipe and plan.json in OUT, a run
    directory that `accelerate launch ... -m launcher.rank.worker OUT` can start."""
    from launcher.plan.configs import ACCELERATE_CONFIG_FILE, render_files
    from launcher.plan.model_info import decoder_layer_class
    from launcher.rundir import PLAN_FILE, RunDir, RunPlan, write_files

    p = prepare(recipe_file, overrides, local_cluster(node_rank, master_addr), node_rank=node_rank)
    rec, plan = p.recipe, p.plan
    layer_cls = decoder_layer_class(rec)
    path = Path(out).resolve()
    if path.exists() and not path.is_dir():
        raise UserError(f"-o {out}: exists and is not a directory")
    configs = render_files(rec, plan, path, layer_cls, node_rank, master_addr)
    try:
        run_dir = RunDir(path)
        run_dir.create_folders()
        write_files(run_dir, rec, {PLAN_FILE: RunPlan(plan).to_json(), **configs})
    except OSError as err:
        raise UserError(
            f"-o {out}: cannot write the configs into {err.filename or path} ({err.strerror or type(err).__name__})"
        ) from None
    for name in sorted(configs):
        print(f"wrote {path / name}")
    print(
        f"start it with: accelerate launch --config_file {path / ACCELERATE_CONFIG_FILE} -m launcher.rank.worker {path}"
    )


def write_sbatch_file(recipe_file: str, overrides: list[str], options: dict, out: str | None) -> Path:
    """`qlaunch slurm`: check and plan the recipe now (not once the job is queued), then write the sbatch
    script (RUNS_DIR/NAME/NAME.sbatch unless OUT). OPTIONS: SbatchOptions fields besides the derived ones."""
    import os

    from launcher import __version__
    from launcher.launch.slurm import SbatchOptions, render_sbatch

    cluster = Cluster(cuda_devices=options["gpus_per_node"] if options["request_gpus"] else 0)
    rec = prepare(recipe_file, overrides, cluster, model="never").recipe  # batch split etc.
    runs = Path(rec.log.runs_dir) / rec.name
    path = Path(out) if out else runs / f"{rec.name}.sbatch"
    text = render_sbatch(
        SbatchOptions(
            recipe=recipe_file,
            job_name=options.pop("job_name", None) or rec.name,
            workdir=os.getcwd(),
            qlaunch=(sys.executable, "-m", "launcher.cli"),
            output=str(runs / "slurm-%j.out"),
            version=__version__,
            **options,
        )
    )
    runs.mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output directory
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path
