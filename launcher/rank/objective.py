"""What the step loop minimises: next-token cross-entropy (sft), or a preference loss over chosen/rejected pairs
(dpo, orpo) with the reference policy being the same model with its adapter switched off.

Each objective turns one micro-batch into (the micro-batch's share of the global loss, to back-propagate;
a vector of sums to all-reduce), so that every split over ranks and micro-steps computes what one device
computes on the whole global batch: shares are sums over the micro-batch divided by global counts
(label tokens, pairs, chosen tokens) that every rank knows from the sampler without a collective.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from launcher.data.pack import IGNORE, pair_segments
from launcher.data.sampler import StepCounts
from launcher.rank.sinks import ORPO_FIELDS, PAIR_FIELDS


class SFT:
    """Summed token cross-entropy over the global batch's labelled tokens; for a mixture-of-experts model whose
    config adds it (moe.RouterAux), plus the router's load-balancing loss times the model's coefficient.

    The load-balancing loss is a product of two means over a batch's tokens (the share of routings to each
    expert, its mean router probability), so it is no sum a global batch can be split into: it is computed per
    micro-batch, as transformers' forward computes it for the batch it is given (and its Trainer under
    gradient accumulation), and averaged over the step's MICRO_BATCHES micro-batches of all ranks. Any world
    size and accumulation that keep the micro-batch rows give the same loss."""

    preference = False

    def __init__(self, aux_coef: float | None = None, micro_batches: int = 1):
        self.aux_coef = aux_coef
        self.micro_batches = micro_batches
        self.names = ("loss",) if aux_coef is None else ("loss", "aux_loss")

    def micro(
        self, model, batch: dict, counts: StepCounts, row_weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # row_weight is not needed: evaluation's filler rows have no label, so they add nothing.
        s, _, *aux = model(batch["input_ids"], batch["labels"], batch["position_ids"])
        share = s / float(max(counts.tokens, 1))
        if self.aux_coef is None:
            return share, s.detach().float().reshape(1)
        (aux,) = aux
        share = share + self.aux_coef * aux / self.micro_batches
        # The micro-batch is counted with its load-balancing loss: evaluation's number of micro-batches is
        # what the sums are averaged over (its padding passes contribute zeros, count included).
        return share, torch.stack([s.detach().float(), aux.detach().float(), torch.ones_like(aux.float())])

    def report(self, sums: list[float], counts: StepCounts) -> dict[str, float]:
        ce = sums[0] / max(counts.tokens, 1)
        if self.aux_coef is None:
            return {"loss": ce}
        aux = sums[1] / max(sums[2], 1.0)
        return {"loss": ce + self.aux_coef * aux, "aux_loss": aux}


@contextmanager
def adapters_off(model: nn.Module):
    """The base model: every PEFT adapter layer of `model` bypassed for the duration.

    PEFT's own disable_adapter() also switches requires_grad off and on again on every adapter parameter;
    under FSDP2 and ZeRO those are the sharded parameters the optimizer and the gradient hooks hold, so only
    the layers' bypass flag is flipped here (the flag each LoRA/DoRA forward reads).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, b in zip(layers, before, strict=True):
            m._disable_adapters = b


def lora_layers(model: nn.Module) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def scales_as_tensors(model: nn.Module) -> None:
    """Every LoRA layer's scale (alpha / r, a Python float) as a 0-dim fp32 tensor on the layer's device.

    A compiled graph specialises on a float: scale 0 for the reference and alpha / r for the policy would be
    two graphs (and a third, once dynamo makes the float dynamic), each compiled in the first step; a tensor
    is a graph input, so both passes run one graph. x * s rounds as x * float(s) does (both in fp32 math)."""
    for m in lora_layers(model):
        for k, v in m.scaling.items():
            m.scaling[k] = torch.tensor(float(v), dtype=torch.float32, device=m.lora_A[k].weight.device)


@contextmanager
def adapters_scaled_to_zero(model: nn.Module):
    """The base model computed through the adapter layers' own graph: every LoRA layer's scale set to 0.

    Each layer then returns base + 0 * lora = base exactly, through the same operations (and the same
    compiled graph) as the policy's forward; adapters_off would switch to another graph, whose kernels round
    differently. Not for DoRA, whose output at scale 0 is not the base's. The scales are the tensors of
    scales_as_tensors, zeroed in place, outside any forward whose backward is pending.
    """
    layers = lora_layers(model)
    before = [{k: float(v) for k, v in m.scaling.items()} for m in layers]
    for m in layers:
        for v in m.scaling.values():
            v.zero_()
    try:
        yield
    finally:
        for m, b in zip(layers, before, strict=True):
            for k, v in b.items():
                m.scaling[k].fill_(v)


@dataclass(frozen=True)
class PairLayout:
    """Where the pairs of a micro-batch of preference rows are, worked out once per micro-batch (the policy's
    and the reference's forward share it) from the highest segment number, which the host knows."""

    seg: torch.Tensor  # [rows, T] segment numbers (pack.pair_segments)
    index: torch.Tensor  # [rows * (T - 1)]: the (row, segment) slot of the token each position predicts
    slots: int  # slots per row: segment 0 (never used) and 1..2P
    present: torch.Tensor  # [rows, P] 1.0 where the row holds pair k (it has segment 2k+2), else 0.0

    @staticmethod
    def of(position_ids: torch.Tensor, row_weight: torch.Tensor | None = None, top: int | None = None) -> PairLayout:
        """TOP: the highest segment number, read on the host by the batch builder (pack.with_pair_top);
        without it, read from position_ids here (a wait for the device if they are on a GPU)."""
        rows = position_ids.shape[0]
        seg = pair_segments(position_ids)
        if top is None:
            top = int(seg.max()) if seg.numel() else 0
        slots = top + top % 2 + 1  # a whole number of pairs
        index = (seg[:, 1:] + torch.arange(rows, device=seg.device).unsqueeze(1) * slots).reshape(-1)
        held = seg.max(dim=1).values // 2
        present = torch.arange((slots - 1) // 2, device=seg.device).unsqueeze(0) < held.unsqueeze(1)
        if row_weight is not None:  # evaluation's filler rows hold no pair that counts
            present = present & row_weight.bool().unsqueeze(1)
        return PairLayout(seg, index, slots, present.float())

    def sequence_sums(self, token_nll: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probabilities and labelled token counts of every pair's chosen and rejected sequences,
        [rows, pairs, 2] each (index 0 chosen, 1 rejected), from the per-token cross-entropy [rows * (T - 1)]
        of the next token. Rows with fewer pairs than the fullest row get 0 for the rest."""
        rows = labels.shape[0]
        labelled = (labels[:, 1:] != IGNORE).reshape(-1)
        nll = token_nll * labelled
        sums = nll.new_zeros(rows * self.slots).index_add(0, self.index, nll)
        lens = nll.new_zeros(rows * self.slots).index_add(0, self.index, labelled.to(nll.dtype))
        shape = (rows, (self.slots - 1) // 2, 2)
        return -sums.view(rows, self.slots)[:, 1:].reshape(shape), lens.view(rows, self.slots)[:, 1:].reshape(shape)


class Preference:
    """DPO or ORPO over the pairs of packed preference rows (launcher/data: a pair is prompt + chosen, then
    prompt + rejected, position ids restarting at each; prompt tokens unlabelled).

    Sums reported per step, all-reduced: [loss share, rewards chosen, rewards rejected, margins, accuracy,
    logps chosen, logps rejected, (orpo: chosen NLL, log-odds ratio)]; means are taken over the global pair
    count. A completion's log-probability is summed over its tokens under DPO and a token mean under ORPO,
    as TRL's DPOTrainer and ORPOTrainer report them.
    """

    preference = True

    def __init__(self, recipe, peft_model: nn.Module, same_graph_reference: bool = False):
        t = recipe.train
        # Compiled layers (make_objective): the reference runs the policy's training graph with the adapters
        # scaled to 0, so that both compute one function and the first step's loss is ln 2 on GPUs too. A
        # no-grad forward with the adapters bypassed is another compiled graph: 8B, H200, bf16, its
        # log-probabilities differed from the policy's by ~0.5 nats a sequence (DPO loss 0.67-0.73 at step 1).
        self.same_graph_reference = same_graph_reference
        if same_graph_reference:
            scales_as_tensors(peft_model)  # one graph for both passes (see scales_as_tensors)
        self.kind = t.objective
        self.beta, self.loss_type, self.smoothing = t.dpo.beta, t.dpo.loss, t.dpo.label_smoothing
        self.orpo_weight = t.orpo.odds_ratio_weight
        self.peft_model = peft_model
        self.names = ("loss", *PAIR_FIELDS, *(ORPO_FIELDS if self.kind == "orpo" else ()))

    def micro(
        self, model, batch: dict, counts: StepCounts, row_weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
        layout = PairLayout.of(pos, row_weight, batch.get("pair_top"))
        present = layout.present
        if self.kind == "dpo":
            with self.reference():
                ref, _ = layout.sequence_sums(model(ids, labels, pos, per_token=True, frozen=True), labels)
            logp, lens = layout.sequence_sums(model(ids, labels, pos, per_token=True), labels)
            ratio = logp - ref  # [rows, pairs, 2]
            if self.loss_type == "ipo":
                avg = ratio / lens.clamp(min=1.0)
                per_pair = (avg[..., 0] - avg[..., 1] - 1 / (2 * self.beta)) ** 2
            else:
                m, e = self.beta * (ratio[..., 0] - ratio[..., 1]), self.smoothing
                if self.loss_type == "robust":  # unbiased under a flip rate e (Chowdhury et al. 2024)
                    per_pair = (-(1 - e) * F.logsigmoid(m) + e * F.logsigmoid(-m)) / (1 - 2 * e)
                else:  # conservative DPO; e = 0 is the DPO paper's loss
                    per_pair = -(1 - e) * F.logsigmoid(m) - e * F.logsigmoid(-m)
            rewards = self.beta * ratio.detach()
            share = (per_pair * present).sum() / float(max(counts.pairs, 1))
            extra = []
        else:
            # TRL's ORPOTrainer takes the NLL over the whole chosen sequence, prompt included: label every
            # chosen token after the sequence's first for it; the odds ratio uses the completions only.
            seg = layout.seg
            nll_labels = torch.where((seg % 2 == 1) & (pos != 0), ids, labels)
            tok = model(ids, nll_labels, pos, per_token=True)
            logp, lens = layout.sequence_sums(tok, labels)
            chosen_nll = tok.reshape(ids.shape[0], -1) * (seg[:, 1:] % 2 == 1) * (nll_labels[:, 1:] != IGNORE)
            if row_weight is not None:
                chosen_nll = chosen_nll * row_weight.unsqueeze(1)
            mean = logp / lens.clamp(min=1.0)  # [rows, pairs, 2]: token-mean log-probabilities
            log_odds = (mean[..., 0] - mean[..., 1]) - (log1mexp(mean[..., 0]) - log1mexp(mean[..., 1]))
            ratio = F.logsigmoid(log_odds)
            nll_sum = chosen_nll.sum()
            share = nll_sum / float(max(counts.chosen_tokens, 1)) - self.orpo_weight * (
                (ratio * present).sum() / float(max(counts.pairs, 1))
            )
            rewards = self.orpo_weight * mean.detach()
            logp = mean  # ORPO works on token means: its log-probabilities are reported as such (as TRL does)
            extra = [nll_sum.detach(), (ratio.detach() * present).sum()]
        r = rewards * present.unsqueeze(-1)
        sums = [
            share.detach(),
            r[..., 0].sum(),
            r[..., 1].sum(),
            (r[..., 0] - r[..., 1]).sum(),
            ((rewards[..., 0] > rewards[..., 1]).float() * present).sum(),
            (logp.detach()[..., 0] * present).sum(),
            (logp.detach()[..., 1] * present).sum(),
            *extra,
        ]
        return share, torch.stack([s.float() for s in sums])

    @contextmanager
    def reference(self):
        """The reference policy for one forward: the base model, with no gradient flowing from it."""
        if self.same_graph_reference:  # training and evaluation alike: the policy's graph of each
            with adapters_scaled_to_zero(self.peft_model):  # the loss detaches (frozen=True): no graph kept
                yield
        else:
            with torch.no_grad(), adapters_off(self.peft_model):
                yield

    def report(self, sums: list[float], counts: StepCounts) -> dict[str, float]:
        pairs = max(counts.pairs, 1)
        out = {"loss": sums[0]}
        pair_sums = sums[1 : 1 + len(PAIR_FIELDS)]
        out.update({name: v / pairs for name, v in zip(PAIR_FIELDS, pair_sums, strict=True)})
        if self.kind == "orpo":
            nll, odds = sums[1 + len(PAIR_FIELDS) :]
            out.update(zip(ORPO_FIELDS, (nll / max(counts.chosen_tokens, 1), odds / pairs), strict=True))
        return out


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, switching formulas at -ln 2 where each loses precision."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def sft_objective(causal_lm: nn.Module, micro_batches: int) -> SFT:
    """SFT with the model's router load-balancing term where its config adds one, averaged over the step's
    MICRO_BATCHES (global batch / micro-batch) micro-batches."""
    from launcher.rank.model.moe import router_aux

    aux = router_aux(causal_lm)
    return SFT() if aux is None else SFT(aux.coef, micro_batches)


def make_objective(recipe, peft_model: nn.Module, compiled: bool = False, micro_batches: int = 1):
    """The recipe's objective. COMPILED: the decoder layers are compiled (build.compile_layers), so the DPO
    reference takes the policy's graph (Preference.reference) — with LoRA under FSDP2 or one device. DoRA's
    output at scale 0 is not the base's, and DeepSpeed's hooks expect every forward with gradients to be
    followed by its backward: those keep the bypassed no-grad reference. MICRO_BATCHES: of a step, all ranks."""
    if recipe.train.objective == "sft":
        return sft_objective(peft_model.get_base_model(), micro_batches)
    same = compiled and not recipe.lora.use_dora and recipe.parallel.backend != "deepspeed"
    return Preference(recipe, peft_model, same_graph_reference=same)
