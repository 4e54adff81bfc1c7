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
