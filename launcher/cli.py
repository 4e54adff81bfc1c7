"""`qlaunch`: arguments and help only; the work is done by the modules it calls."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import click
import typer

from launcher import __version__
from launcher.errors import UserError

app = typer.Typer(
    name="qlaunch",
    help="Distributed QLoRA/LoRA fine-tuning from one TOML recipe (FSDP2 or DeepSpeed, torch elastic).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key with a TOML literal, e.g. --set train.lr=2e-4 (repeatable)."),
]
GpusOpt = Annotated[
    int | None,
    typer.Option("--gpus", min=1, help="Ranks per node: GPUs, or CPU processes on a machine without CUDA."),
]
NnodesOpt = Annotated[int | None, typer.Option("--nnodes", min=1, help="Number of nodes (same command on each).")]


def _version(value: bool) -> None:
    if value:
        print(f"qlaunch {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """qlaunch: validate a recipe, plan the run, write its configs, spawn one process per GPU, train."""


def _overrides(set_: list[str] | None, gpus: int | None, nnodes: int | None) -> list[str]:
    out = list(set_ or [])
    if gpus is not None:
        out.append(f"launch.gpus={gpus}")
    if nnodes is not None:
        out.append(f"launch.nnodes={nnodes}")
    return out


def _cluster(node_rank: int = 0, master_addr: str = "127.0.0.1", rdzv_endpoint=None, rdzv_id=None):
    from launcher.plan import Cluster

    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken CUDA install means "no GPUs" for planning
        n = 0
    return Cluster(
        cuda_devices=n,
        node_rank=node_rank,
        master_addr=master_addr,
        rdzv_endpoint=rdzv_endpoint,
        rdzv_id=rdzv_id,
    )


@app.command()
def run(
    recipe: Annotated[str, typer.Argument(help="Recipe TOML file (see `qlaunch recipes`).")],
    gpus: GpusOpt = None,
    nnodes: NnodesOpt = None,
    node_rank: Annotated[int, typer.Option("--node-rank", min=0, help="This node's rank (multi-node).")] = 0,
    master_addr: Annotated[str, typer.Option("--master-addr", help="Node 0's address (multi-node).")] = "127.0.0.1",
    master_port: Annotated[int | None, typer.Option("--master-port", help="Node 0's rendezvous port.")] = None,
    set_: SetOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan and the exact command; spawn nothing.")
    ] = False,
) -> None:
    """Validate RECIPE, write a run directory, spawn the ranks with torch's elastic launcher and train."""
    from launcher.plan import make_plan
    from launcher.recipe import load_recipe

    overrides = _overrides(set_, gpus, nnodes)
    if master_port is not None:
        overrides.append(f"launch.master_port={master_port}")
    rec = load_recipe(recipe, overrides)
    cluster = _cluster(node_rank, master_addr)
    plan = make_plan(rec, cluster)
    from launcher.spawn import launch_spec

    if dry_run:
        placeholder = str(Path(rec.log.runs_dir) / rec.name / "<timestamp>")
        spec = launch_spec(rec, plan, cluster, placeholder)
        _print_plan(rec, plan)
        env = " ".join(f"{k}={v}" for k, v in spec["env"].items())
        print("command: " + (env + " " if env else "") + " ".join(spec["argv"]))
        return
    from launcher import preflight

    preflight.check(rec)
    from launcher.rundir import PLAN_FILE, new_run_dir, write_files

    run_dir = new_run_dir(rec)
    spec = launch_spec(rec, plan, cluster, str(run_dir.path))
    write_files(run_dir, rec, {PLAN_FILE: json.dumps(plan.to_dict(), indent=2) + "\n"})
    print(f"run directory: {run_dir.path}")
    from launcher import live
    from launcher.spawn import failure_summary, spawn, user_error_of

    rc = spawn(run_dir, spec, live.follow)
    if rc != 0:
        msg = user_error_of(run_dir)
        if msg:
            raise UserError(msg)
        print(failure_summary(run_dir), file=sys.stderr)
        raise typer.Exit(rc if 0 < rc < 256 else 1)


def _print_plan(rec, plan) -> None:
    print(f"recipe: {rec.name}  backend: {plan.backend}  device: {plan.device} ({plan.dist_backend})")
    print(
        f"world size: {plan.world_size} = {plan.nnodes} node(s) x {plan.nproc_per_node}  "
        f"global batch {plan.global_batch} = micro {plan.micro_batch} x {plan.world_size} ranks x {plan.grad_accum} accum"
    )
    q = rec.quant
    quant = (
        "none" if q.bits == "none" else f"{q.bits}-bit {q.type if q.bits == 4 else 'int8'} (storage {q.storage_dtype})"
    )
    print(f"model: {rec.model.path} ({rec.model.init})  quant: {quant}  lora r={rec.lora.rank} alpha={rec.lora.alpha}")


@app.command()
def plan(
    recipe: Annotated[str, typer.Argument(help="Recipe TOML file.")],
    gpus: GpusOpt = None,
    nnodes: NnodesOpt = None,
    set_: SetOpt = None,
) -> None:
    """Show the run's plan: world size, batch split and backend settings."""
    from launcher.plan import make_plan
    from launcher.recipe import load_recipe

    rec = load_recipe(recipe, _overrides(set_, gpus, nnodes))
    _print_plan(rec, make_plan(rec, _cluster()))


@app.command()
def recipes() -> None:
    """List the bundled recipes."""
    from launcher.recipe import bundled_recipes, read_toml

    for p in bundled_recipes():
        data, _ = read_toml(p)
        model = data.get("model", {}).get("path", "?")
        print(f"recipes/{p.name:<28} {data.get('name', p.stem):<22} {model}")


@app.command()
def explain(
    key: Annotated[str, typer.Argument(help="Dotted recipe key (e.g. lora.rank) or a section (e.g. train).")] = "",
) -> None:
    """Show the documentation of a recipe key or section."""
    from launcher.recipe import explain as _explain

    print(_explain(key))


@app.command()
def quantize(
    model: Annotated[str, typer.Argument(help="Hugging Face model directory (bf16/fp16/fp32 safetensors).")],
    out: Annotated[str, typer.Option("-o", "--out", help="Output directory for the pre-quantized checkpoint.")],
    quant_type: Annotated[str, typer.Option("--type", help="nf4 or fp4.")] = "nf4",
    blocksize: Annotated[int, typer.Option("--blocksize", help="Elements per quantization block.")] = 64,
    skip: Annotated[list[str] | None, typer.Option("--skip", help="Linear layers kept unquantized.")] = None,
) -> None:
    """Write a pre-quantized 4-bit checkpoint: ranks then read only their own byte ranges."""
    from launcher.quantize import quantize_checkpoint

    path = quantize_checkpoint(model, out, quant_type, blocksize, skip or ["lm_head"])
    print(f"wrote {path}")


def main() -> None:
    try:
        rc = app(standalone_mode=False)
    except UserError as err:
        print(f"qlaunch: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
