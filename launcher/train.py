"""The step loop: exact global-batch loss, accumulation, clipping, schedule, metrics, eval."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100


class CausalLMLoss(nn.Module):
    """Decoder + lm_head + cross-entropy, returning the *sum* of token losses and the token count.

    The logits are never materialised for the whole sequence: lm_head runs over the tokens in chunks,
    each recomputed in backward (so no [tokens, vocab] fp32 tensor is kept alive). Positions without a
    label are skipped by cross_entropy's ignore_index rather than by boolean indexing, which would make
    the host wait for the GPU (a device sync) in the middle of every forward.
    This is also the FSDP root module, so the final norm and lm_head are gathered by its hooks.
    """

    def __init__(self, causal_lm: nn.Module, chunk_tokens: int = 2048):
        super().__init__()
        self.lm = causal_lm
        self.chunk_tokens = chunk_tokens

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        y = labels[:, 1:].reshape(-1)
        weight = self.lm.lm_head.weight
        total = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, h.shape[0], self.chunk_tokens):
            hs, ys = h[s : s + self.chunk_tokens], y[s : s + self.chunk_tokens]
            if torch.is_grad_enabled():
                total = total + checkpoint(_chunk_ce, hs, weight, ys, use_reentrant=False)
            else:
                total = total + _chunk_ce(hs, weight, ys)
        return total, (y != IGNORE).sum()


def _chunk_ce(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, w.to(h.dtype)).float()
    return F.cross_entropy(logits, y, ignore_index=IGNORE, reduction="sum")


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
