"""Tiny checkpoints of every model family qlaunch trains, built by transformers itself (no new assets).

Each is 2 layers, hidden 64, the tiny Llama's 512-token tokenizer, random weights from the family's own
init, saved with `save_pretrained` (bf16 safetensors, config.json) beside a copy of the tokenizer files. The
overrides switch on what makes a family differ: ties, fused projections, (1 + w) norms, soft-capping,
sliding windows, multipliers."""

from __future__ import annotations

import shutil
from pathlib import Path

# The shipped tiny model's tokenizer (not imported from conftest: the GPU hosts run this without pytest).
TINY_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tiny-llama"

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=512,
    max_position_embeddings=512,
    pad_token_id=2,
    bos_token_id=0,
    eos_token_id=1,
    initializer_range=0.1,
)

# family -> (model_type, config overrides, [model] recipe keys the family needs)
FAMILIES: dict[str, tuple[str, dict, dict[str, str]]] = {
    "llama32_tied": ("llama", dict(tie_word_embeddings=True), {}),
    "mistral_nemo": ("mistral", dict(head_dim=32, sliding_window=16, tie_word_embeddings=False), {}),
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True, use_sliding_window=False), {}),
    "qwen3_tied": ("qwen3", dict(tie_word_embeddings=True), {}),
    "gemma2": (
        "gemma2",
        dict(final_logit_softcapping=5.0, attn_logit_softcapping=10.0, sliding_window=16, query_pre_attn_scalar=16),
        {"attn_implementation": "eager"},
    ),
    "gemma3_text": (
        "gemma3_text",
        dict(final_logit_softcapping=5.0, sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
        {},
    ),
    "phi3": ("phi3", dict(tie_word_embeddings=False), {}),
    "olmo2": ("olmo2", dict(tie_word_embeddings=False), {}),
    "granite": (
        "granite",
        dict(logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2),
        {},
    ),
}


# Mixture-of-experts families: 4 experts, top-2, every layer sparse (tests/test_moe.py). transformers saves
# each expert's matrices apart (Qwen3-MoE: experts.E.gate_proj/up_proj/down_proj; Mixtral:
# block_sparse_moe.experts.E.w1/w3/w2), as the published checkpoints are. The `_aux` variants switch on
# output_router_logits (both families default to false), with which transformers adds the router's
# load-balancing loss to the loss; a large coefficient (theirs: 0.001) so that leaving it out shows.
QWEN3_MOE = dict(
    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1, norm_topk_prob=True
)
MIXTRAL = dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
AUX = dict(output_router_logits=True, router_aux_loss_coef=0.5)
MOE_FAMILIES: dict[str, tuple[str, dict, dict[str, str]]] = {
    "qwen3_moe": ("qwen3_moe", QWEN3_MOE, {}),
    "mixtral": ("mixtral", MIXTRAL, {}),
    "qwen3_moe_aux": ("qwen3_moe", {**QWEN3_MOE, **AUX}, {}),
    "mixtral_aux": ("mixtral", {**MIXTRAL, **AUX}, {}),
}

ALL_FAMILIES = {**FAMILIES, **MOE_FAMILIES}


def make_checkpoint(family: str, out: Path, **extra) -> Path:
    """Write FAMILY's tiny checkpoint into OUT (a directory) and return it; EXTRA overrides config keys."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, overrides, _ = ALL_FAMILIES[family]
    config = AutoConfig.for_model(model_type, **{**COMMON, **overrides, **extra})
    torch.manual_seed(sum(map(ord, family.removesuffix("_aux"))))  # an `_aux` variant: its base family's weights
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms and biases away from their init, so a wrong constant or offset shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.to(torch.bfloat16).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_MODEL / f, out / f)
    return out


def model_keys(family: str) -> dict[str, str]:
    """The [model] recipe keys FAMILY needs (Gemma 2's soft-capped attention: eager)."""
    return ALL_FAMILIES[family][2]


# bitsandbytes 4-bit variants of the hub's `*-bnb-4bit` format: (quant type, double quant, storage dtype).
BNB_VARIANTS = {
    "nf4-dq-u8": ("nf4", True, "uint8"),
    "fp4-sq-u8": ("fp4", False, "uint8"),
    "nf4-dq-bf16": ("nf4", True, "bfloat16"),
}


def make_bnb_checkpoint(dense: Path, variant: str, out: Path, skip: list[str] | None = None) -> Path:
    """Write DENSE quantized by transformers + bitsandbytes on CPU (as the hub's bnb-4bit repositories are
    made: from_pretrained with a BitsAndBytesConfig, then save_pretrained) into OUT, with the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant_type, double_quant, storage = BNB_VARIANTS[variant]
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=getattr(torch, storage),
        llm_int8_skip_modules=skip,
    )
    model = AutoModelForCausalLM.from_pretrained(dense, quantization_config=config, device_map="cpu")
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(dense / f, out / f)
    return out
