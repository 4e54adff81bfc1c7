"""Adapter export in PEFT format (adapter_config.json + adapter_model.safetensors), with the tokenizer and a
model card (README.md) as PEFT and the Trainer leave them; rank 0 writes."""

from __future__ import annotations

import copy
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


def model_card(recipe, steps: int, final: dict[str, float]) -> str:
    """The adapter directory's README.md: Hugging Face's YAML header (base model, library, tags), then what
    was trained and how it ended (FINAL: the last step's and the last evaluation's figures, as logged)."""
    import json

    t, q, lo = recipe.train, recipe.quant, recipe.lora
    quant = "none" if q.bits == "none" else (f"4-bit {q.type}" if q.bits == 4 else "8-bit LLM.int8")
    objective = {"dpo": f"dpo ({t.dpo.loss}, beta {t.dpo.beta})", "orpo": f"orpo (lambda {t.orpo.odds_ratio_weight})"}
    targets = lo.target_modules if isinstance(lo.target_modules, str) else ", ".join(lo.target_modules)
    rows = [
        ("base model", str(recipe.model.path) + (" (random weights)" if recipe.model.init == "random" else "")),
        ("quantization", quant),
        ("adapter", f"{'DoRA' if lo.use_dora else 'LoRA'} r {lo.rank}, alpha {lo.alpha:g}, on {targets}"),
        ("objective", objective.get(t.objective, t.objective)),
        ("optimizer steps", str(steps)),
        *((k.replace("_", " "), f"{v:.6g}") for k, v in final.items()),
    ]
    tags = ["qlaunch", "lora", *(["qlora"] if q.bits != "none" else []), t.objective]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (
        f"---\nbase_model: {json.dumps(str(recipe.model.path))}\nlibrary_name: peft\ntags: {json.dumps(tags)}\n---\n\n"
        f"# {recipe.name}\n\nA {'DoRA' if lo.use_dora else 'LoRA'} adapter trained with qlaunch (recipe.toml in the run "
        f"directory).\n\n| | |\n|---|---|\n{table}\n\n```python\nfrom peft import PeftModel\n"
        f'model = PeftModel.from_pretrained(base_model, "path/to/this/directory")\n```\n'
    )


def save_adapter(
    peft_model: torch.nn.Module, out_dir: Path, rank: int, tokenizer=None, card: str | None = None
) -> Path:
    """Write atomically: a temp dir renamed into place, so a crash never leaves half an adapter. The config
    says inference_mode = true (as PEFT saves a trained adapter); TOKENIZER and CARD (README.md) go beside."""
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
    config = copy.copy(peft_model.peft_config["default"])  # the live config stays in training mode
    config.inference_mode = True
    config.save_pretrained(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if card is not None:
        (tmp / "README.md").write_text(card)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
