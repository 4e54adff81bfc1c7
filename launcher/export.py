"""Adapter export in PEFT format (adapter_config.json + adapter_model.safetensors), rank 0 writes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file


def lora_state_dict(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) LoRA tensors under PEFT's saved key names. Collective: every rank must call it."""
    out = {}
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        full = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
        key = name.replace(".default.", ".").replace(".default", "")
        out[key] = full.detach().to("cpu", torch.float32).contiguous()
    return out


def save_adapter(peft_model: torch.nn.Module, out_dir: Path, rank: int) -> Path:
    """Write atomically: a temp dir renamed into place, so a crash never leaves half an adapter."""
    state = lora_state_dict(peft_model)
    if rank != 0:
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_model.peft_config["default"].save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
