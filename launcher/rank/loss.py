"""The loss: decoder + lm_head + cross-entropy per token (summed for supervised training, the loop dividing by the
global batch's token count; summed per sequence for preference objectives), through the plain head, a chunked
fused head, or the vocabulary split across FSDP ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from launcher.data.pack import IGNORE  # the label packing gives tokens without a loss
from launcher.plan.memory import loss_chunk_tokens
from launcher.rank.model.logits import LogitTransform
from launcher.rank.model.moe import router_aux
from launcher.rank.model.skeleton import decoder, output_head


class CausalLMLoss(nn.Module):
    """Decoder + lm_head + cross-entropy, returning the *sum* of token losses and the token count.

    The logits are never materialised for the whole sequence: lm_head runs over the tokens in chunks, and
    a frozen plain lm_head (the usual case) gets the gradient w.r.t. its input computed in the same pass
    (LinearCrossEntropy), so nothing of the [tokens, vocab] logits is kept and nothing is recomputed in
    backward. An lm_head that is LoRA-wrapped or quantized is called as a module, chunk by chunk, each
    chunk recomputed in backward. Positions without a label are skipped by ignore_index rather than by
    boolean indexing, which would make the host wait for the GPU (a device sync) in every forward.
    This is also the FSDP root module, so the final norm is gathered by its hooks; a plain lm_head is an
    FSDP unit of its own (launcher/rank/parallel/fsdp.py) that is never gathered: each rank computes the logits
    of its vocabulary rows for every rank's tokens (ShardedLinearCrossEntropy).
    """

    def __init__(self, causal_lm: nn.Module, chunk_tokens: int | None = None):
        super().__init__()
        self.lm = causal_lm
        self.logits = LogitTransform.from_config(causal_lm.config)
        # The planner's rule (memory.loss_chunk_tokens): a chunk's fp32 logits stay the same size for any
        # vocabulary (Gemma's 262k gets half Llama-3's 2048 tokens), so the planned memory is what runs.
        head = output_head(causal_lm)
        vocab = getattr(head, "base_layer", head).out_features  # a 4-bit head's weight is packed bytes
        self.chunk_tokens = chunk_tokens or loss_chunk_tokens(vocab, self.logits.softcap is not None)
        # Decided before any wrapping: FSDP2 turns the head into a subclass of nn.Linear.
        self.fused_head = plain_head(output_head(causal_lm))
        # A mixture-of-experts model whose config adds the router's load-balancing loss (moe.RouterAux).
        self.router_aux = router_aux(causal_lm)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        per_token: bool = False,
        frozen: bool = False,
    ) -> tuple[torch.Tensor, ...] | torch.Tensor:
        """(sum of the token losses, number of labelled tokens), and a third value, the micro-batch's router
        load-balancing loss, where the model adds one (router_aux); with per_token, every token's loss
        (token_losses). One forward for both, so that FSDP's and DeepSpeed's hooks on it run either way.
        FROZEN: values only, the decoder's graph dropped at its output (a reference pass that runs with
        gradients enabled, objective.Preference.reference)."""
        losses, aux = self._losses(input_ids, labels, position_ids, frozen)
        if per_token:
            return losses
        out = (losses.sum(), (labels[:, 1:] != IGNORE).sum())
        return out if aux is None else (*out, aux)

    def token_losses(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        frozen: bool = False,
    ) -> torch.Tensor:
        """Cross-entropy of every position's next token, [rows * (T - 1)] in fp32, 0 where the label is IGNORE.

        Per token rather than summed so that objectives which are not a plain sum (DPO's log-ratio of sequence
        log-probabilities) can weight each token's gradient; the fused heads keep d/dh per token, so that costs
        nothing over a sum.
        """
        return self._losses(input_ids, labels, position_ids, frozen)[0]

    def _losses(self, input_ids, labels, position_ids, frozen) -> tuple[torch.Tensor, torch.Tensor | None]:
        extra = {"output_router_logits": True} if self.router_aux is not None else {}
        out = decoder(self.lm)(input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra)
        aux = self.router_aux(out.router_logits) if self.router_aux is not None else None
        hidden = out.last_hidden_state
        if frozen:
            hidden = hidden.detach()
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        y = labels[:, 1:].reshape(-1)
        head = output_head(self.lm)
        if self.fused_head:
            return fused_head_loss(h, head.weight, y, self.chunk_tokens, self.logits), aux
        parts = []
        for s in range(0, h.shape[0], self.chunk_tokens):
            hs, ys = h[s : s + self.chunk_tokens], y[s : s + self.chunk_tokens]
            if frozen:
                with torch.no_grad():
                    parts.append(_module_ce(head, hs, ys, self.logits))
            elif torch.is_grad_enabled():
                parts.append(checkpoint(_module_ce, head, hs, ys, self.logits, use_reentrant=False))
            else:
                parts.append(_module_ce(head, hs, ys, self.logits))
        return (torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)), aux


def plain_head(head: nn.Module) -> bool:
    """A frozen bias-free nn.Linear (not LoRA-wrapped, not quantized): the loss fuses it (LinearCrossEntropy)."""
    return type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad


def _module_ce(head: nn.Module, h: torch.Tensor, y: torch.Tensor, transform: LogitTransform) -> torch.Tensor:
    return F.cross_entropy(transform(head(h).float()), y, ignore_index=IGNORE, reduction="none")


class LinearCrossEntropy(torch.autograd.Function):
    """CE(h_t @ w.T, y_t) for every token t, over chunks of tokens, for a frozen w, with d/dh computed in forward.

    Per chunk: logits in the compute dtype, softmax statistics in fp32, then the chunk's input gradient
    (softmax - onehot) @ w while the logits are at hand. Backward only scales each token's stored gradient by
    the upstream gradient of its loss (it has the input's size, as a recompute would have had to keep the
    input). Labels equal to IGNORE give a loss of 0 and no gradient.
    """

    @staticmethod
    def forward(
        ctx, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk: int, transform: LogitTransform
    ) -> torch.Tensor:
        w = w.to(h.dtype)
        grad_h = torch.empty_like(h) if h.requires_grad else None
        acc = torch.promote_types(h.dtype, torch.float32)  # softmax statistics in fp32 at least
        losses = h.new_empty(h.shape[0], dtype=acc)
        for s in range(0, h.shape[0], chunk):
            hs, ys = h[s : s + chunk], y[s : s + chunk]
            logits = F.linear(hs, w).to(acc)
            slope = transform.apply_(logits)
            valid = ys != IGNORE
            target = ys.clamp(min=0).unsqueeze(1)
            target_logit = logits.gather(1, target).squeeze(1)
            m, z = shifted_exp_(logits)  # logits now hold exp(logit - m)
            lse = m + z.log()
            losses[s : s + chunk] = (lse - target_logit) * valid
            if grad_h is not None:
                probs = logits.div_(z.unsqueeze(1))  # softmax, in place
                probs.scatter_add_(1, target, torch.full_like(target, -1.0, dtype=probs.dtype))
                probs.mul_(valid.unsqueeze(1))
                if slope is not None:
                    probs.mul_(slope)  # through the logit transform
                grad_h[s : s + chunk] = probs.to(h.dtype) @ w
        ctx.save_for_backward(grad_h)
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        return scaled_input_grad(ctx, grad_losses), None, None, None, None


def scaled_input_grad(ctx, grad_losses: torch.Tensor) -> torch.Tensor:
    """The per-token input gradients a fused loss stored in forward, each times the upstream gradient of its
    token's loss."""
    (grad_h,) = ctx.saved_tensors
    # Scaled in fp32: the factor (world / global token count) is not exact in bf16.
    return (grad_h.to(grad_losses.dtype) * grad_losses.unsqueeze(1)).to(grad_h.dtype)


_MM_OUT_DTYPE = [True]  # cleared if this torch/GPU has no bf16 x bf16 -> fp32 matmul


def mm_acc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for compute-dtype inputs, returned in fp32 *before* rounding to the compute dtype.

    The vocabulary-split loss sums each rank's partial input gradient over the ranks. Rounding every
    partial to bf16 first would round twice, differently for every world size (a bf16 run on 4 ranks and
    on 2 would drift apart by ~1e-3 in the gradient norm); summed in fp32 and rounded once at the end, they
    give what one device's single matmul gives, up to fp32 summation order. On CPU the products of the
    upcast bf16 values are exact and the upcast matmul costs what the bf16 one does; on GPUs cuBLAS
    writes the fp32 accumulator directly (torch.mm's out_dtype), else the rounded product is used.
    """
    if a.dtype == torch.float32 or a.dtype == torch.float64:
        return a @ b
    if a.is_cuda:
        if _MM_OUT_DTYPE[0]:
            try:
                return torch.mm(a, b, out_dtype=torch.float32)
            except (RuntimeError, TypeError) as err:
                if isinstance(err, torch.OutOfMemoryError):
                    raise
                _MM_OUT_DTYPE[0] = False
        return (a @ b).float()
    return a.float() @ b.float()


def shifted_exp_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row maxima m and sums z of exp(logits - m), leaving exp(logits - m) in `logits` (in place).

    torch.logsumexp would hold a temporary as large as the chunk's logits: on 70B, 4 GPUs, 0.98 GiB live at
    the step's memory peak (log.memory_steps; bench/RESULTS.md). The softmax is then the same buffer
    scaled per row, also in place.
    """
    m = logits.amax(dim=1)
    logits.sub_(m.unsqueeze(1)).exp_()
    return m, logits.sum(dim=1)


def fused_head_loss(
    h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk: int, transform: LogitTransform = LogitTransform()
) -> torch.Tensor:
    """Per-token cross-entropy of transform(h @ w.T) for this rank's tokens; w whole, or an FSDP2 shard (a DTensor)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(w, DTensor):
        return LinearCrossEntropy.apply(h, w, y, chunk, transform)
    from launcher.rank.model.shard import local_view, shard_group

    local, v0, _ = local_view(w)
    # With parallel.fsdp.cpu_offload the shard lives in host memory; the loss reads it on the GPU.
    local = local.to(h.device, non_blocking=True)
    rank, world, group = shard_group(w)
    if world == 1:
        return LinearCrossEntropy.apply(h, local, y, chunk, transform)
    return ShardedLinearCrossEntropy.apply(h, local, y, chunk, v0, rank, world, group, transform)


class ShardedLinearCrossEntropy(torch.autograd.Function):
    """LinearCrossEntropy over a vocabulary-sharded frozen w (rows v0.. of the head on this rank).

    Gathering the head for the loss would hold the whole [vocab, hidden] matrix plus FSDP's all-gather
    buffer on every rank (70B: 2.1 GB each), at the point of the step where the activations are largest.
    Instead the ranks all-gather their tokens' hidden states (tokens x hidden, ~1/60 of the head for 70B
    at 2k tokens per rank) and each computes the logits of its own vocabulary rows for every rank's tokens;
    the log-sum-exp is combined across ranks per token, each token's target logit comes from the rank
    holding that row, and the input gradients, summed over ranks in fp32, are scattered back to the ranks
    owning the tokens. The same multiply-adds as one device, split by vocabulary instead of by token.
    Every rank of the group must call it with the same number of tokens (the step loop and evaluation
    give every rank equal micro-batches of seq_len rows).
    """

    @staticmethod
    def forward(ctx, h, w, y, chunk: int, v0: int, rank: int, world: int, group, transform) -> torch.Tensor:
        import torch.distributed as dist

        # torch 2.13 renamed the flat collectives (the old names warn on every call); 2.11 has only those.
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        w = w.to(h.dtype)
        t, vr = h.shape[0], w.shape[0]
        h_all = h.new_empty((world * t, h.shape[1]))
        all_gather(h_all, h.contiguous(), group=group)
        y_all = y.new_empty(world * t)
        all_gather(y_all, y.contiguous(), group=group)
        acc = torch.promote_types(h.dtype, torch.float32)
        lse_all = torch.empty(world * t, dtype=acc, device=h.device)
        target_all = torch.zeros(world * t, dtype=acc, device=h.device)  # this shard's target logits, else 0
        grad_all = torch.empty((world * t, h.shape[1]), dtype=acc, device=h.device) if h.requires_grad else None
        step = chunk * world  # logits [step, vocab / world]: the memory of one whole-vocabulary chunk
        for s in range(0, world * t, step):
            hs, ys = h_all[s : s + step], y_all[s : s + step]
            logits = F.linear(hs, w).to(acc)
            slope = transform.apply_(logits)  # elementwise: the same on every vocabulary shard
            local_y = ys - v0
            valid = ys != IGNORE
            mine = valid & (local_y >= 0) & (local_y < vr)
            idx = local_y.clamp(0, max(vr - 1, 0)).unsqueeze(1)
            target_all[s : s + step] = logits.gather(1, idx).squeeze(1) * mine
            m, z = shifted_exp_(logits)  # logits now hold exp(logit - m) over this rank's rows
            stats = h.new_empty((world, 2, hs.shape[0]), dtype=acc)
            all_gather(stats.view(-1), torch.stack([m, z]).view(-1), group=group)
            top = stats[:, 0].amax(dim=0)
            lse = top + (stats[:, 1] * (stats[:, 0] - top).exp()).sum(dim=0).log()
            lse_all[s : s + step] = lse
            if grad_all is not None:
                probs = logits.mul_((m - lse).exp().unsqueeze(1))  # softmax over the whole vocabulary, in place
                probs.scatter_add_(1, idx, -mine.unsqueeze(1).to(probs.dtype))
                probs.mul_(valid.unsqueeze(1))
                if slope is not None:
                    probs.mul_(slope)
                grad_all[s : s + step] = mm_acc(probs.to(h.dtype), w)
        # Each rank's own tokens: its slice of the gathered order. Target logits and gradients are sums over
        # the vocabulary shards (only one shard has a token's target; every shard adds to its gradient).
        target = target_all.new_empty(t)
        reduce_scatter(target, target_all, group=group)
        own = slice(rank * t, (rank + 1) * t)  # rank within the shard group: the all-gather's order
        losses = (lse_all[own] - target) * (y != IGNORE)
        grad_h = None
        if grad_all is not None:
            grad_h = grad_all.new_empty((t, h.shape[1]))
            reduce_scatter(grad_h, grad_all, group=group)
            grad_h = grad_h.to(h.dtype)
        ctx.save_for_backward(grad_h)
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        return scaled_input_grad(ctx, grad_losses), None, None, None, None, None, None, None, None
