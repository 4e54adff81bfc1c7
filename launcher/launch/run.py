"""`qlaunch run` on the launching host: the recipe to run, the run directory's files, spawning, the live view and
the exit status and report at the end."""

from __future__ import annotations

import json
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import typer

from launcher.errors import EXIT_ABORTED, EXIT_DIVERGED, EXIT_PREEMPTED, StoppedBeforeStart, UserError
from launcher.launch.placement import local_cluster, node_placement, open_shared_run_dir, shared_run_path


def _start(run_dir, writer, fresh, rec, plan, cluster, layer_cls, node_rank, master_addr, resume_from, cache,
           rdzv_endpoint, node_timeout):  # fmt: skip
    """Write the run directory's files and spawn; (torchrun's exit status, the node to blame or None)."""
    from launcher.launch.spawn import launch_spec, spawn
    from launcher.plan.configs import render_files
    from launcher.rundir import PLAN_FILE, RunPlan, write_files
    from launcher.ui import live

    spec = launch_spec(rec, plan, cluster, str(run_dir.path), run_dir.node)
    if writer:
        # One writer per run directory: the other nodes' configs would differ only in their node rank.
        configs = render_files(rec, plan, run_dir.path, layer_cls, node_rank, master_addr)
        try:
            write_files(run_dir, rec, {PLAN_FILE: RunPlan(plan, resume_from, cache).to_json(), **configs})
        except OSError as err:
            if fresh:  # nothing half-written: a run directory without its files is no run
                shutil.rmtree(run_dir.path, ignore_errors=True)
            raise UserError(
                f"{err.filename or run_dir.path}: cannot write the run directory ({err.strerror})"
            ) from None
    print(f"run directory: {run_dir.path}" + (f" (this node's logs: {run_dir.logs})" if run_dir.node else ""))

    # --- multinode: node 0 shows the live view, the others a line; the node watch names a failed node
    follow, watch = live.follow, None
    if plan.nnodes > 1 or rdzv_endpoint:
        from launcher.launch.nodewatch import follow_node, start_node_watch

        watch = start_node_watch(run_dir, rec, cluster, node_timeout)
        if rdzv_endpoint or node_rank:
            follow = follow_node(run_dir, f"node {node_rank}" if not rdzv_endpoint else "this node", live.follow)
        follow = watch.follow(follow) if watch else follow
    try:
        rc = spawn(run_dir, spec, follow)
        for sig in (signal.SIGTERM, signal.SIGUSR1):  # the run is over: nothing is left to stop
            signal.signal(sig, signal.SIG_DFL)
        return rc, _node_blame(watch, rc)
    finally:
        if watch:
            watch.close()


def _stop_means_stop_before_start() -> None:
    """Until spawn takes them over, SIGTERM and SIGUSR1 (SLURM's warning) end qlaunch with one line and exit
    75, cleaning up on the way (a data-cache lock, a begun run directory), instead of killing it silently."""

    def stop(signum, _frame):
        raise StoppedBeforeStart(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, stop)


def _end_of_run(run_dir, rc: int, blame: str | None, multinode: bool) -> None:
    """After torchrun exited: the exit status and the one report a user needs (see `run`'s docstring)."""
    from launcher.launch.diagnose import disk_full, failure_summary, rank_error_of

    resume = f"qlaunch run --resume {run_dir.path}" + (" (on every node, with its node flags)" if multinode else "")
    if rc == EXIT_ABORTED:
        print("qlaunch: aborted by a second Ctrl-C; the ranks were killed", file=sys.stderr)
        raise typer.Exit(EXIT_ABORTED)
    if rc == 0 and run_dir.preempted_file.is_file():
        info = json.loads(run_dir.preempted_file.read_text())
        print(
            f"preempted at step {info['step']}: checkpoint {info['checkpoint']}; continue with: {resume}",
            file=sys.stderr,
        )
        raise typer.Exit(EXIT_PREEMPTED)
    if rc == 0:
        return
    err = rank_error_of(run_dir)
    if err is not None and err["kind"] in ("user", "diverged"):
        # Marked, so that the directory does not read as a crashed run that --resume should continue.
        try:
            run_dir.failed_file.write_text(json.dumps(err) + "\n")
        except OSError:
            pass
        if err["kind"] == "user":
            raise UserError(err["message"])
        print(f"qlaunch: error: {err['message']}", file=sys.stderr)
        raise typer.Exit(EXIT_DIVERGED)
    full = disk_full(run_dir)
    if full:
        print(f"qlaunch: error: {full}; free some space, then continue with: {resume}", file=sys.stderr)
        raise typer.Exit(rc if 0 < rc < 256 else 1)
    if blame:
        print(blame, file=sys.stderr)
    print(failure_summary(run_dir), file=sys.stderr)
    raise typer.Exit(rc if 0 < rc < 256 else 1)


def recipe_to_run(recipe: str | None, resume: str | None) -> str:
    """The recipe file `qlaunch run` reads: the one given, or with --resume RUN_DIR|CHECKPOINT_DIR and no
    recipe, the run's own resolved recipe.toml (every default and --set of the first run filled in), so that
    the printed resume command reproduces the run."""
    if resume is not None and not resume.strip():
        raise UserError("--resume '': empty; give auto, a run directory or a checkpoint directory")
    if recipe is not None:
        return recipe
    if resume is None or resume == "auto":
        raise UserError(
            "missing argument 'RECIPE' (`qlaunch recipes` lists the bundled ones; only --resume RUN_DIR or "
            "--resume CHECKPOINT_DIR can do without it: the run's own recipe.toml is used); see 'qlaunch run --help'"
        )
    from launcher.rank.checkpoint_dir import looks_like_checkpoint
    from launcher.rundir import RECIPE_FILE

    p = Path(resume)
    run = p.parent.parent if looks_like_checkpoint(p) else p
    if not (run / RECIPE_FILE).is_file():
        raise UserError(
            f"--resume {resume}: no {RECIPE_FILE} in {run} (not a qlaunch run directory); give the RECIPE as well"
        )
    return str(run / RECIPE_FILE)


def _node_blame(watch, rc: int) -> str | None:
    """After this node's torchrun exited: report to the other nodes and, on failure, name the node to blame."""
    if watch is None:
        return None
    from launcher.launch.diagnose import first_rank_error
    from launcher.launch.nodewatch import node_blame

    peers = watch.finish(rc)
    if rc == 0:
        return None
    local = first_rank_error(watch.run)
    msg = node_blame(peers, (local or {}).get("message"))
    if watch.stopped_for:
        # They were not failing by themselves but waiting on the lost node in a collective.
        stopped = f"qlaunch stopped this node's ranks: they were waiting on {watch.stopped_for}"
        msg = msg.splitlines()[0] + "\n" + stopped if msg else stopped
    return msg


@dataclass(frozen=True)
class RunRequest:
    """`qlaunch run`'s command line (see its --help for each flag)."""

    recipe: str | None
    gpus: int | None = None
    nnodes: str | None = None
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    run_dir: str | None = None
    node_timeout: float = 60.0
    no_slurm: bool = False
    overrides: tuple[str, ...] = ()
    dry_run: bool = False
    resume: str | None = None


def run(req: RunRequest) -> None:
    """Validate, plan, check everything a rank would meet, tokenize the data, write the run directory, spawn
    and follow the ranks, and end with the run's exit status (see `qlaunch run --help`)."""
    from launcher.launch.prepare import flag_overrides, prepare, print_plan, warn_memory
    from launcher.plan.recipe_file import FlagOverride

    _stop_means_stop_before_start()
    recipe = recipe_to_run(req.recipe, req.resume)

    # --- multinode: this node's place, from the flags or else from a SLURM allocation
    where = node_placement(
        req.nnodes, req.node_rank, req.master_addr, req.master_port, req.rdzv_endpoint, req.rdzv_id, req.no_slurm
    )
    node_rank, master_addr, master_port = where.node_rank, where.master_addr, where.master_port
    # --- end multinode
    overrides = flag_overrides(list(req.overrides), req.gpus, where.nnodes)
    if master_port is not None:
        overrides.append(FlagOverride(f"launch.master_port={master_port}", f"--master-port {master_port}"))
    cluster = local_cluster(node_rank, master_addr, req.rdzv_endpoint, where.rdzv_id, where.min_nodes)
    model = "if_auto" if req.dry_run else "read"
    prepared = prepare(recipe, overrides, cluster, node_rank=node_rank, model=model, absolute_runs=True)
    rec, plan = prepared.recipe, prepared.plan
    warn_memory(plan)
    if plan.device == "cpu" and rec.parallel.backend == "fsdp" and rec.parallel.fsdp.cpu_offload and not req.dry_run:
        # FSDP2 pins offloaded shards in page-locked memory, which needs a GPU; on CPU they already are in host memory.
        raise UserError(
            "parallel.fsdp.cpu_offload = true needs CUDA GPUs (no GPU on this machine); set it to false here, "
            "the CPU ranks keep everything in host memory anyway"
        )
    if rec.parallel.backend == "fsdp" and rec.parallel.fsdp.hybrid and plan.nnodes == 1:
        print("warning: parallel.fsdp.hybrid has no effect on one node (it replicates across nodes)", file=sys.stderr)
    if where.banner:
        print(where.banner)
    from launcher.launch.spawn import launch_spec

    shared = shared_run_path(rec, where, req.run_dir, plan.nnodes > 1 or bool(req.rdzv_endpoint))
    if req.dry_run:
        placeholder = str(shared or Path(rec.log.runs_dir) / rec.name / "<timestamp>")
        spec = launch_spec(rec, plan, cluster, placeholder)
        print_plan(rec, plan)
        env = " ".join(f"{k}={v}" for k, v in spec["env"].items())
        print("command: " + (env + " " if env else "") + " ".join(spec["argv"]))
        return
    from launcher.launch import preflight

    preflight.check(rec)
    resume_from = None
    if req.resume is not None:
        from launcher.rank.checkpoint_dir import check_compatible, check_loadable, find_resume_target

        resume_from = find_resume_target(req.resume, Path(rec.log.runs_dir), rec.name)
        if resume_from is None:
            print(f"--resume auto: no complete checkpoint of {rec.name} yet; starting from step 0")
        else:
            check_compatible(resume_from, rec)
            check_loadable(resume_from)  # the DCP metadata the ranks will unpickle, checked here first
    if rec.parallel.backend == "deepspeed":
        from launcher.rank.parallel.deepspeed import require_deepspeed

        require_deepspeed()  # here, not minutes later on every rank
    from launcher.data.cache import DATA_CACHE_DIR
    from launcher.data.cache import prepare as prepare_data
    from launcher.plan.model_info import decoder_layer_class
    from launcher.rundir import new_run_dir

    layer_cls = decoder_layer_class(rec)
    # Every row of every dataset, tokenized here into the shared cache: a bad row anywhere is one line
    # before a run directory exists, and the ranks only map the finished file.
    cache = Path(rec.log.runs_dir) / DATA_CACHE_DIR
    prepare_data(rec, cache)
    if shared is None:
        run_dir, writer, fresh = new_run_dir(rec), True, True
    else:
        run_dir, writer = open_shared_run_dir(shared, plan.nnodes, node_rank, req.rdzv_endpoint, req.resume is not None)
        fresh = False
    try:
        rc, blame = _start(run_dir, writer, fresh, rec, plan, cluster, layer_cls, node_rank, master_addr,
                           resume_from, cache, req.rdzv_endpoint, req.node_timeout)  # fmt: skip
    except (StoppedBeforeStart, KeyboardInterrupt):
        # Nothing was started (spawn takes signals over before torchrun starts): nothing half-written stays.
        if fresh:
            shutil.rmtree(run_dir.path, ignore_errors=True)
        raise
    _end_of_run(run_dir, rc, blame, plan.nnodes > 1)
