"""The optimizer, the learning-rate schedule multiplier and gradient clipping."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step `step` (0-based: the first step uses step 0)."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return min_ratio + (1 - min_ratio) * (1 - progress)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float, betas, device: str):
    kwargs = {"fused": True} if device == "cuda" else {"foreach": True}
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), **kwargs)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """Global L2 norm over sharded (DTensor) or plain gradients; clips when max_norm is set."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return float(norm)
