"""`qlaunch run` on the launching host: the recipe to run, the run directory's files, spawning, the live view and
the exit status and report at the end."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import typer

from launcher.errors import EXIT_ABORTED, EXIT_DIVERGED, EXIT_PREEMPTED, StoppedBeforeStart, UserError


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """For commands that do their work in this process (merge, quantize, doctor): only qlaunch's own lines.

    bitsandbytes logs a kernel notice on import, transformers FutureWarnings, deprecation notes and a
    progress bar, DeepSpeed its accelerator choice; none is about the user's input. Errors still show."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # every logger, also those a library configures while it is imported
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                from transformers.utils import logging as hf_logging
            except Exception:  # noqa: BLE001 - doctor runs where transformers is missing or broken: it reports that
                hf_logging = None
            bars = hf_logging is not None and hf_logging.is_progress_bar_enabled()
            if bars:
                hf_logging.disable_progress_bar()
            try:
                yield
            finally:
                if bars:
                    hf_logging.enable_progress_bar()
    finally:
        logging.disable(previous)


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


def _recipe_to_run(recipe: str | None, resume: str | None) -> str:
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


def _absolute_runs_dir(rec):
    """log.runs_dir as an absolute path (at the edge: it is relative to where qlaunch runs), so the resolved
    recipe in the run directory places a resumed run beside the first one from any directory."""
    return rec.model_copy(
        update={"log": rec.log.model_copy(update={"runs_dir": str(Path(rec.log.runs_dir).resolve())})}
    )


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


def _has_auto(rec) -> bool:
    return rec.train.micro_batch == "auto" or rec.train.gradient_checkpointing == "auto"


def _warn_memory(plan) -> None:
    m = plan.memory
    if plan.device == "cuda" and m and not m["fits"]:
        print(
            f"warning: estimated {m['total_gib']:.1f} GiB per GPU exceeds {m['gpu_memory_gib']:.0f} GiB; "
            "`qlaunch plan` shows the breakdown and what to change",
            file=sys.stderr,
        )


def _print_plan(rec, plan) -> None:
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
