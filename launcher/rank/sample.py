"""Completions of prompts by the model in training or a loaded adapter (transformers' generate), without
changing what training does next: eval mode, no gradients, the RNG state and every module's train flag
given back, compiled layers run eagerly, a sharded model's ranks decoding in lockstep."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Sampling:
    """Multinomial sampling settings; None where decoding is greedy."""

    temperature: float = 1.0
    top_p: float = 1.0


@contextmanager
def generation_mode(causal_lm: nn.Module, device: torch.device, fsdp_root: nn.Module | None = None) -> Iterator[None]:
    """The block runs CAUSAL_LM for generation and leaves training exactly as it was.

    Eval mode switches dropout off and transformers' gradient checkpointing with it (it checkpoints only
    while training); every module's own flag comes back afterwards. The RNG is forked, so sampling (or any
    library that draws) does not move the training's dropout and data streams. torch.compile'd layers run
    eagerly ('force_eager'): a growing KV cache would recompile them for every new length, and the
    training's compiled graphs stay as they are. Under FSDP2 the root's parameters (final norm, a LoRA
    head) are gathered for the block (generate calls the model below the root, whose hook would gather
    them), and a tied head that reads the embedding's shard gets the whole weight; both are collectives
    every rank runs in the same order."""
    modes = [(m, m.training) for m in causal_lm.modules()]
    with ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
        stack.enter_context(torch.compiler.set_stance("force_eager"))
        causal_lm.eval()
        if fsdp_root is not None:
            fsdp_root.unshard()
            stack.callback(fsdp_root.reshard)
            stack.enter_context(_whole_tied_head(causal_lm))
        try:
            yield
        finally:
            for m, was in modes:
                m.training = was


@contextmanager
def _whole_tied_head(causal_lm: nn.Module) -> Iterator[None]:
    """A head that shares the embedding's sharded weight (fsdp.apply_fsdp, the fused-loss case) holds the
    whole weight for the block: the loss reads the shard's rows, a module call needs all of them."""
    from torch.distributed.tensor import DTensor

    from launcher.rank.model.skeleton import output_head

    head = output_head(causal_lm)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, DTensor) or hasattr(head, "base_layer"):
        yield
        return
    head.weight = nn.Parameter(weight.full_tensor(), requires_grad=False)
    try:
        yield
    finally:
        head.weight = weight


def lockstep() -> bool:
    """Whether the ranks must decode together: every forward of a sharded model is a collective, and a rank
    whose reply ended must keep joining them until every rank's has (transformers' synced_gpus)."""
    return dist.is_initialized() and dist.get_world_size() > 1


def complete(
    causal_lm: nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int | None,
    device: torch.device,
    sampling: Sampling | None = None,
) -> list[int]:
    """The new token ids transformers' generate appends to PROMPT_IDS (one prompt: no padding, so the
    prompt runs exactly as it would alone), stopping at any of STOP_IDS or after MAX_NEW_TOKENS."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampling is not None,
        temperature=sampling.temperature if sampling else None,
        top_p=sampling.top_p if sampling else None,
        top_k=None,
        eos_token_id=stop_ids or None,
        pad_token_id=pad_id if pad_id is not None else (stop_ids[0] if stop_ids else None),
    )
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    out = causal_lm.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config, synced_gpus=lockstep()
    )
    new = out[0, len(prompt_ids) :].tolist()
    # generate pads a finished sequence while it waits in lockstep; a reply ends at its first stop token.
    for i, t in enumerate(new):
        if t in stop_ids:
            return new[: i + 1]
    return new


def sample_texts(
    causal_lm: nn.Module,
    tokenizer,
    prompts: list[tuple[str, list[int]]],
    max_new_tokens: int,
    stop_ids: list[int],
    device: torch.device,
    fsdp_root: nn.Module | None = None,
    sampling: Sampling | None = None,
    seed: int = 0,
) -> list[dict[str, str]]:
    """[{prompt, completion}] of each (text, token ids) prompt (greedy unless SAMPLING; then SEED seeds the
    draws), special tokens dropped from the text; every rank must call it with the same prompts (lockstep)."""
    with generation_mode(causal_lm, device, fsdp_root):
        if sampling is not None:
            torch.manual_seed(seed)  # inside the forked RNG: the caller's streams stay where they were
        return [
            {
                "prompt": text,
                "completion": tokenizer.decode(
                    complete(causal_lm, ids, max_new_tokens, stop_ids, tokenizer.pad_token_id, device, sampling),
                    skip_special_tokens=True,
                ),
            }
            for text, ids in prompts
        ]


def rendered_prompts(data_cfg, tokenizer, prompts: list[str]) -> tuple[list[tuple[str, list[int]]], list[int]]:
    """PROMPTS as (text, token ids rendered as training renders a prompt under DATA_CFG), and the stop ids."""
    from launcher.data.render import Renderer

    renderer = Renderer(data_cfg, tokenizer)
    return [(p, renderer.prompt_ids(p)) for p in prompts], renderer.stop_ids()


def fsdp_root(loss_model: nn.Module) -> nn.Module | None:
    """The FSDP2 root module (the loss) when the model is sharded by FSDP2, else None."""
    from torch.distributed.fsdp import FSDPModule

    return loss_model if isinstance(loss_model, FSDPModule) else None
