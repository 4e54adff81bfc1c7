"""`qlaunch`: arguments, help and one-line errors; the work is done by launch/ (and plan/, ui/) modules."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from launcher import __version__
from launcher.errors import EXIT_ABORTED, StoppedBeforeStart, UserError
from launcher.plan.limits import MAX_GPU_MEMORY_GB, MAX_GPUS_PER_NODE, MAX_NODES

# Each command imports the launch/ module doing its work inside the function: `qlaunch --help`, `--version`
# and usage errors then load neither pydantic nor torch.
PROG = "qlaunch"

app = typer.Typer(
    name=PROG,
    help="Distributed QLoRA/LoRA fine-tuning from one TOML recipe (FSDP2 or DeepSpeed, torch elastic).",
    no_args_is_help=True,
    add_completion=True,  # --install-completion, --show-completion SHELL
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key with a TOML literal, e.g. --set train.lr=2e-4 (repeatable)."),
]

GpusOpt = Annotated[
    int | None,
    typer.Option(
        "--gpus", min=1, max=MAX_GPUS_PER_NODE, help="Ranks per node: GPUs, or CPU processes on a machine without CUDA."
    ),
]

NnodesOpt = Annotated[
    str | None,
    typer.Option(
        "--nnodes",
        help="Number of nodes (same command on each); MIN:MAX for an elastic run (with --rdzv-endpoint). "
        "Inside a SLURM allocation: the allocation's node count.",
    ),
]


RECIPE_HELP = "Recipe TOML file, or a bundled recipe's name (`qlaunch recipes` lists them)."


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


@app.command()
def run(
    recipe: Annotated[
        str | None,
        typer.Argument(
            help=f"{RECIPE_HELP} Optional with --resume RUN_DIR|CHECKPOINT_DIR, which "
            "continues under the run's own resolved recipe (plus any --set/--gpus given here)."
        ),
    ] = None,
    gpus: GpusOpt = None,
    nnodes: NnodesOpt = None,
    node_rank: Annotated[
        int | None, typer.Option("--node-rank", min=0, help="This node's rank, 0..nnodes-1 (multi-node).")
    ] = None,
    master_addr: Annotated[
        str | None, typer.Option("--master-addr", help="Node 0's address (multi-node; default 127.0.0.1).")
    ] = None,
    master_port: Annotated[
        int | None,
        typer.Option("--master-port", min=1, max=65535, help="Node 0's rendezvous port (the node watch uses port+1)."),
    ] = None,
    rdzv_endpoint: Annotated[
        str | None,
        typer.Option(
            "--rdzv-endpoint",
            help="HOST:PORT of an elastic (c10d) rendezvous, instead of --node-rank/--master-addr: nodes get "
            "their ranks as they join; with --nnodes MIN:MAX training starts once MIN nodes are there.",
        ),
    ] = None,
    rdzv_id: Annotated[
        str | None,
        typer.Option(
            "--rdzv-id",
            help="Id shared by the nodes of one run: names the elastic rendezvous and, for any multi-node run, "
            "its run directory RUNS_DIR/NAME/ID (default: the SLURM job id, else MASTER_ADDR-MASTER_PORT).",
        ),
    ] = None,
    run_dir_opt: Annotated[
        str | None,
        typer.Option(
            "--run-dir",
            help="Use this run directory (the same path on every node of a multi-node run, on a filesystem "
            "they share) instead of RUNS_DIR/NAME/<timestamp or id>.",
        ),
    ] = None,
    node_timeout: Annotated[
        float,
        typer.Option(
            "--node-timeout",
            min=1,
            max=24 * 3600,  # a day of silence: anything longer is never meant (and inf would overflow timers)
            help="Multi-node: seconds of silence after which another node counts as lost (its failure is "
            "then named here, and this node's ranks are stopped if the run cannot continue without it).",
        ),
    ] = 60.0,
    no_slurm: Annotated[
        bool, typer.Option("--no-slurm", help="Ignore the SLURM allocation this runs in (single-node run).")
    ] = False,
    set_: SetOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan and the exact command; spawn nothing.")
    ] = False,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            help="Continue from a checkpoint: 'auto' (newest of this recipe's runs), a run directory, or a "
            "checkpoint directory. The recipe may change only in ways that keep the math (e.g. max_steps).",
        ),
    ] = None,
) -> None:
    """Validate RECIPE, write a run directory, spawn the ranks with torch's elastic launcher and train.

    Exit status: 0 done; 2 bad input; 3 diverged (a NaN/inf loss or gradient norm stopped the run); 75
    preempted (SIGTERM/SIGUSR1/Ctrl-C: a checkpoint was saved, continue with --resume RUN_DIR); 130 a second
    Ctrl-C killed the ranks; otherwise the failing workers' status.

    Examples:
      qlaunch run tiny-cpu --gpus 2
      qlaunch run llama70b-qlora --gpus 8 --set train.lr=1e-4
      qlaunch run --resume runs/tiny/20261204-120000
    """
    from launcher.launch.run import RunRequest
    from launcher.launch.run import run as run_recipe

    run_recipe(
        RunRequest(
            recipe,
            gpus,
            nnodes,
            node_rank,
            master_addr,
            master_port,
            rdzv_endpoint,
            rdzv_id,
            run_dir_opt,
            node_timeout,
            no_slurm,
            tuple(set_ or ()),
            dry_run,
            resume,
        )  # fmt: skip
    )


@app.command()
def slurm(
    recipe: Annotated[str, typer.Argument(help=RECIPE_HELP)],
    nodes: Annotated[int, typer.Option("--nodes", min=1, max=MAX_NODES, help="Nodes to allocate.")],
    gpus_per_node: Annotated[
        int, typer.Option("--gpus-per-node", min=1, max=MAX_GPUS_PER_NODE, help="GPUs (ranks) per node.")
    ],
    partition: Annotated[str | None, typer.Option("--partition", help="SLURM partition.")] = None,
    time_limit: Annotated[str | None, typer.Option("--time", help="Time limit, e.g. 04:00:00.")] = None,
    account: Annotated[str | None, typer.Option("--account", help="Account to charge.")] = None,
    job_name: Annotated[str | None, typer.Option("--job-name", help="Job name (default: the recipe's name).")] = None,
    cpus_per_node: Annotated[
        int | None, typer.Option("--cpus-per-node", min=1, help="CPUs per node (default: whole nodes, --exclusive).")
    ] = None,
    request_gpus: Annotated[
        bool,
        typer.Option("--request-gpus/--no-request-gpus", help="Ask SLURM for the GPUs (off: ranks are CPU processes)."),
    ] = True,
    signal_seconds: Annotated[
        int,
        typer.Option(
            "--signal-seconds", min=30, help="Warn the job this long before its time limit (checkpoint, requeue)."
        ),
    ] = 180,
    out: Annotated[
        str | None, typer.Option("-o", "--out", help="Script path (default: RUNS_DIR/NAME/NAME.sbatch).")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Write an sbatch script that runs RECIPE on N nodes (one `qlaunch run` per node, requeued on preemption).

    Example:
      qlaunch slurm llama70b-qlora --nodes 2 --gpus-per-node 4
    """
    import shlex

    from launcher.launch.prepare import flag_overrides, write_sbatch_file

    overrides = flag_overrides(set_, gpus_per_node, str(nodes), ("--gpus-per-node", "--nodes"))
    options = dict(
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        job_name=job_name,
        partition=partition,
        time=time_limit,
        account=account,
        request_gpus=request_gpus,
        cpus_per_node=cpus_per_node,
        signal_seconds=signal_seconds,
        overrides=tuple(set_ or ()),
    )
    path = write_sbatch_file(recipe, overrides, options, out)
    print(f"wrote {path}")
    print(f"submit with: sbatch {shlex.quote(str(path))}")


@app.command()
def plan(
    recipe: Annotated[str, typer.Argument(help=RECIPE_HELP)],
    gpus: GpusOpt = None,
    nnodes: NnodesOpt = None,
    set_: SetOpt = None,
    gpu_mem_gb: Annotated[
        float | None,
        typer.Option(
            "--gpu-mem-gb",
            min=1,
            max=MAX_GPU_MEMORY_GB,
            help="GPU memory to plan for (default: this machine's GPU, else 80).",
        ),
    ] = None,
) -> None:
    """Show the run's plan: world size, batch split, backend settings and the per-GPU memory estimate.

    Example:
      qlaunch plan llama8b-rehearsal --gpus 1 --gpu-mem-gb 24
    """
    from launcher.launch.prepare import flag_overrides, show_plan

    show_plan(recipe, flag_overrides(set_, gpus, nnodes), gpu_mem_gb)


@app.command()
def config(
    recipe: Annotated[str, typer.Argument(help=RECIPE_HELP)],
    out: Annotated[str, typer.Option("-o", "--out", help="Directory to write into (created if missing).")],
    gpus: GpusOpt = None,
    nnodes: NnodesOpt = None,
    node_rank: Annotated[int, typer.Option("--node-rank", min=0, help="This node's rank (multi-node).")] = 0,
    master_addr: Annotated[str, typer.Option("--master-addr", help="Node 0's address (multi-node).")] = "127.0.0.1",
    set_: SetOpt = None,
) -> None:
    """Write accelerate_config.yaml and deepspeed_config.json for RECIPE into OUT.

    OUT also gets the resolved recipe.toml and plan.json, so it is a run directory that
    `accelerate launch --config_file OUT/accelerate_config.yaml -m launcher.rank.worker OUT` can start.

    Example:
      qlaunch config tiny-cpu -o cfg --gpus 2
    """
    from launcher.launch.prepare import flag_overrides, write_config_dir

    write_config_dir(recipe, flag_overrides(set_, gpus, nnodes), out, node_rank, master_addr)


recipes_app = typer.Typer(context_settings={"help_option_names": ["-h", "--help"]})
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback(invoke_without_command=True)
def recipes(ctx: typer.Context) -> None:
    """List the bundled recipes (name, model, GPUs, what each is for), or copy one to edit.

    `qlaunch run NAME` (and plan, config, slurm) takes a bundled name from any directory;
    `qlaunch recipes cp NAME [DEST]` writes a copy to edit.

    Example:
      qlaunch recipes
    """
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console

    from launcher.launch.bundled_recipes import recipes_table

    # Piped (no terminal width), rich would wrap the purpose column at 80 characters: one row a line instead.
    Console(highlight=False, width=None if sys.stdout.isatty() else 240).print(recipes_table())


@recipes_app.command("cp")
def recipes_cp(
    name: Annotated[str, typer.Argument(help="A bundled recipe's name (see `qlaunch recipes`).")],
    dest: Annotated[str, typer.Argument(help="Directory to copy into (created if missing), or a .toml path.")] = ".",
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Copy a bundled recipe to edit: its model and data paths point at the bundled assets, so it runs anywhere.

    An existing file is kept unless --force.

    Example:
      qlaunch recipes cp tiny-cpu my-recipes
    """
    from launcher.launch.bundled_recipes import copy_recipe

    print(f"wrote {copy_recipe(name, dest, force)}")


@app.command()
def explain(
    key: Annotated[str, typer.Argument(help="Dotted recipe key (e.g. lora.rank) or a section (e.g. train).")] = "",
) -> None:
    """Show the documentation of a recipe key or section: type, allowed values, default, range.

    Examples:
      qlaunch explain train
      qlaunch explain train.schedule
      qlaunch explain data.datasets.path
    """
    from launcher.plan.explain import explain as _explain

    print(_explain(key))


@app.command()
def quantize(
    model: Annotated[str, typer.Argument(help="Hugging Face model directory (bf16/fp16/fp32 safetensors).")],
    out: Annotated[str, typer.Option("-o", "--out", help="Output directory for the pre-quantized checkpoint.")],
    quant_type: Annotated[str, typer.Option("--type", help="nf4 or fp4.")] = "nf4",
    blocksize: Annotated[int, typer.Option("--blocksize", help="Elements per quantization block.")] = 64,
    skip: Annotated[list[str] | None, typer.Option("--skip", help="Linear layers kept unquantized.")] = None,
) -> None:
    """Write a pre-quantized 4-bit checkpoint: ranks then read only their own byte ranges.

    Example:
      qlaunch quantize models/Llama-3.1-8B -o models/Llama-3.1-8B-nf4
    """
    from launcher.launch.quantize import quantize_checkpoint
    from launcher.launch.quiet import quiet_libraries

    with quiet_libraries():
        path = quantize_checkpoint(
            model, out, quant_type, blocksize, skip or ["lm_head"], warn=lambda line: print(line, file=sys.stderr)
        )
    print(f"wrote {path}")


@app.command()
def doctor(
    runs_dir: Annotated[str, typer.Option("--runs-dir", help="Where run directories will go (free disk).")] = "runs",
    require_gpu: Annotated[
        bool, typer.Option("--require-gpu", help="Treat a machine without a usable CUDA GPU as a blocking problem.")
    ] = False,
) -> None:
    """Check this machine: package versions against the tested ones, GPUs, /dev/shm, open files, env, disk.

    Exit code 1 when something would stop a run; warnings (no GPU, untested versions) keep exit code 0.

    Example:
      qlaunch doctor
    """
    from rich.console import Console

    from launcher.launch import doctor as doc
    from launcher.launch.quiet import quiet_libraries

    with quiet_libraries():
        checks = doc.run_checks(runs_dir, require_gpu)
    console = Console(highlight=False)
    console.print(doc.render(checks))
    console.print(doc.verdict(checks))
    raise typer.Exit(doc.exit_code(checks))


@app.command()
def report(
    run_dir: Annotated[str, typer.Argument(help="A run directory (runs/<name>/<timestamp>) or runs/<name> (newest).")],
) -> None:
    """Write PNG plots of a run (RUN/plots/) and print its summary: loss, throughput, memory, time, checkpoints.

    Example:
      qlaunch report runs/tiny/20261204-120000
    """
    from rich.console import Console

    from launcher.ui import report as rep

    run, rows, plots = rep.report(run_dir, warn=lambda line: print(line, file=sys.stderr))
    Console(highlight=False).print(rep.render(run, rows, plots))


@app.command()
def merge(
    run_dir: Annotated[str, typer.Argument(help="A finished run directory (with adapter/).")],
    out: Annotated[str, typer.Option("-o", "--out", help="Output directory for the merged model.")],
    dtype: Annotated[str, typer.Option("--dtype", help="bfloat16, float16 or float32.")] = "bfloat16",
    onto: Annotated[
        str,
        typer.Option(
            "--onto",
            help="original: add the adapter to model.path's weights as stored (what PEFT's merge_and_unload on "
            "the original model gives; the default). dequantized: to the 4-bit/int8 weights it trained against "
            "(the trained function exactly). A 4-bit checkpoint has only the latter.",
        ),
    ] = "original",
) -> None:
    """Write base + adapter as one Hugging Face model that from_pretrained loads.

    Example:
      qlaunch merge runs/tiny/20261204-120000 -o merged --dtype float32
    """
    if dtype not in ("bfloat16", "float16", "float32"):
        raise UserError(f"--dtype {dtype}: use bfloat16, float16 or float32")
    from launcher.launch.merge import ONTO, merge_run
    from launcher.launch.quiet import quiet_libraries

    if onto not in ONTO:
        raise UserError(f"--onto {onto}: use {' or '.join(ONTO)}")
    with quiet_libraries():
        path = merge_run(Path(run_dir), Path(out), dtype, onto, say=lambda line: print(line, file=sys.stderr))
    print(f"wrote {path}")


@app.command()
def generate(
    run_dir: Annotated[str, typer.Argument(help="A finished run directory (with adapter/).")],
    prompt: Annotated[
        str, typer.Option("--prompt", help="The text to complete, rendered as the run rendered prompts.")
    ],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate at most.")] = 128,
    device: Annotated[str, typer.Option("--device", help="auto (a GPU if there is one), cpu or cuda.")] = "auto",
    base: Annotated[
        str,
        typer.Option(
            "--base",
            help="quantized: the 4-bit/int8 base exactly as trained (the default). original: model.path's own "
            "weights (unquantized), the adapter beside them.",
        ),
    ] = "quantized",
    temperature: Annotated[
        float | None, typer.Option("--temperature", help="Sample at this temperature (default: greedy).")
    ] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="Sample from this nucleus (default: greedy).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sampling (with --temperature/--top-p).")] = 0,
) -> None:
    """Complete a prompt with a run's adapter on its base; prints only the completion.

    The prompt is rendered as training rendered one (alpaca: its '### Response:' header; chat: a user turn
    and the assistant header of the run's chat template), so the model continues with a trained reply.

    Example:
      qlaunch generate runs/tiny/20261204-120000 --prompt "Reverse the word."
    """
    from launcher.launch.generate import check_flags, generate_run
    from launcher.launch.quiet import quiet_libraries

    check_flags(prompt, max_new_tokens, device, base)
    with quiet_libraries():
        text = generate_run(Path(run_dir), prompt, max_new_tokens, device, base, temperature, top_p, seed)
    print(text)


def _exception_classes(name: str) -> tuple[type[BaseException], ...]:
    """The exception class `name` as click and typer's vendored copy of click define it, where installed.

    typer >= 0.2x raises its own copies (typer._click.exceptions, typer.exceptions), older ones click's;
    the GPU machines may run either, so neither is imported unconditionally."""
    found: list[type[BaseException]] = []
    for module in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and issubclass(cls, BaseException) and cls not in found:
            found.append(cls)
    return tuple(found)


def _command_path(ctx, argv: list[str]) -> str:
    """'qlaunch run' for the command a usage error is about: from its context, else (click's parser raises
    some errors without one) the first word of the command line that names a command."""
    names = []
    while ctx is not None:
        if ctx.info_name:
            names.append(ctx.info_name)
        ctx = ctx.parent
    if len(names) > 1:
        return " ".join(reversed(names))
    commands = {c.name or c.callback.__name__ for c in app.registered_commands if c.callback}
    commands |= {g.name for g in app.registered_groups if isinstance(g.name, str)}  # qlaunch recipes
    first = next((a for a in argv if not a.startswith("-")), None)
    return f"{PROG} {first}" if first in commands else PROG


def usage_error_line(err: BaseException, argv: list[str]) -> str:
    """One line for a command-line usage error: what is wrong, the closest valid choice, where help is."""
    possibilities = sorted(getattr(err, "possibilities", None) or [])
    if type(err).__name__ == "NoSuchOption" and possibilities:
        text = f"{str(err.message).rstrip('.')} (did you mean {' or '.join(possibilities)}?)"
    else:
        text = err.format_message()
    text = " ".join(str(text).split()).rstrip(".")
    # click: "No such command 'runn'. Did you mean 'run'?" -> "no such command 'runn' (did you mean 'run'?)"
    text = re.sub(r"\.? Did you mean (.+?)\??$", r" (did you mean \1?)", text)
    # Lower-case sentence starts ("Invalid value for '--gpus': Input should be ...") but not names ("RECIPE").
    text = re.sub(r"(^|: )([A-Z])(?=[a-z])", lambda m: m.group(1) + m.group(2).lower(), text)
    return f"{text}; see '{_command_path(getattr(err, 'ctx', None), argv)} --help'"


SHELLS = ("bash", "zsh", "fish", "powershell", "pwsh")


def completion_request(argv: list[str]) -> tuple[str, str] | None:
    """('show' | 'install', SHELL) for `--show-completion SHELL` / `--install-completion SHELL`: typer's own
    flags take no shell (they detect the running one), so a named shell is handled here."""
    if len(argv) == 2 and argv[0] in ("--show-completion", "--install-completion") and argv[1] in SHELLS:
        return argv[0][2:].split("-")[0], argv[1]
    return None


def _completion(what: str, shell: str) -> None:
    from typer import _completion_shared as completion  # typer's installer and scripts (no public API)

    var = f"_{PROG.upper()}_COMPLETE"
    if what == "show":
        print(completion.get_completion_script(prog_name=PROG, complete_var=var, shell=shell))
    else:
        shell, path = completion.install(shell=shell, prog_name=PROG, complete_var=var)
        print(f"{shell} completion installed in {path}; it takes effect in a new shell")


def main() -> None:
    """The console script: bad input (UserError), command-line usage errors and this host's file errors
    (OSError: a full or read-only disk) are one 'qlaunch: error:' line; a Ctrl-C before spawning is one line.

    Exit status: as the command sets it; 2 for bad input, usage and file errors; 130 interrupted; 0 after
    help (a bare `qlaunch` prints the help, like `qlaunch --help`)."""
    no_args = _exception_classes("NoArgsIsHelpError")
    usage = _exception_classes("UsageError")
    click_error = _exception_classes("ClickException")
    exit_ = _exception_classes("Exit")
    abort = _exception_classes("Abort")
    request = completion_request(sys.argv[1:])
    if request is not None:
        _completion(*request)
        return
    try:
        rc = app(standalone_mode=False, prog_name=PROG)
    except UserError as err:
        print(f"qlaunch: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except no_args as err:  # a bare `qlaunch`: the user asks what it does
        text = err.format_message()  # the help (typer's rich help printed itself when the error was made)
        if text.strip():
            print(text)
        sys.exit(0)
    except usage as err:
        print(f"qlaunch: error: {usage_error_line(err, sys.argv[1:])}", file=sys.stderr)
        sys.exit(2)
    except click_error as err:
        print(f"qlaunch: error: {' '.join(str(err.format_message()).split())}", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 1) or 1)
    except exit_ as err:
        sys.exit(err.exit_code)
    except abort:
        print("aborted", file=sys.stderr)
        sys.exit(EXIT_ABORTED)
    except StoppedBeforeStart as err:
        print(f"qlaunch: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:  # a Ctrl-C before any rank exists (spawn turns later ones into a stop request)
        print("qlaunch: interrupted", file=sys.stderr)
        sys.exit(EXIT_ABORTED)
    except OSError as err:  # this host's own files: a full or read-only disk, a path that vanished
        where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f) or "qlaunch"
        print(f"qlaunch: error: {where}: {err.strerror or type(err).__name__}", file=sys.stderr)
        sys.exit(2)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
