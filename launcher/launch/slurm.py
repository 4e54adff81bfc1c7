"""SLURM, without touching SLURM: parse an allocation's environment, render an sbatch script.

Both are pure functions of their inputs (an environment mapping, typed options), so they are unit-tested
without a cluster; `qlaunch run` calls `from_env(os.environ)` and `qlaunch slurm` writes `render_sbatch`.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass

from launcher.errors import UserError
from launcher.plan.limits import MAX_NODES

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside [...] (a comma inside brackets separates ranges, not hosts)."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise UserError(f"bad SLURM node list {text!r}: unbalanced ']'")
        if ch == sep and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise UserError(f"bad SLURM node list {text!r}: unbalanced '['")
    out.append("".join(cur))
    return out


def _expand_ranges(body: str, whole: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07']; a range keeps the zero padding of its first bound."""
    out: list[str] = []
    for part in body.split(","):
        m = _RANGE.match(part.strip())
        if not m:
            raise UserError(f"bad SLURM node list {whole!r}: {part!r} is not N or N-M")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise UserError(f"bad SLURM node list {whole!r}: range {part!r} runs backwards")
        if len(out) + int(hi) - int(lo) + 1 > MAX_NODES:  # n[1-99999999] would take minutes and gigabytes
            raise UserError(f"bad SLURM node list {whole[:80]!r}: names more than {MAX_NODES} hosts")
        width = len(lo) if lo.startswith("0") else 0
        out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    return out


def _expand_one(item: str, whole: str) -> list[str]:
    """One host expression; several bracket groups multiply out ('r[1-2]n[1-2]' -> 4 hosts, SLURM's order)."""
    hosts = [""]
    rest = item
    while rest:
        i = rest.find("[")
        if i < 0:
            hosts = [h + rest for h in hosts]
            break
        j = rest.find("]", i)
        prefix, body, rest = rest[:i], rest[i + 1 : j], rest[j + 1 :]
        numbers = _expand_ranges(body, whole)
        if len(hosts) * len(numbers) > MAX_NODES:
            raise UserError(f"bad SLURM node list {whole[:80]!r}: names more than {MAX_NODES} hosts")
        hosts = [h + prefix + n for h in hosts for n in numbers]
    return hosts


def expand_nodelist(text: str) -> list[str]:
    """SLURM's compressed host list ('gpu[01-03,07]', 'a[1-2],b3') as hostnames, in allocation order."""
    text = text.strip()
    if not text:
        raise UserError("empty SLURM node list")
    hosts: list[str] = []
    for item in _split_top(text):
        if not item:
            raise UserError(f"bad SLURM node list {text!r}: empty entry")
        hosts += _expand_one(item, text)
        if len(hosts) > MAX_NODES:
            raise UserError(f"bad SLURM node list {text[:80]!r}: names more than {MAX_NODES} hosts")
    return hosts


@dataclass(frozen=True)
class SlurmNode:
    """What `qlaunch run` takes from a SLURM allocation: the launch geometry of this node."""

    job_id: str
    nodes: tuple[str, ...]
    node_rank: int
    master_addr: str
    master_port: int

    @property
    def nnodes(self) -> int:
        return len(self.nodes)


def job_port(job_id: str, base: int = 15000) -> int:
    """A rendezvous port per job, so jobs sharing a node don't collide. Even, so port+1 (the node watch)
    is free too; kept below 32768, where Linux starts handing out ephemeral ports."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return base + 2 * (int(digits[-18:]) % 8000)  # the last digits: int() refuses 4300 and more


def _first_set(env: Mapping[str, str], *names: str) -> tuple[str, str] | tuple[None, None]:
    """(name, value) of the first of these variables that is set and not empty."""
    for name in names:
        if env.get(name):
            return name, env[name]
    return None, None


def _integer(name: str, value: str, what: str) -> int:
    """A count or id SLURM writes as plain decimal digits; anything else is one line naming the variable."""
    if not re.fullmatch(r"[0-9]{1,18}", value):
        shown = value if len(value) <= 40 else value[:37] + "..."
        raise UserError(
            f"{name} = {shown!r}: not {what} (SLURM writes a non-negative integer there); fix or unset it, or "
            "run with --no-slurm"
        )
    return int(value)


def from_env(env: Mapping[str, str]) -> SlurmNode | None:
    """This node's place in the allocation, or None outside SLURM.

    Inside `srun`, the step's variables describe the nodes this command runs on (a step may use fewer
    nodes than the job); in the batch script itself only the job's exist.
    """
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id:
        return None
    in_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    step = ("SLURM_STEP_NODELIST",) if in_step else ()
    list_var, nodelist = _first_set(env, *step, "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    if not list_var or not nodelist:
        return None  # an allocation without a node list is not one we can launch across
    # The job id names the run directory (RUNS_DIR/NAME/<job id>) and picks the port: SLURM's are integers.
    _integer("SLURM_JOB_ID" if env.get("SLURM_JOB_ID") else "SLURM_JOBID", job_id, "a job id")
    try:
        nodes = tuple(expand_nodelist(nodelist))
    except UserError as err:
        raise UserError(f"{list_var}: {err}") from None
    count_var, count = _first_set(
        env, *(("SLURM_STEP_NUM_NODES",) if in_step else ()), "SLURM_JOB_NUM_NODES", "SLURM_NNODES"
    )
    if count_var and count and _integer(count_var, count, "a node count") != len(nodes):
        raise UserError(f"SLURM says {count} node(s) but its node list {nodelist!r} names {len(nodes)}")
    if len(nodes) > 1 and not in_step:
        raise UserError(
            f"this SLURM job has {len(nodes)} nodes but qlaunch runs outside `srun`, on one of them only; "
            "start it with `srun --ntasks-per-node=1 qlaunch run ...` (the script `qlaunch slurm` writes does)"
        )
    tasks_var, tasks = _first_set(env, *(("SLURM_STEP_NUM_TASKS",) if in_step else ()), "SLURM_NTASKS")
    if in_step and tasks_var and tasks and _integer(tasks_var, tasks, "a task count") > len(nodes):
        raise UserError(
            f"SLURM started {tasks} tasks on {len(nodes)} node(s); qlaunch starts its own ranks, so run one "
            "task per node: `srun --ntasks-per-node=1 qlaunch run ...`"
        )
    me = env.get("SLURMD_NODENAME")
    if me in nodes:
        rank = nodes.index(me)
    else:
        rank_var, rank_text = _first_set(env, "SLURM_NODEID", "SLURM_PROCID")
        rank = _integer(rank_var, rank_text, "a node id") if rank_var and rank_text else 0
    if not 0 <= rank < len(nodes):
        raise UserError(f"SLURM node id {rank} is outside the step's {len(nodes)} node(s)")
    return SlurmNode(job_id, nodes, rank, nodes[0], job_port(job_id))


@dataclass(frozen=True)
class SbatchOptions:
    recipe: str  # as the user wrote it, relative to workdir
    nodes: int
    gpus_per_node: int
    job_name: str
    workdir: str  # the job's working directory (where `qlaunch slurm` ran)
    qlaunch: tuple[str, ...]  # the command that runs qlaunch on the nodes
    output: str  # the job's stdout/stderr file, relative to workdir (%j = job id)
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    request_gpus: bool = True  # False: ranks are CPU processes (no GRES request)
    cpus_per_node: int | None = None  # None: whole nodes (--exclusive)
    signal_seconds: int = 180
    overrides: tuple[str, ...] = ()
    version: str = ""


def render_sbatch(o: SbatchOptions) -> str:
    """One task per node runs `qlaunch run`; a warning signal before the time limit (or a preemption's
    SIGTERM) is forwarded to the ranks, which checkpoint and exit, and the job requeues itself; the
    requeued job resumes from that checkpoint."""
    q = shlex.quote
    for key, val in (
        ("--job-name", o.job_name),
        ("--partition", o.partition),
        ("--time", o.time),
        ("--account", o.account),
        ("working directory", o.workdir),
        ("--output", o.output),
    ):
        # #SBATCH lines are not shell: a value with a space would silently become two options.
        if val and re.search(r"\s", val):
            raise UserError(f"qlaunch slurm: {key} {val!r} contains whitespace, which #SBATCH lines cannot carry")
    sb = [
        f"--job-name={o.job_name}",
        f"--nodes={o.nodes}",
        "--ntasks-per-node=1",
    ]
    if o.request_gpus:
        sb.append(f"--gpus-per-node={o.gpus_per_node}")
    sb.append("--exclusive" if o.cpus_per_node is None else f"--cpus-per-task={o.cpus_per_node}")
    for key, val in (("partition", o.partition), ("time", o.time), ("account", o.account)):
        if val:
            sb.append(f"--{key}={val}")
    sb += [
        f"--chdir={o.workdir}",
        f"--output={o.output}",
        "--open-mode=append",
        "--requeue",
        f"--signal=B:USR1@{o.signal_seconds}",
    ]
    run_args = ["run", o.recipe, "--gpus", str(o.gpus_per_node)]
    for s in o.overrides:
        run_args += ["--set", s]
    lines = [
        "#!/bin/bash",
        f"# Written by `qlaunch slurm`{f' (qlaunch {o.version})' if o.version else ''}. Submit: sbatch THIS_FILE",
        "#",
        "# One task per node runs `qlaunch run`; it reads the node count, its node rank and the head node",
        "# from SLURM's environment. Before the time limit SLURM sends this script SIGUSR1 (--signal); a",
        "# preemption sends SIGTERM. Either is passed on (as SIGUSR1, through srun) to every node's qlaunch:",
        "# the ranks save a checkpoint and exit (qlaunch's exit status 75), the job requeues itself, and the",
        "# requeued job resumes from that checkpoint.",
        *(f"#SBATCH {s}" for s in sb),
        "",
        "set -uo pipefail",
        "",
        f"QLAUNCH=({' '.join(q(c) for c in o.qlaunch)})",
        "# Added on a requeued start (SLURM_RESTART_COUNT > 0): continue from the latest complete checkpoint.",
        "# QLAUNCH_RESUME_ARGS (set, even empty, at submission) replaces it.",
        "resume=()",
        'if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then resume=(${QLAUNCH_RESUME_ARGS---resume auto}); fi',
        "",
        "stopping=0",
        "on_signal() {",
        "    stopping=1",
        '    echo "qlaunch-slurm: $1 received: ranks save a checkpoint and stop; the job will requeue" >&2',
        # srun forwards SIGUSR1 to every task (each node's qlaunch tells its ranks to checkpoint and stop);
        # SIGTERM it would not forward but answer by killing the step. Once is enough: later signals are
        # ignored so that nothing cuts the checkpoint short.
        '    [ -n "${srun_pid:-}" ] && kill -USR1 "$srun_pid" 2>/dev/null',
        "    trap '' USR1 TERM",
        "}",
        "trap 'on_signal SIGUSR1' USR1",
        "trap 'on_signal SIGTERM' TERM",
        "",
        "# srun gets all the job's CPUs for its one task per node (steps default to one CPU per task).",
        'srun --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" --kill-on-bad-exit=1 \\',
        f'    "${{QLAUNCH[@]}}" {" ".join(q(a) for a in run_args)} ${{resume[@]+"${{resume[@]}}"}} &',
        "srun_pid=$!",
        "# `wait` returns early when a trapped signal arrives; keep waiting while the ranks checkpoint.",
        'while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; done',
        'wait "$srun_pid"',
        "rc=$?",
        'if [ "$rc" = 75 ] || { [ "$stopping" = 1 ] && [ "$rc" != 0 ]; }; then',
        '    echo "qlaunch-slurm: requeueing job $SLURM_JOB_ID (training exit code $rc)" >&2',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "    exit 0",
        "fi",
        'exit "$rc"',
        "",
    ]
    return "\n".join(lines)
