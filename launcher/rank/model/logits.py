"""What a family does to the head's output before the softmax (LogitTransform), and the probe that checks,
on a shrunken copy of the architecture, that qlaunch's loss path computes the model's own logits."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogitTransform:
    """What a family does to the head's output before the softmax: Granite divides the logits by
    `logits_scaling`; Gemma 2/3 soft-cap them, c * tanh(z / c) with c = `final_logit_softcapping`.

    Applied in fp32 to each chunk of logits in every loss path. Preflight checks, on a shrunken copy of the
    architecture, that decoder -> head -> this transform gives the model's own logits
    (launcher/launch/preflight.py), so a family with other head-side code is refused rather than trained
    on a different function."""

    divide_by: float = 1.0
    softcap: float | None = None

    @classmethod
    def from_config(cls, config) -> LogitTransform:
        scaling = getattr(config, "logits_scaling", None)
        cap = getattr(config, "final_logit_softcapping", None)
        return cls(float(scaling) if scaling else 1.0, float(cap) if cap else None)

    @property
    def identity(self) -> bool:
        return self.divide_by == 1.0 and self.softcap is None

    def apply_(self, z: torch.Tensor) -> torch.Tensor | None:
        """Transform the fp32 logits Z in place; returns d(out)/dz (None when it is 1), for the fused grads."""
        if self.divide_by != 1.0:
            z.div_(self.divide_by)
        if self.softcap is None:
            return None if self.divide_by == 1.0 else torch.full((), 1.0 / self.divide_by, device=z.device)
        z.div_(self.softcap).tanh_()
        slope = (1.0 - z * z).div_(self.divide_by)  # d/dz c*tanh(z/(c*s)) = (1 - tanh^2) / s
        z.mul_(self.softcap)
        return slope

    @property
    def described(self) -> str:
        steps = ([f"divided by {self.divide_by:g}"] if self.divide_by != 1.0 else []) + (
            [f"soft-capped at {self.softcap:g}"] if self.softcap is not None else []
        )
        return " and ".join(steps) or "unchanged"

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """Out of place (autograd through it): the module path."""
        if self.divide_by != 1.0:
            z = z / self.divide_by
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


# Sizes of the shrunken copy the probe builds: small enough to build and run in well under a second.
_PROBE_SIZES = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "vocab_size": 96,
    "num_hidden_layers": 2,
}


def probe_config(config):
    """CONFIG shrunk to a tiny model of the same class and the same head-side settings."""
    small = copy.deepcopy(config)
    for key, value in _PROBE_SIZES.items():
        if hasattr(small, key) and getattr(small, key) is not None:
            setattr(small, key, value)
    layer_types = getattr(small, "layer_types", None)
    if isinstance(layer_types, list) and layer_types:
        # Keep one layer of each kind (sliding and full attention) if the model has both.
        kinds = list(dict.fromkeys(layer_types))[:2]
        small.layer_types = kinds + kinds[:1] * (2 - len(kinds))
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(small, key, None) is not None:
            setattr(small, key, 0)
    return small


def logit_probe_problem(config, attn_implementation: str) -> str | None:
    """None if decoder -> head -> LogitTransform gives the model's own logits on a shrunken copy of the
    architecture (random weights, fp32, CPU); otherwise why not. A family whose head does something else
    (a learned logit scale, a bias, a second head) would otherwise train on a function it does not compute.
    If the architecture cannot be shrunk this way the probe cannot speak, and says nothing."""
    from transformers import AutoModelForCausalLM

    from launcher.rank.model.skeleton import decoder, output_head

    small = probe_config(config)
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(small, dtype=torch.float32, attn_implementation=attn_implementation)
    except Exception:  # noqa: BLE001 - a config that only builds at its real sizes: nothing to compare
        return None
    model.eval()
    with torch.no_grad():
        for p in model.parameters():  # well away from the init's near-zero logits, so a transform shows
            p.add_(torch.randn_like(p) * 0.5)
        ids = torch.randint(0, small.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
        theirs = model(input_ids=ids, use_cache=False).logits.float()
        hidden = decoder(model)(input_ids=ids, use_cache=False).last_hidden_state
        ours = LogitTransform.from_config(small)(output_head(model)(hidden).float())
    gap = (theirs - ours).abs().max().item()
    if gap <= 1e-4 * max(1.0, theirs.abs().max().item()):
        return None
    return (
        f"{type(model).__name__} computes its logits in a way qlaunch's loss does not reproduce (the decoder's "
        f"hidden states times the head, then {LogitTransform.from_config(small).described}, differ by {gap:.3g})"
    )
