"""NF4 mixture-of-experts weights (see launcher.rank.model.moe for the fused layout): `NF4Experts` replaces a
fused experts module, `fill_experts` quantizes this rank's blocks of each projection."""

from __future__ import annotations

import torch
from torch import nn

from launcher.errors import UserError
from launcher.plan.recipe import QuantConfig
from launcher.rank.model.moe import FUSED, experts_modules
from launcher.rank.model.quant import all_gather_blocks, make_quant_state, quantize_shard
from launcher.rank.model.shard import local_view, shard_group, shard_spans
from launcher.rank.model.skeleton import DTYPES


def replace_experts_with_nf4(causal_lm: nn.Module, q: QuantConfig) -> dict[str, nn.Module]:
    """Swap every fused experts module for an NF4Experts on meta; returns {name: module}."""
    out = {}
    for name, experts in experts_modules(causal_lm):
        parent_name, _, leaf = name.rpartition(".")
        layer = NF4Experts(experts, q)
        setattr(causal_lm.get_submodule(parent_name), leaf, layer)
        out[name] = layer
    return out


class NF4Experts(nn.Module):
    """Every expert of one MoE layer in 4-bit: per projection one storage parameter with all experts' packed
    bytes (expert after expert, in the storage dtype FSDP2 shards and all-gathers unchanged) and one QuantState
    per expert, set at load (fill_experts). forward is transformers' eager experts loop, with each routed
    expert's weight dequantized as it is reached; experts no token chose are never dequantized."""

    def __init__(self, experts: nn.Module, q: QuantConfig):
        super().__init__()
        storage = DTYPES[q.storage_dtype]
        self.act_fn = experts.act_fn
        self.compute_dtype = DTYPES[q.compute_dtype]
        self.shapes: dict[str, tuple[int, int, int]] = {}
        self.quant_states: dict[str, list] = {}
        for pname in FUSED:
            shape = tuple(getattr(experts, pname).shape)
            self.num_experts = shape[0]
            per_expert = shape[1] * shape[2]
            # A block never straddles two experts, so each expert's blocks are a quant state of their own.
            if per_expert % q.blocksize or (per_expert // 2) % storage.itemsize:
                raise UserError(
                    f"{pname}: an expert's {per_expert} weights are no whole number of {q.blocksize}-weight blocks "
                    f"in {q.storage_dtype} storage"
                )
            self.shapes[pname] = shape
            rows = shape[0] * per_expert // 2 // storage.itemsize
            self.register_parameter(
                pname, nn.Parameter(torch.empty(rows, 1, dtype=storage, device="meta"), requires_grad=False)
            )

    def expert_weight(self, pname: str, packed: torch.Tensor, e: int) -> torch.Tensor:
        """Expert E's [out, in] weight of projection PNAME in compute dtype, from the (gathered) packed bytes."""
        from bitsandbytes.functional import dequantize_4bit

        _, out_f, in_f = self.shapes[pname]
        n = out_f * in_f // 2
        own = packed.view(torch.uint8).reshape(-1)[e * n : (e + 1) * n]
        return dequantize_4bit(own, quant_state=self.quant_states[pname][e]).to(self.compute_dtype)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        x = hidden_states.to(self.compute_dtype)
        with torch.no_grad():
            mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            hit = mask.sum(dim=(-1, -2)).nonzero().flatten().tolist()
        gate_up, down = self.gate_up_proj, self.down_proj
        for e in hit:
            top_k_pos, token_idx = torch.where(mask[e])
            gate, up = nn.functional.linear(x[token_idx], self.expert_weight("gate_up_proj", gate_up, e)).chunk(2, -1)
            h = nn.functional.linear(self.act_fn(gate) * up, self.expert_weight("down_proj", down, e))
            h = h * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, h.to(out.dtype))
        return out


def fill_experts(module: NF4Experts, pname: str, hf_name: str, source, q: QuantConfig, device) -> None:
    """Quantize this rank's blocks of a fused projection (as fill_quantized does a linear's) and give every
    expert its QuantState from the gathered block scales."""
    p = module._parameters[pname]
    local, r0, r1 = local_view(p)
    rank, world, group = shard_group(p)
    n_experts, out_f, in_f = module.shapes[pname]
    n = n_experts * out_f * in_f
    spans = shard_spans(n, r0, r1, 2 * local.element_size(), q.blocksize, rank, world)
    e0, e1, _, _ = spans
    packed, absmax_own = quantize_shard(lambda a, b: source.read_flat(hf_name, a, b, device), n, spans, q, device)
    absmax = all_gather_blocks(absmax_own, n // q.blocksize, world, group, device)
    if e1 > e0:
        local.view(torch.uint8).reshape(-1)[: (e1 - e0) // 2].copy_(packed)
    blocks = out_f * in_f // q.blocksize
    module.quant_states[pname] = [
        make_quant_state(absmax[e * blocks : (e + 1) * blocks].contiguous(), (out_f, in_f), q) for e in range(n_experts)
    ]
