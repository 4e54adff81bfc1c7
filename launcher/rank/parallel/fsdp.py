"""FSDP2 (`fully_shard`) wrapping of the LoRA model: per decoder layer, the embedding, lm_head, then the root."""

from __future__ import annotations

import torch
from torch import nn

from launcher.plan.recipe import Recipe
from launcher.rank.model.skeleton import decoder_layers, input_embedding, is_tied, output_head

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def apply_fsdp(loss_model: nn.Module, causal_lm: nn.Module, recipe: Recipe, mesh) -> None:
    """Shard in place. Must run while parameters are still on meta (before materialisation)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    opts = recipe.parallel.fsdp
    compute = DTYPES[recipe.quant.compute_dtype]
    # param_dtype is what FSDP all-gathers; the packed 4-bit bytes are stored in this very dtype
    # (quant.storage_dtype == quant.compute_dtype is validated in the recipe), so the cast is a no-op
    # for them and their bits survive. LoRA masters stay fp32; gradients are reduced in fp32.
    mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if opts.cpu_offload else OffloadPolicy()
    common = dict(mesh=mesh, mp_policy=mp, offload_policy=offload)
    layers = list(decoder_layers(causal_lm))
    for i, layer in enumerate(layers):
        # The last layer's parameters are needed again at the start of backward: keep them gathered.
        reshard = opts.reshard_after_forward is not False and i < len(layers) - 1  # 'auto' is resolved by the plan
        fully_shard(layer, reshard_after_forward=reshard, **common)
    emb = input_embedding(causal_lm)
    head = output_head(causal_lm)
    tied = is_tied(causal_lm)
    ignored: set[nn.Parameter] = set()
    # A tied weight must be managed by exactly one FSDP group (torch 2.13 refuses a parameter shared by two;
    # 2.11 silently keeps two copies, i.e. unties). A LoRA-wrapped tied head is called as a module, so the
    # weight stays in the root below, gathered whole with the final norm.
    if not tied or loss_model.fused_head:
        fully_shard(emb, reshard_after_forward=True, **common)
        if tied:
            # The frozen tied head reads the embedding's own shard (one parameter, sharded once): the loss
            # splits the vocabulary over the ranks as for an untied head, and the root leaves it alone.
            head.weight = emb.weight
            ignored.add(emb.weight)
        elif loss_model.fused_head:
            # A plain frozen lm_head is a unit of its own that is never gathered: the loss reads each rank's
            # vocabulary rows (train.ShardedLinearCrossEntropy). In the root it would be gathered whole with
            # the final norm and kept through backward (70B: 2.1 GB per rank). A LoRA-wrapped or quantized head
            # is called as a module, chunk by chunk and recomputed in backward, so it stays in the root and
            # is gathered once.
            fully_shard(head, reshard_after_forward=True, **common)
    # Root: final norm (+ a LoRA-wrapped tied head's embedding, or a LoRA/quantized lm_head), used first thing
    # in backward, so not resharded.
    fully_shard(loss_model, reshard_after_forward=False, ignored_params=ignored or None, **common)
