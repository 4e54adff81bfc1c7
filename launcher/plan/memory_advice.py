"""What `qlaunch plan` shows of the memory estimate: concrete changes that bring a run under the card (each
checked by the planner) and the breakdown table."""

from __future__ import annotations

from typing import Any

from launcher.plan.memory import (
    LABELS,
    TIGHT_FRACTION,
    USABLE_FRACTION,
    Estimate,
    GiB,
    ModelShape,
    choose,
    estimate,
    micro_batch_candidates,
    with_fsdp,
)
from launcher.plan.recipe import Recipe


def suggestions(recipe: Recipe, shape: ModelShape, est: Estimate, force: bool = False) -> list[str]:
    """Concrete recipe/flag changes that bring the estimate under the card, each checked by the planner.

    Empty when the estimate is comfortably below the card, unless `force` (the run did run out of memory,
    whatever the estimate says): then changes are judged against the estimate itself as the limit.
    """
    su = est.setup
    gib = est.gpu_memory / GiB
    limit = USABLE_FRACTION * est.gpu_memory
    out: list[str] = []
    if est.total <= TIGHT_FRACTION * est.gpu_memory:
        if not force:
            return out
        limit = min(limit, TIGHT_FRACTION * est.total)  # must also save a real share of what did not fit

    def again(r: Recipe = recipe, **kw) -> Estimate:
        args: dict[str, Any] = dict(
            world_size=su.world_size,
            micro_batch=su.micro_batch,
            checkpointing=su.checkpointing,
            gpu_memory=est.gpu_memory,
            nproc_per_node=su.nproc_per_node,
        )
        args.update(kw)
        return estimate(r, shape, **args)

    enough: list[bool] = []

    def say(text: str, e: Estimate) -> None:
        enough.append(e.total <= limit)
        if force:
            verdict = f"saves {fmt_bytes(est.total - e.total)}" + ("" if enough[-1] else ", likely not enough")
        else:
            verdict = f"fits {gib:.3g} GiB" if enough[-1] else f"still over {gib:.3g} GiB"
        out.append(f"{text}: {e.total / GiB:.1f} GiB per GPU ({verdict})")

    if su.micro_batch > 1:
        smaller = [m for m in micro_batch_candidates(recipe.train.global_batch, su.world_size) if m < su.micro_batch]
        pick = next((m for m in reversed(smaller) if again(micro_batch=m).total <= limit), smaller[0] if smaller else 1)
        accum = recipe.train.global_batch // (pick * su.world_size) if recipe.train.global_batch else 1
        say(f"--set train.micro_batch={pick} (gradient accumulation {accum})", again(micro_batch=pick))
    if not su.checkpointing:
        say("--set train.gradient_checkpointing=true", again(checkpointing=True))
    if su.keep_gathered:
        say("--set parallel.fsdp.reshard_after_forward=true", again(with_fsdp(recipe, reshard_after_forward=True)))
    p = recipe.parallel
    if p.backend == "fsdp" and not p.fsdp.cpu_offload:
        say("--set parallel.fsdp.cpu_offload=true", again(with_fsdp(recipe, cpu_offload=True)))
    if p.backend == "deepspeed" and not p.deepspeed.offload_optimizer:
        r = recipe.model_copy(
            update={
                "parallel": p.model_copy(
                    update={"deepspeed": p.deepspeed.model_copy(update={"offload_optimizer": True})}
                )
            }
        )
        say("--set parallel.deepspeed.offload_optimizer=true", again(r))
    if p.backend != "none":
        per_node = su.nproc_per_node
        nnodes = max(1, su.world_size // max(per_node, 1))
        for w in (2 * su.world_size, 4 * su.world_size):
            e = again(world_size=w, nproc_per_node=min(w, 8) if nnodes == 1 else per_node)
            if nnodes == 1 and w <= 8:
                flag = f"--gpus {w}"
            else:
                flag = f"--nnodes {max(1, w // max(per_node, 1))}"
            say(flag, e)
            if e.total <= limit:
                break
    elif su.world_size == 1:
        say("--set parallel.backend=fsdp --gpus 2", again(_with_backend(recipe, "fsdp"), world_size=2))
    if out and not any(enough):
        # No single change is enough: the planner's smallest-fitting micro-batch with checkpointing.
        both = recipe.train.model_copy(update={"micro_batch": "auto", "gradient_checkpointing": "auto"})
        best = choose(
            recipe.model_copy(update={"train": both}), shape, su.world_size, est.gpu_memory, su.nproc_per_node
        )
        if best.fits:
            bs = best.setup
            say(
                f"--set train.micro_batch={bs.micro_batch} --set train.gradient_checkpointing="
                + ("true" if bs.checkpointing else "false"),
                best,
            )
    return out


def _with_backend(recipe: Recipe, backend: str) -> Recipe:
    return recipe.model_copy(update={"parallel": recipe.parallel.model_copy(update={"backend": backend})})


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= 0.1 * GiB else f"{n / 2**20:.1f} MiB"


def render(est: Estimate, tips: list[str], backend: str):
    """A rich renderable: the breakdown table, the verdict and the suggestions (for `qlaunch plan`)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    su = est.setup
    head = Text(
        f"per-GPU memory: {backend}, {su.world_size} rank(s), micro-batch {su.micro_batch}, "
        f"gradient checkpointing {'on' if su.checkpointing else 'off'}"
        + (", layers kept gathered from forward to backward" if su.keep_gathered else ""),
        style="bold",
    )
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("part")
    table.add_column("size", justify="right")
    table.add_column("share", justify="right")
    total = max(est.total, 1)
    for key, val in est.parts.items():
        label = LABELS[key]
        if key == "activations":
            label += " (checkpointed)" if su.checkpointing else " (no checkpointing)"
        table.add_row(label, fmt_bytes(val), f"{100 * val / total:.0f}%")
    table.add_section()
    table.add_row("total", fmt_bytes(est.total), "")
    table.add_row("  torch allocator share (max_memory_reserved)", fmt_bytes(est.reserved), "")
    gib = est.gpu_memory / GiB
    used = f"{est.total / GiB:.1f} of {gib:.3g} GiB per GPU"
    if est.fits:
        verdict = Text(f"verdict: fits ({used})", style="bold green")
    else:
        verdict = Text(f"verdict: does not fit ({used})", style="bold red")
    lines: list[Any] = [head, table, verdict]
    lines += [Text(f"note: {n}") for n in est.notes]
    if tips:
        lines.append(Text("suggestions:" if not est.fits else "close to the limit; to save memory:"))
        lines += [Text(f"  {t}") for t in tips]
    return Group(*lines)
