"""`log.profile_steps`: the torch profiler over a few training steps, summarised per rank.

Each rank writes `profile/rank{R}.txt` in its run directory: the wall time of the profiled steps, how much
of it the GPU was busy (the union of kernel intervals, so overlapping streams are not counted twice),
device time by kind of kernel (matmul, 4-bit dequantization, attention, communication, the rest), kernel
launches per step, and the top operators by device and by host time. Rank 0 also writes a Chrome trace
(`profile/rank0.trace.json.gz`, open it in Perfetto). The summary is what bench/RESULTS.md quotes.
"""

from __future__ import annotations

import gzip
import shutil
import time
from pathlib import Path

import torch

# Kernel-name fragments per kind, first match wins (cuBLAS/cuBLASLt/CUTLASS matmuls have many names).
KINDS = (
    ("communication", ("nccl",)),
    ("4-bit dequantize", ("dequantize", "kdequant")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "sm90_", "sm80_")),
    ("optimizer", ("adam", "multi_tensor")),
    ("copy / cast", ("copy", "memcpy", "memset", "cast", "fill")),
)


def kind_of(kernel: str) -> str:
    low = kernel.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other (elementwise, norms, reductions)"


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def summarize(prof, wall_s: float, steps: int, title: str) -> str:
    """Plain-text summary of a finished torch.profiler.profile over `steps` steps lasting `wall_s`."""
    from torch.autograd import DeviceType

    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    lines = [title, f"profiled steps: {steps}, wall {wall_s * 1e3:.1f} ms ({wall_s / max(steps, 1) * 1e3:.1f} ms/step)"]
    if kernels:
        kinds = [kind_of(e.name) for e in kernels]
        spans = [(e.time_range.start, e.time_range.end) for e in kernels]
        compute = [span for span, k in zip(spans, kinds, strict=True) if k != "communication"]
        wall_us = wall_s * 1e6
        lines += [
            f"GPU busy (any kernel): {busy_us(spans) / wall_us:.1%} of wall; "
            f"computing (not communication): {busy_us(compute) / wall_us:.1%}",
            f"kernel launches per step: {len(kernels) / max(steps, 1):.0f}",
            "",
            f"{'device time by kind':40s} {'ms/step':>10s} {'share':>7s}",
        ]
        by_kind: dict[str, float] = {}
        for (start, end), k in zip(spans, kinds, strict=True):
            by_kind[k] = by_kind.get(k, 0.0) + end - start
        total = sum(by_kind.values()) or 1.0
        for k, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
            lines.append(f"{k:40s} {us / 1e3 / max(steps, 1):10.2f} {us / total:7.1%}")
        lines += [
            "",
            prof.key_averages().table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70),
        ]
    else:
        lines.append("no device kernels recorded (CPU run): host time only")
    lines += ["", prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70)]
    return "\n".join(lines) + "\n"


class StepProfiler:
    """Profiles 1-based steps first..last (inclusive) of this process; a no-op when `steps` is None.

    Call `begin(step)` before a step's work and `end(step)` after it (step numbers 1-based, as logged).
    """

    def __init__(self, steps: tuple[int, int] | None, out_dir: Path, rank: int, device: torch.device):
        self.first, self.last = steps if steps else (0, -1)
        self.out_dir, self.rank, self.device = out_dir, rank, device
        self.prof = None
        self.t0 = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def begin(self, step: int) -> None:
        if step != self.first:
            return
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._sync()
        self.prof = profile(activities=acts)
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def end(self, step: int) -> None:
        if self.prof is None or step != self.last:
            return
        self._sync()
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        prof, self.prof = self.prof, None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        n = self.last - self.first + 1
        title = f"rank {self.rank}, steps {self.first}-{self.last}"
        (self.out_dir / f"rank{self.rank}.txt").write_text(summarize(prof, wall, n, title))
        if self.rank == 0:
            raw = self.out_dir / "rank0.trace.json"
            prof.export_chrome_trace(str(raw))
            with open(raw, "rb") as src, gzip.open(str(raw) + ".gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            raw.unlink()


# Frames that say nothing about why memory was allocated (wrappers every allocation passes through).
_GENERIC_FRAMES = (
    "torch/nn/modules/module.py",
    "torch/utils/",
    "torch/_tensor.py",
    "torch/autograd/",
    "torch/_ops.py",
    "torch/_dynamo/",
    "torch/_compile.py",
    "torch/_functorch/",
    "torch/_library/",
    "torch/overrides.py",
    "contextlib.py",
    "functools.py",
)

# Packages whose frames tell whose code asked for the memory.
_OWNER_FRAMES = ("launcher/", "transformers/", "peft/", "bitsandbytes/", "torch/distributed/")


def _short(frame: dict) -> str:
    path = str(frame.get("filename", "?"))
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    if "launcher/" in path:
        path = "launcher/" + path.rsplit("launcher/", 1)[1]
    return f"{path}:{frame.get('line', '?')} {frame.get('name', '?')}"


def allocation_site(frames: list[dict]) -> str:
    """'innermost informative frame  <-  innermost frame of launcher/transformers/peft/bitsandbytes/FSDP'.

    Frames come innermost first, as torch's allocator history records them."""
    site = next((f for f in frames if not any(g in str(f.get("filename", "")) for g in _GENERIC_FRAMES)), None)
    owner = next((f for f in frames if any(o in str(f.get("filename", "")) for o in _OWNER_FRAMES)), None)
    parts = [_short(f) for f in (site, owner) if f is not None]
    if len(parts) == 2 and parts[0] == parts[1]:
        parts = parts[:1]
    return "  <-  ".join(parts) or "(no Python frame)"


def peak_breakdown(events: list[dict], base_bytes: int) -> tuple[int, int, list[tuple[str, int, int]]]:
    """(peak allocated bytes, event index of the peak, [(site, bytes, blocks)] live at the peak, largest first).

    `events` is one device's allocator trace (torch.cuda.memory._snapshot()["device_traces"][d]); a block
    counts from its 'alloc' to its 'free_completed' (a block freed while another stream still uses it stays
    allocated until then). `base_bytes` were allocated when recording began (mostly the model's shards):
    they count toward every point and are listed as one line; frees of such blocks lower it.
    """
    total, peak, at = base_bytes, base_bytes, -1
    sizes: dict[int, int] = {}
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            sizes[e["addr"]] = e["size"]
            total += e["size"]
        elif e["action"] == "free_completed":
            total -= sizes.pop(e["addr"], e["size"])
        if total > peak:
            peak, at = total, i
    live: dict[int, dict] = {}
    base = base_bytes
    for e in events[: at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_completed":
            if live.pop(e["addr"], None) is None:
                base -= e["size"]
    groups: dict[str, list[int]] = {}
    for e in live.values():
        g = groups.setdefault(allocation_site(e.get("frames") or []), [0, 0])
        g[0] += e["size"]
        g[1] += 1
    rows = [(site, b, n) for site, (b, n) in groups.items()]
    rows.append(("(allocated before the recorded steps: model shards, optimizer state, ...)", base, 0))
    return peak, at, sorted(rows, key=lambda r: -r[1])


def memory_summary(events: list[dict], base_bytes: int, reserved_peak: int, title: str, top: int = 30) -> str:
    peak, at, rows = peak_breakdown(events, base_bytes)
    g = 2**30
    lines = [
        title,
        f"peak allocated in these steps {peak / g:.2f} GiB (event {at + 1} of {len(events)}); "
        f"peak reserved since the run began {reserved_peak / g:.2f} GiB",
        "",
        f"{'GiB':>7s} {'blocks':>7s}  live at the peak, by allocation site",
    ]
    for site, b, n in rows[:top]:
        lines.append(f"{b / g:7.3f} {n:7d}  {site}")
    if len(rows) > top:
        rest = rows[top:]
        lines.append(f"{sum(r[1] for r in rest) / g:7.3f} {sum(r[2] for r in rest):7d}  ({len(rest)} more sites)")
    return "\n".join(lines) + "\n"


class MemoryRecorder:
    """Records the CUDA allocator's history over 1-based steps first..last (`log.memory_steps`).

    Each rank writes `profile/memory-rank{R}.txt`: the peak allocated within the steps and what was live
    at it, grouped by allocation site. Rank 0 also writes `profile/memory-rank0.pickle`, the allocator
    snapshot for https://pytorch.org/memory_viz. Without a GPU there is nothing to record; the text says so.
    """

    def __init__(self, steps: tuple[int, int] | None, out_dir: Path, rank: int, device: torch.device):
        self.first, self.last = steps if steps else (0, -1)
        self.out_dir, self.rank, self.device = out_dir, rank, device
        self.base = 0
        self.recording = False

    def begin(self, step: int) -> None:
        if step != self.first or self.device.type != "cuda":
            return
        torch.cuda.synchronize(self.device)
        self.base = torch.cuda.memory_allocated(self.device)
        # Python stacks only: C++ unwinding at every allocation would slow the steps it measures.
        torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python", max_entries=2_000_000)
        self.recording = True

    def end(self, step: int) -> None:
        if step != self.last:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out = self.out_dir / f"memory-rank{self.rank}.txt"
        title = f"rank {self.rank}, steps {self.first}-{self.last}"
        if not self.recording:
            if self.device.type != "cuda":
                why = "no CUDA device: the allocator history is recorded on GPUs only"
            else:  # a resumed run started after step `first`: begin() never saw it
                why = f"step {self.first} ran before this process started (a resumed run): nothing recorded"
            out.write_text(f"{title}\n{why}\n")
            return
        torch.cuda.synchronize(self.device)
        snap = torch.cuda.memory._snapshot(self.device)
        torch.cuda.memory._record_memory_history(enabled=None)
        self.recording = False
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        events = snap["device_traces"][index]
        reserved = torch.cuda.max_memory_reserved(self.device)
        out.write_text(memory_summary(events, self.base, reserved, title))
        if self.rank == 0:
            import pickle

            with open(self.out_dir / "memory-rank0.pickle", "wb") as f:
                pickle.dump(snap, f)
