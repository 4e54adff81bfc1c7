"""Backends behind one small interface, so the step loop never branches on the backend.

An Engine owns the wrapped model, the optimizer and the lr schedule:
  engine.model(input_ids, labels, position_ids) -> (loss_sum, n_tokens)
  engine.backward(loss)     # loss already normalised by the global token count (see session.py)
  engine.step() -> float    # clip, optimizer step, schedule step, zero grads; returns the grad norm
  engine.lr() -> float
and checkpoints (launcher/rank/checkpoint.py seals the directory; the engine writes and reads its files):
  engine.save_state(dir) / engine.load_state(dir)   # collective; weights + optimizer, each rank its part
  engine.scheduler_state() -> dict / engine.load_scheduler_state(dict)   # JSON, kept in meta.json
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from launcher.rank.parallel.torch_engine import TorchEngine

if TYPE_CHECKING:
    from launcher.plan.plan import Plan


def make_engine(built, recipe, plan: Plan, total_steps: int, device: torch.device, run_dir=None):
    if plan.backend == "deepspeed":
        from launcher.rank.parallel.deepspeed import DeepSpeedEngine

        # DeepSpeed reads the run directory's deepspeed_config.json (the file `qlaunch run` wrote).
        return DeepSpeedEngine(built, recipe, plan, total_steps, device, run_dir)
    import torch.distributed as dist

    world = dist.get_world_size() if plan.backend == "fsdp" and dist.is_initialized() else 1
    return TorchEngine(built.loss_model, recipe, total_steps, device.type, grad_average_over=world)
