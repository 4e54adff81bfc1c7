"""Adapter export in PEFT format (adapter_config.json + adapter_model.safetensors), rank 0 writes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from launcher.rank.model.dora import MAGNITUDE

ADAPTER_FILE = "adapter_model.safetensors"


def lora_state_dict(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) LoRA tensors under PEFT's saved key names. Collective: every rank must call it."""
    out = {}
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        full = _deepspeed_full(p)
        if full is None:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
        out[saved_key(name)] = full.detach().to("cpu", torch.float32).contiguous()
    return out


def saved_key(param_name: str) -> str:
    """PEFT's file key of a LoRA parameter: the adapter name dropped, and a DoRA magnitude without `.weight`
    (peft saves `...lora_magnitude_vector` and adds `.weight` back when loading)."""
    key = param_name.replace(".default.", ".").replace(".default", "")
    return key.removesuffix(".weight") if key.endswith(MAGNITUDE + ".weight") else key


def _deepspeed_full(p: torch.Tensor) -> torch.Tensor | None:
    """The whole fp32 master of a parameter DeepSpeed trains (a ZeRO-3 partition is gathered); collective.

    None for parameters DeepSpeed does not own. Its model copy may be bf16 and, under ZeRO-3, empty.
    """
    # Decided by attribute presence, which is the same on every rank (a ZeRO-2 rank whose partition lacks
    # the tensor has `_hp_mapping = None` but must still join the all-reduce that assembles it).
    if not (hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")):
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(p)


def save_adapter(peft_model: torch.nn.Module, out_dir: Path, rank: int) -> Path:
    """Write atomically: a temp dir renamed into place, so a crash never leaves half an adapter."""
    state = lora_state_dict(peft_model)
    # The step loop stops at the first non-finite loss or norm; this is the last line of defence (every rank
    # holds the whole state here, so all of them refuse together).
    bad = next((k for k, t in state.items() if not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        from launcher.errors import TrainingDiverged

        raise TrainingDiverged(f"the trained adapter holds NaN or infinite values ({bad}); it was not exported")
    if rank != 0:
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
    peft_model.peft_config["default"].save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
