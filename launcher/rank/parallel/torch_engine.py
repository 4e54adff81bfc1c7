"""The torch engine: FSDP2 (or one unsharded device) behind the Engine interface, with DCP checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from launcher.rank.optim import clip_grad_norm, lr_lambda, make_optimizer


class TorchEngine:
    """Plain PyTorch optimizer over (FSDP2-sharded or unsharded) LoRA parameters."""

    def __init__(self, model: nn.Module, recipe, total_steps: int, device_type: str, grad_average_over: int = 1):
        t = recipe.train
        self.model = model
        # Each rank's loss is its share of the global token-mean, so gradients must be summed over ranks;
        # FSDP averages them over `grad_average_over` ranks, which this factor undoes exactly.
        self.loss_scale = float(grad_average_over)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, t.lr, t.weight_decay, t.betas, device_type)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(t.schedule, t.warmup_steps, total_steps, t.min_lr_ratio)
        )
        self.grad_clip = t.grad_clip

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.loss_scale if self.loss_scale != 1.0 else loss).backward()

    def step(self) -> float:
        norm = clip_grad_norm(self.params, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # Checkpointing: trainable weights + optimizer through torch.distributed.checkpoint, in DIR/dcp
    # (each rank writes its own shard). Loading goes through launcher.rank.safe_dcp: DCP's stock reader
    # unpickles `.metadata` and non-tensor entries without restriction.
    def save_state(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self.checkpoint_state(), checkpoint_id=str(directory / "dcp"))

    def load_state(self, directory: Path) -> None:
        from launcher.rank import safe_dcp

        state = self.checkpoint_state()
        safe_dcp.load(state, str(directory / "dcp"))  # no arbitrary unpickling (see safe_dcp)
        self.load_checkpoint_state(state)

    def checkpoint_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_sd, optim_sd = get_state_dict(
            self.model, self.optimizer, options=StateDictOptions(ignore_frozen_params=True)
        )
        return {"model": model_sd, "optim": optim_sd}

    def load_checkpoint_state(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=StateDictOptions(ignore_frozen_params=True, strict=False),
        )

    def scheduler_state(self) -> dict:
        return {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}

    def load_scheduler_state(self, state: dict) -> None:
        self.scheduler.load_state_dict({**state, "lr_lambdas": [None] * len(self.optimizer.param_groups)})
