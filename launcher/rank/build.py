"""Building a rank's model: skeleton, quantized layers, this rank's shards filled, LoRA, the engine's wrapping
and the loss (`build_model`), and per-layer compilation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from launcher.plan.model_info import load_config, resolve_model_dir
from launcher.plan.recipe import Recipe
from launcher.rank.model.dora import install_dequantize, magnitudes_on_meta
from launcher.rank.model.experts import replace_experts_with_nf4
from launcher.rank.model.fill import materialize, open_source, quant_config
from launcher.rank.model.moe import ExpertsSource, checkpoint_name, expert_layout, source_shapes, tensor_name
from launcher.rank.model.quant import replace_with_4bit, replace_with_int8
from launcher.rank.model.shard import LoadStats
from launcher.rank.model.skeleton import (
    DTYPES,
    build_skeleton,
    checkpoint_shapes,
    constant_inits,
    decoder_layers,
    lora_targets,
)


@dataclass
class Built:
    peft_model: nn.Module  # peft's PeftModel (for export)
    loss_model: nn.Module  # CausalLMLoss: what the step loop calls (the FSDP root)
    causal_lm: nn.Module
    stats: LoadStats
    model_dir: Path
    compiled: bool = False  # the decoder layers' forwards are torch.compile'd (compile_layers)


def compile_layers(recipe: Recipe, device: torch.device) -> bool:
    """train.compile resolved: 'auto' compiles the 4-bit layers (the measured case) on GPUs, for every
    backend, unless log.memory_steps records the allocator (see the recipe key)."""
    c = recipe.train.compile
    auto = device.type == "cuda" and recipe.quant.bits == 4 and recipe.log.memory_steps is None
    return c is True or (c == "auto" and auto)


def enable_activation_checkpointing(causal_lm) -> None:
    """Non-reentrant activation checkpointing of every decoder layer. transformers 5.2x renamed
    gradient_checkpointing_enable (which now warns that it is deprecated); older releases have only that."""
    enable = getattr(causal_lm, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_model(
    recipe: Recipe,
    device: torch.device,
    mesh=None,
    progress: Callable[[str], None] | None = None,
    materializer: Callable[..., LoadStats] | None = None,
) -> Built:
    """Skeleton -> 4-bit/8-bit layers -> LoRA -> shard (if a mesh is given) -> fill this rank's shards.

    `materializer` replaces `materialize` (same arguments): DeepSpeed ZeRO-3 fills and partitions the
    model unit by unit (launcher.rank.parallel.deepspeed.zero3_materializer).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from launcher.rank.loss import CausalLMLoss

    model_dir = resolve_model_dir(recipe)
    config = load_config(recipe, model_dir)
    causal_lm = build_skeleton(recipe, config)
    layout = expert_layout(causal_lm)

    def checkpoint_names() -> dict[nn.Module, str]:
        # Checkpoint names of every module, recorded before peft moves linears under `.base_layer`.
        return {m: checkpoint_name(n, layout) for n, m in causal_lm.named_modules()}

    module_names = checkpoint_names()
    # Mixture-of-experts checkpoints store each expert apart: the source reads the fused tensors from those.
    shapes, fused = source_shapes(causal_lm, checkpoint_shapes(causal_lm))
    constants = constant_inits(causal_lm) if recipe.model.init == "random" else None
    if constants:
        constants = {tensor_name(k, layout): v for k, v in constants.items()}
    targets = lora_targets(recipe, causal_lm)
    source, prequant = open_source(recipe, model_dir, config, shapes, device, constants)
    if fused:
        source = ExpertsSource(source, fused)
    quant_layers: dict[str, nn.Module] = {}
    if recipe.quant.bits == 4:
        quant_layers = replace_with_4bit(causal_lm, quant_config(recipe, causal_lm, source, prequant))
        quant_layers.update(replace_experts_with_nf4(causal_lm, recipe.quant))
        module_names = checkpoint_names()
    elif recipe.quant.bits == 8:
        quant_layers = replace_with_int8(causal_lm, recipe.quant)
        module_names = checkpoint_names()
    peft_cfg = PeftLoraConfig(
        r=recipe.lora.rank,
        lora_alpha=recipe.lora.alpha,
        lora_dropout=recipe.lora.dropout,
        target_modules=targets,
        use_dora=recipe.lora.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=recipe.model.path,
    )
    if recipe.lora.use_dora:
        install_dequantize()
        with magnitudes_on_meta():  # filled at load (fill.lora_filler): the base weights are still meta
            peft_model = get_peft_model(causal_lm, peft_cfg)
    else:
        peft_model = get_peft_model(causal_lm, peft_cfg)
    quant_params = {id(p) for layer in quant_layers.values() for p in layer.parameters(recurse=False) if p.dim() == 2}
    compute = DTYPES[recipe.quant.compute_dtype]
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.float32)  # fp32 masters; FSDP casts them to compute dtype for matmuls
        elif mesh is None and id(p) not in quant_params and p.is_floating_point():
            # Unsharded runs have no mixed-precision policy: hold frozen dense weights in compute dtype.
            p.data = p.data.to(compute)
    if recipe.train.gradient_checkpointing:
        enable_activation_checkpointing(causal_lm)
    loss_model = CausalLMLoss(causal_lm)
    if mesh is not None:
        from launcher.rank.parallel.fsdp import apply_fsdp

        apply_fsdp(loss_model, causal_lm, recipe, mesh)
    compiled = compile_layers(recipe, device)
    if compiled:
        # The layer's forward only (with the activation checkpoint when it is inside forward): FSDP's
        # hooks run eagerly around it, and all layers share one graph (their parameters are graph inputs,
        # not constants). Graph breaks would split it into many small graphs whose per-call overhead
        # costs more than fusion saves (QLinear4bit exists partly to avoid one).
        for layer in decoder_layers(causal_lm):
            layer.forward = torch.compile(layer.forward)
    stats = (materializer or materialize)(
        loss_model, module_names, set(quant_layers.values()), source, recipe, device, prequant, progress
    )
    loss_model.train()
    return Built(peft_model, loss_model, causal_lm, stats, model_dir, compiled)
