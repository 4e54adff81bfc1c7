"""Backends behind one small interface, so the step loop never branches on the backend.

An Engine owns the wrapped model, the optimizer and the lr schedule:
  engine.model(input_ids, labels, position_ids) -> (loss_sum, n_tokens)
  engine.backward(loss)     # loss already normalised by the global token count (see session.py)
  engine.step() -> float    # clip, optimizer step, schedule step, zero grads; returns the grad norm
  engine.lr() -> float
"""

from __future__ import annotations

import torch
from torch import nn

from launcher.train import clip_grad_norm, lr_lambda, make_optimizer


class TorchEngine:
    """Plain PyTorch optimizer over (FSDP2-sharded or unsharded) LoRA parameters."""

    def __init__(self, model: nn.Module, recipe, total_steps: int, device_type: str):
        t = recipe.train
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, t.lr, t.weight_decay, t.betas, device_type)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(t.schedule, t.warmup_steps, total_steps, t.min_lr_ratio)
        )
        self.grad_clip = t.grad_clip

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        norm = clip_grad_norm(self.params, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


def make_engine(built, recipe, plan: dict, total_steps: int, device: torch.device):
    if plan["backend"] == "deepspeed":
        from launcher.parallel.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(built, recipe, plan, total_steps, device)
    return TorchEngine(built.loss_model, recipe, total_steps, device.type)
