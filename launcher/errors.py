"""User errors and the exit statuses of `qlaunch run` (one line, no traceback: the CLI boundary prints them)."""

from __future__ import annotations

# Exit statuses of `qlaunch run` besides 0 (done) and the failed workers' own status (see the README).
EXIT_USER = 2  # bad input: recipe, flags, files, data
EXIT_DIVERGED = 3  # a non-finite loss or gradient norm stopped the run; nothing after the last good step was kept
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1/Ctrl-C after saving a checkpoint; resume later
EXIT_ABORTED = 130  # a second Ctrl-C killed the ranks at once (128 + SIGINT, as shells report it)


def one_line(message: object) -> str:
    return " ".join(str(message).split())


class UserError(Exception):
    """A problem with the user's input (recipe, flags, files). Printed as one line; exit code 2."""

    exit_code = EXIT_USER
    kind = "user"  # what a rank writes into its error record (launcher.rank.worker)

    def __init__(self, message: str):
        # Keep the message on one line whatever the cause's text contained.
        super().__init__(one_line(message))


class RecipeError(UserError):
    """The recipe (file or --set override) is invalid."""


class TrainingDiverged(UserError):
    """The loss or the gradient norm became NaN or infinite. Every rank sees the same all-reduced values, so
    all stop at the same step; no checkpoint or adapter is written after it (exit code 3)."""

    exit_code = EXIT_DIVERGED
    kind = "diverged"


class StoppedBeforeStart(Exception):
    """SIGTERM or SIGUSR1 reached qlaunch before any rank was started: nothing ran, nothing is kept (a run
    directory it had begun is removed), and the exit status is that of a preemption, so a SLURM job requeues
    and its --resume auto starts afresh."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, signame: str):
        super().__init__(f"stopped by {signame} before any rank started; nothing was trained; run it again to start")
