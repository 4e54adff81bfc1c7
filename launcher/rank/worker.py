"""Per-rank entry point: `python -m launcher.rank.worker RUN_DIR` (spawned by torch.distributed.run).

The process group is created in loop.init_process_group and ends with the process (see `leave`).
Everything it needs comes from the run directory (resolved recipe + plan); torchrun's own variables
(RANK, WORLD_SIZE, ...) are read here only.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import UserError
from launcher.procs import die_with_parent
from launcher.rundir import RunDir


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world: int

    @classmethod
    def from_env(cls) -> Dist:
        return cls(
            int(os.environ.get("RANK", 0)),
            int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)),
        )


def redirect_output(path: Path) -> None:
    """Send this process's stdout/stderr (including C-level writes) to its own log file, appending."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(fd, 1), os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not die_with_parent():  # torchrun is gone already: nobody would collect this rank (launcher.procs)
        return 1
    # A second argument names this node in a run directory shared by several nodes (its logs' folder).
    run = RunDir(Path(argv[0]).resolve(), argv[1] if len(argv) > 1 else None)
    d = Dist.from_env()
    terminal = None
    if os.environ.get("QLAUNCH_NO_REDIRECT") != "1":
        terminal = _unfollowed_terminal(d)
        redirect_output(run.rank_log(d.rank))
    print(
        f"[rank {d.rank}] start pid={os.getpid()} world={d.world} restart={os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}",
        flush=True,
    )
    try:
        from launcher.rank.loop import run_training

        run_training(run, d, terminal)
        return 0
    except UserError as err:  # bad input found only here, or a diverged run (TrainingDiverged)
        _write_error(run, d.rank, str(err), err.kind)
        print(f"error: {err}", flush=True)
        return err.exit_code
    except BaseException as err:  # noqa: BLE001 - every failure must reach the rank's log and error file
        traceback.print_exc()
        sys.stdout.flush()
        _write_error(run, d.rank, f"{type(err).__name__}: {err}".splitlines()[0][:500], "crash")
        return 1


def _unfollowed_terminal(d: Dist):
    """Rank 0's own stdout, kept before it goes to the rank's log, when no qlaunch follows the run.

    `qlaunch run` (and the script `qlaunch slurm` writes, which runs it) tails metrics.jsonl on the launching
    terminal and says it spawned the ranks (QLAUNCH_SPAWN_TIME). An outside launcher (`accelerate launch`,
    torchrun) does not: without these lines its terminal would stay silent until the run ends."""
    if d.rank != 0 or "QLAUNCH_SPAWN_TIME" in os.environ:
        return None
    return os.fdopen(os.dup(1), "w", buffering=1)


def _write_error(run: RunDir, rank: int, message: str, kind: str) -> None:
    try:
        run.rank_error_file(rank).write_text(
            json.dumps({"rank": rank, "time": time.time(), "kind": kind, "message": message})
        )
    except OSError:
        pass


def leave(code: int) -> None:
    """End the rank's process without interpreter shutdown, and without destroying the process groups.

    gloo runs each group's collectives on threads of its own, which keep a finished collective's tensors
    until they get round to dropping them, and dropping a tensor Python has already let go of takes the
    GIL. The groups of a device mesh outlive destroy_process_group (the mesh and FSDP hold them), so their
    threads are still running when the interpreter shuts down; one that asks for the GIL then is ended by
    Python in the middle of a C++ destructor, and the rank dies of SIGABRT ("terminate called without an
    active exception") after all its work is done. It is rare and random, and on two nodes it costs 300 s:
    the other node's torchrun waits that long in its exit barrier for the failed one. Destroying a group
    runs its C++ destructor with the GIL held, which joins those same threads. Everything the run keeps is
    written and closed by now (checkpoints, adapter, metrics): flush the output and exit at once.
    """
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    leave(main())
