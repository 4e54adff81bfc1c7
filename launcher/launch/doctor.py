"""`qlaunch doctor`: is this machine ready to train? Versions, GPUs, limits, environment, disk.

Facts are gathered at the edge (`gather`), then judged by pure functions (`judge_*`) so the verdicts are
unit-tested without the machine they describe. A "fail" is something that stops a run (exit code 1);
a "warn" is something that slows it down, is untested, or stops only some runs (no GPU, for instance,
is fine for the CPU demo).
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

GiB = 2**30

# Combinations the test suite and the GPU measurements ran on (DESIGN.md). A prefix matches: "2.11"
# accepts 2.11.x. Order matters only for display.
TESTED: dict[str, dict[str, str]] = {
    "CPU CI": {
        "torch": "2.13.0",
        "transformers": "5.24.0",
        "peft": "0.21.2",
        "bitsandbytes": "0.50.2",
        "accelerate": "1.15.0",
        "deepspeed": "0.19.8",
    },
    "GPU hosts": {
        "torch": "2.11",
        "transformers": "5.17",
        "peft": "0.21.2",
        "bitsandbytes": "0.50.2",
        "accelerate": "1.15",
        "deepspeed": "0.19.8",
    },
}

# Mirrors pyproject.toml's dependencies: below these the code does not work.
MINIMUM: dict[str, str] = {
    "torch": "2.11",
    "transformers": "5.17",
    "peft": "0.21",
    "bitsandbytes": "0.50",
    "accelerate": "1.15",
    "safetensors": "0.4",
    "tokenizers": "0.21",
    "pydantic": "2.7",
    "typer": "0.12",
    "rich": "13",
    "pyyaml": "6",
}

OPTIONAL: dict[str, str] = {
    "deepspeed": "parallel.backend = 'deepspeed'",
    "datasets": "hub and saved (arrow) datasets",
    "matplotlib": "`qlaunch report` plots",
    "tensorboard": "log.tensorboard = true",
    "wandb": "log.wandb = true",
}

SHM_MIN = 1 * GiB  # NCCL uses /dev/shm for intra-node transport; containers default to 64 MiB

NOFILE_MIN = 4096  # each rank holds sockets, shared-memory handles and open safetensors files

DISK_WARN = 20 * GiB  # checkpoints + adapter of an 8B QLoRA run with a few kept checkpoints

DISK_FAIL = 1 * GiB

_SECRET = re.compile(r"TOKEN|KEY|SECRET|PASS", re.I)  # never print credentials found in the environment

ENV_PREFIXES = ("NCCL_", "TORCH_", "CUDA_", "PYTORCH_", "OMP_NUM_THREADS", "MASTER_", "WORLD_SIZE", "HF_")

# Environment settings known to hurt this launcher: value -> why.
ENV_BAD = {
    ("NCCL_NVLS_ENABLE", "1"): "NVLink multicast (NVLS) is kept off by qlaunch; forcing it on has hung collectives",
    ("NCCL_P2P_DISABLE", "1"): "peer-to-peer disabled: all-gathers go through host memory (much slower)",
    ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0"): "a hung collective will wait forever instead of failing",
    ("NCCL_SHM_DISABLE", "1"): "shared-memory transport disabled: intra-node traffic gets slower",
}


@dataclass(frozen=True)
class Check:
    area: str
    name: str
    status: str  # ok | info | warn | fail
    detail: str


@dataclass
class Facts:
    """Everything the judges look at (gathered once, or written by hand in tests)."""

    python: str = ""
    versions: dict[str, str | None] = field(default_factory=dict)
    torch_cuda: str | None = None  # CUDA version torch was built with
    nccl: str | None = None
    dist: dict[str, bool] = field(default_factory=dict)  # backend -> available
    gpus: list[dict[str, Any]] = field(default_factory=list)  # name, memory, capability, bf16
    peer: dict[tuple[int, int], bool] = field(default_factory=dict)
    cuda_error: str | None = None
    bnb_error: str | None = None
    shm_bytes: int | None = None
    nofile: tuple[int, int] | None = None
    host_memory: int | None = None
    cpus: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    disk_path: str = ""
    disk_free: int | None = None
    runs_dir_problem: str | None = None  # why no run directory can be created at disk_path


def _release(v: str) -> tuple[int, ...]:
    m = re.match(r"(\d+(?:\.\d+)*)", v)
    return tuple(int(x) for x in m.group(1).split(".")) if m else ()


def version_matches(found: str, tested: str) -> bool:
    """'2.11.0+cu130' matches '2.11' (prefix on release numbers; local build tags ignored)."""
    want = _release(tested)
    return _release(found)[: len(want)] == want


def closest_combo(versions: dict[str, str | None]) -> tuple[str, list[str]]:
    """(name of the tested combination with fewest differences, the packages that differ)."""
    best: tuple[str, list[str]] | None = None
    for name, combo in TESTED.items():
        diff = [p for p, v in combo.items() if versions.get(p) and not version_matches(versions[p] or "", v)]
        if best is None or len(diff) < len(best[1]):
            best = (name, diff)
    assert best is not None
    return best


def judge_versions(versions: dict[str, str | None], python: str = "") -> list[Check]:
    out: list[Check] = []
    if python:
        ok = _release(python) >= (3, 11)
        out.append(Check("versions", "python", "ok" if ok else "fail", python + ("" if ok else " (needs 3.11+)")))
    combo, differ = closest_combo(versions)
    for pkg, minimum in MINIMUM.items():
        v = versions.get(pkg)
        if v is None:
            out.append(Check("versions", pkg, "fail", f"not installed (needs >= {minimum})"))
        elif _release(v) < _release(minimum):
            out.append(Check("versions", pkg, "fail", f"{v} is older than the required {minimum}"))
        elif pkg in differ:
            tested = ", ".join(f"{c[pkg]} ({n})" for n, c in TESTED.items() if pkg in c)
            out.append(Check("versions", pkg, "warn", f"{v}: untested; tested with {tested}"))
        else:
            note = f" (as tested on {combo})" if pkg in TESTED[combo] else ""
            out.append(Check("versions", pkg, "ok", v + note))
    for pkg, use in OPTIONAL.items():
        v = versions.get(pkg)
        if v is None:
            out.append(Check("versions", pkg, "info", f"not installed (optional: {use})"))
        elif pkg in differ:
            out.append(Check("versions", pkg, "warn", f"{v}: untested; tested with {TESTED[combo][pkg]} ({combo})"))
        else:
            out.append(Check("versions", pkg, "ok", v))
    return out


def judge_machine(f: Facts, require_gpu: bool = False) -> list[Check]:
    out: list[Check] = []
    if f.torch_cuda:
        out.append(Check("torch", "CUDA build", "ok", f"CUDA {f.torch_cuda}, NCCL {f.nccl or 'unknown'}"))
    elif f.versions.get("torch"):
        out.append(Check("torch", "CUDA build", "fail" if require_gpu else "info", "CPU-only build of torch"))
    for backend in ("nccl", "gloo"):
        if backend in f.dist:
            need = backend == "gloo" or bool(f.gpus)
            status = "ok" if f.dist[backend] else ("fail" if need else "info")
            out.append(
                Check("torch", f"{backend} backend", status, "available" if f.dist[backend] else "not available")
            )
    if f.bnb_error:
        out.append(Check("torch", "bitsandbytes", "fail", f"import failed: {f.bnb_error}"))

    if not f.gpus:
        why = f" ({f.cuda_error})" if f.cuda_error else ""
        detail = f"no CUDA GPU visible{why}: runs use CPU processes (gloo)"
        out.append(Check("gpus", "GPUs", "fail" if require_gpu else "warn", detail))
    for i, g in enumerate(f.gpus):
        detail = f"{g['name']}, {g['memory'] / GiB:.1f} GiB, compute {g.get('capability', '?')}"
        status = "ok"
        if g.get("bf16") is False:
            status, detail = "warn", detail + "; no bf16 (set quant.compute_dtype/storage_dtype = 'float16')"
        out.append(Check("gpus", f"GPU {i}", status, detail))
    if len(f.gpus) > 1:
        missing = sorted((a, b) for (a, b), ok in f.peer.items() if not ok)
        if missing:
            pairs = ", ".join(f"{a}->{b}" for a, b in missing[:6]) + (" ..." if len(missing) > 6 else "")
            out.append(Check("gpus", "peer access", "warn", f"no P2P between {pairs}: NCCL goes through host memory"))
        else:
            out.append(Check("gpus", "peer access", "ok", f"all {len(f.gpus)} GPUs reach each other directly"))
    names = {g["name"] for g in f.gpus}
    if len(names) > 1:
        out.append(Check("gpus", "mixed GPUs", "warn", "different GPU models: the slowest sets the pace"))

    if f.shm_bytes is not None:
        ok = f.shm_bytes >= SHM_MIN
        detail = f"{f.shm_bytes / GiB:.2f} GiB"
        if not ok:
            detail += " (NCCL and data workers need more: docker run --shm-size=16g or --ipc=host)"
        out.append(Check("system", "/dev/shm", "ok" if ok else "warn", detail))
    if f.nofile is not None:
        soft, hard = f.nofile
        ok = soft >= NOFILE_MIN
        detail = f"soft {soft}, hard {hard}" + (
            "" if ok else f" (raise it: ulimit -n {min(max(hard, NOFILE_MIN), 65536)})"
        )
        out.append(Check("system", "open files", "ok" if ok else "warn", detail))
    if f.host_memory:
        out.append(Check("system", "host memory", "info", f"{f.host_memory / GiB:.1f} GiB, {f.cpus or '?'} CPUs"))
    if f.runs_dir_problem:  # its free space says nothing: no run can start there
        out.append(Check("system", "runs dir", "fail", f.runs_dir_problem))
    elif f.disk_free is not None:
        status = "ok" if f.disk_free >= DISK_WARN else ("warn" if f.disk_free >= DISK_FAIL else "fail")
        out.append(Check("system", "free disk", status, f"{f.disk_free / GiB:.1f} GiB free at {f.disk_path}"))

    if not f.env:
        out.append(Check("env", "NCCL_*/TORCH_*", "info", "none set (defaults)"))
    for k, v in sorted(f.env.items()):
        bad = ENV_BAD.get((k, v))
        out.append(Check("env", k, "warn" if bad else "info", f"{v}" + (f" ({bad})" if bad else "")))
    return out


def gather(runs_dir: str | Path = "runs") -> Facts:
    """Look at this machine (imports torch; touches CUDA only to list devices)."""
    f = Facts(python=sys.version.split()[0])
    for pkg in list(MINIMUM) + list(OPTIONAL):
        try:
            f.versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            f.versions[pkg] = None
    try:
        import torch
        import torch.distributed as dist

        f.torch_cuda = torch.version.cuda
        f.dist = {
            "gloo": dist.is_available() and dist.is_gloo_available(),
            "nccl": dist.is_available() and dist.is_nccl_available(),
        }
        try:
            if torch.cuda.is_available():
                if f.torch_cuda:
                    f.nccl = ".".join(map(str, torch.cuda.nccl.version()))
                for i in range(torch.cuda.device_count()):
                    p = torch.cuda.get_device_properties(i)
                    f.gpus.append(
                        {
                            "name": p.name,
                            "memory": p.total_memory,
                            "capability": f"{p.major}.{p.minor}",
                            "bf16": p.major >= 8,
                        }
                    )
                n = len(f.gpus)
                f.peer = {(a, b): torch.cuda.can_device_access_peer(a, b) for a in range(n) for b in range(n) if a != b}
        except Exception as err:  # noqa: BLE001 - a broken driver is a finding, not a crash
            f.cuda_error = f"{type(err).__name__}: {err}".splitlines()[0][:200]
    except ImportError:
        pass
    if f.versions.get("bitsandbytes"):
        try:
            import bitsandbytes  # noqa: F401
        except Exception as err:  # noqa: BLE001
            f.bnb_error = f"{type(err).__name__}: {err}".splitlines()[0][:200]
    if Path("/dev/shm").is_dir():
        f.shm_bytes = shutil.disk_usage("/dev/shm").total
    f.nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        f.host_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        f.host_memory = None
    f.cpus = os.cpu_count()
    f.env = {
        k: ("(set; value hidden)" if _SECRET.search(k) else v)
        for k, v in os.environ.items()
        if k.startswith(ENV_PREFIXES)
    }
    # The runs dir may not exist yet: measure the nearest existing ancestor (where it will be created).
    p = Path(runs_dir).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    f.disk_path = str(Path(runs_dir))
    f.disk_free = shutil.disk_usage(p).free
    f.runs_dir_problem = runs_dir_problem(Path(runs_dir), p)
    return f


def runs_dir_problem(runs_dir: Path, existing: Path) -> str | None:
    """Why run directories cannot be created under RUNS_DIR, whose nearest existing part is EXISTING."""
    if not existing.is_dir():
        what = "is" if existing == runs_dir.resolve() else f"lies under {existing}, which is"
        return f"{runs_dir} {what} not a directory: runs cannot be created there (--runs-dir, log.runs_dir)"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable: runs cannot be created under it (--runs-dir, log.runs_dir)"
    return None


def run_checks(runs_dir: str | Path = "runs", require_gpu: bool = False) -> list[Check]:
    f = gather(runs_dir)
    return judge_versions(f.versions, f.python) + judge_machine(f, require_gpu)


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.status == "fail" for c in checks) else 0


def render(checks: list[Check]):
    from rich.table import Table
    from rich.text import Text

    styles = {"ok": "green", "info": "dim", "warn": "yellow", "fail": "bold red"}
    table = Table(show_edge=False, pad_edge=False)
    for col in ("area", "check", "status", "detail"):
        table.add_column(col, no_wrap=col != "detail")
    for c in checks:
        table.add_row(c.area, c.name, Text(c.status, style=styles[c.status]), c.detail)
    return table


def verdict(checks: list[Check]) -> str:
    fails = [c for c in checks if c.status == "fail"]
    warns = [c for c in checks if c.status == "warn"]
    if fails:
        return f"{len(fails)} blocking problem(s): " + "; ".join(f"{c.name}: {c.detail}" for c in fails)
    return "ready" + (f" ({len(warns)} warning(s))" if warns else "")
