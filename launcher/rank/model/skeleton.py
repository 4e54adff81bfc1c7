"""The meta-device model: built from the config, its checkpoint shapes, decoder layers, embeddings and head,
linear layers and the LoRA targets a recipe names, and what makes an architecture unusable here.

Nothing here knows a model family: the decoder layers are the one ModuleList of the class's
`_no_split_modules` classes, the embedding and head are what `get_input_embeddings`/`get_output_embeddings`
return, and the linears are the skeleton's own `nn.Linear` modules (Phi-3's fused `qkv_proj` and
`gate_up_proj` are ordinary linears, quantized and sharded as any other)."""

from __future__ import annotations

import torch
from torch import nn

from launcher.errors import UserError
from launcher.plan.memory import LayerShape
from launcher.plan.recipe import Recipe
from launcher.rank.model.moe import LAYOUTS, expert_layout, experts_modules, is_router

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_skeleton(recipe: Recipe, config) -> nn.Module:
    """The architecture with parameters on meta; buffers (rotary tables) stay real on CPU; tied weights tied."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config,
            dtype=DTYPES[recipe.model.dtype],
            attn_implementation=recipe.model.attn_implementation,
            trust_remote_code=recipe.model.trust_remote_code,
        )
    # init_empty_weights replaces the parameter in every register_parameter call, which undoes the tie that
    # post_init made: a tied model would get a second (head) parameter to shard, load and train apart.
    model.tie_weights()
    return model


def checkpoint_shapes(causal_lm: nn.Module) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape the architecture expects (tied weights appear once, by their first
    owner in module order: the input embedding, which is the name tied checkpoints store)."""
    out: dict[str, tuple[int, ...]] = {}
    seen: set[int] = set()
    for n, m in causal_lm.named_modules():
        for pn, p in m.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                out[f"{n}.{pn}" if n else pn] = tuple(p.shape)
    return out


def constant_inits(causal_lm: nn.Module) -> dict[str, float]:
    """Checkpoint name -> the constant the architecture initialises each 1-D parameter to (norm scales,
    biases), from the model's own `_init_weights` run on a CPU copy of the owning module: Llama's RMSNorm
    scale is 1, Gemma's (1 + w) norms start at w = 0, biases at 0. `model.init = "random"` fills these with
    the constant and everything else with seeded noise."""
    import copy

    out: dict[str, float] = {}
    known: dict[tuple[type, str], float | None] = {}
    for n, m in causal_lm.named_modules():
        for pn, p in m.named_parameters(recurse=False):
            if p.dim() != 1:
                continue
            key = (type(m), pn)
            if key not in known:
                known[key] = _constant_init(causal_lm, copy.deepcopy(m), pn)
            if known[key] is not None:
                out[f"{n}.{pn}" if n else pn] = known[key]
    return out


def _constant_init(causal_lm: nn.Module, module: nn.Module, pname: str) -> float | None:
    module = module.to_empty(device="cpu", recurse=False)
    with torch.no_grad():
        getattr(module, pname).fill_(float("nan"))
        causal_lm._init_weights(module)
    values = getattr(module, pname).float().unique()
    return values.item() if values.numel() == 1 and values.isfinite().all() else None


def layer_class_names(causal_lm: nn.Module) -> set[str]:
    """The decoder-layer class names the architecture declares (the class attribute: after post_init the
    instance's is a merged set)."""
    return set(getattr(type(causal_lm), "_no_split_modules", None) or [])


def _layer_lists(causal_lm: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    names = layer_class_names(causal_lm)
    return [
        (n, m)
        for n, m in causal_lm.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) and all(_is_layer(c, names) for c in m)
    ]


def _is_layer(module: nn.Module, names: set[str]) -> bool:
    # By the class's ancestry: FSDP2's fully_shard swaps the class for a subclass (FSDPLlamaDecoderLayer).
    return any(k.__name__ in names for k in type(module).__mro__)


def decoder_layers(causal_lm: nn.Module) -> nn.ModuleList:
    """The decoder layers: the one ModuleList whose children are the class's `_no_split_modules` layers."""
    found = _layer_lists(causal_lm)
    if len(found) != 1:
        raise UserError(f"{type(causal_lm).__name__}: {structure_problem(causal_lm) or 'no decoder layers'}")
    return found[0][1]


def decoder(causal_lm: nn.Module) -> nn.Module:
    """The module that maps token ids to the last hidden states (LlamaModel, Gemma2Model, ...)."""
    return causal_lm.get_decoder()


def input_embedding(causal_lm: nn.Module) -> nn.Module:
    return causal_lm.get_input_embeddings()


def output_head(causal_lm: nn.Module) -> nn.Module:
    return causal_lm.get_output_embeddings()


def head_weight(causal_lm: nn.Module) -> torch.Tensor:
    """The head's weight, also when LoRA wraps the head (peft keeps the base layer's parameter)."""
    head = output_head(causal_lm)
    return getattr(head, "base_layer", head).weight


def is_tied(causal_lm: nn.Module) -> bool:
    """One parameter serves the input embedding and the head."""
    return head_weight(causal_lm) is input_embedding(causal_lm).weight


def shared_parameters(root: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """(module, name) of every owner of each parameter held by more than one module, first owner first."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in root.modules():
        for pn, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((m, pn))
    return [o for o in owners.values() if len(o) > 1]


def retie(shared: list[list[tuple[nn.Module, str]]]) -> None:
    """Point every owner at its first owner's parameter again (`Module.to_empty` gives each owner its own)."""
    for (first, first_name), *others in shared:
        p = first._parameters[first_name]
        for m, pn in others:
            m._parameters[pn] = p


def structure_problem(causal_lm: nn.Module) -> str | None:
    """Why qlaunch cannot train this architecture, naming the module or parameter; None if it can.

    qlaunch shards decoder layers, fills 2-D (or 1-D) tensors row by row under their checkpoint names, runs
    the decoder to hidden states and the head in its own loss. Anything else would be trained wrongly or
    fail inside a rank: say so before anything is spawned."""
    names = layer_class_names(causal_lm)
    found = _layer_lists(causal_lm)
    cls = type(causal_lm).__name__
    if not names:
        return f"{cls} declares no decoder-layer class (_no_split_modules), so it cannot be sharded by layer"
    if len(found) != 1:
        where = ", ".join(n for n, _ in found) or "none"
        return f"{cls} needs exactly one list of {'/'.join(sorted(names))} layers (found: {where})"
    config = getattr(causal_lm, "config", None)
    layout = expert_layout(causal_lm)
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        value = getattr(config, key, None)
        if type(value) is int and value > 1 and layout is None:
            return (
                f"{cls} is a mixture-of-experts model ({key} = {value}); of those qlaunch trains "
                f"{', '.join(sorted(LAYOUTS))} only"
            )
    fused = {id(p) for _, m in experts_modules(causal_lm) for p in m.parameters(recurse=False)} if layout else set()
    for n, p in causal_lm.named_parameters():
        if p.dim() > 2 and id(p) not in fused:
            return f"parameter {n} has {p.dim()} dimensions; qlaunch loads and shards 1-D and 2-D weights only"
    layer_prefix = found[0][0] + "."
    for n, m in causal_lm.named_modules():
        weight = m._parameters.get("weight")
        if layout is not None and is_router(m):
            continue  # the MoE router: a dense [experts, hidden] weight in compute dtype, never quantized
        if n.startswith(layer_prefix) and weight is not None and weight.dim() == 2 and not isinstance(m, nn.Linear):
            return (
                f"module {n} is a {type(m).__name__}, not an nn.Linear; qlaunch quantizes and adapts "
                "the decoder layers' nn.Linear modules only"
            )
    try:
        emb, head = input_embedding(causal_lm), output_head(causal_lm)
    except (AttributeError, NotImplementedError):
        emb = head = None
    if not isinstance(emb, nn.Embedding):
        return f"{cls} has no nn.Embedding input embedding (get_input_embeddings)"
    if type(head) is not nn.Linear:
        return f"{cls}'s output head (get_output_embeddings) is not an nn.Linear"
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping

        renames = get_model_conversion_mapping(causal_lm, add_legacy=False)
    except (ImportError, TypeError):
        renames = None
    if renames and layout is None:
        # qlaunch reads each tensor by its module's name; transformers would rename checkpoint keys first. The
        # MoE families' renames (per-expert tensors, Mixtral's block name) are moe.LAYOUTS, read as transformers does.
        return f"{cls}'s checkpoints store tensors under other names than its modules (transformers renames them)"
    return None


def layer_shape(causal_lm: nn.Module) -> LayerShape:
    """The decoder layer as the memory planner counts it: its linears (leaf, in, out), its other parameters
    and hidden-sized norms. Dense decoders repeat one layer; should the layers differ, the largest counts."""
    hidden = input_embedding(causal_lm).embedding_dim
    shapes = [_layer_shape(layer, hidden) for layer in decoder_layers(causal_lm)]
    return max(shapes, key=lambda s: (sum(i * o for _, i, o in s.linears) + s.other_params, s.norms))


def _layer_shape(layer: nn.Module, hidden: int) -> LayerShape:
    linears: list[tuple[str, int, int]] = []
    other = norms = 0
    seen: set[int] = set()
    for n, m in layer.named_modules():
        for pn, p in m.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(m, nn.Linear) and pn == "weight":
                linears.append((n.rsplit(".", 1)[-1], m.in_features, m.out_features))
                continue
            other += p.numel()
            norms += not isinstance(m, nn.Linear) and p.dim() == 1 and p.numel() == hidden
    return LayerShape(tuple(linears), other, norms)


def outside_layer_params(causal_lm: nn.Module) -> int:
    """Parameters outside the decoder layers, the input embedding and the head (the final norm, usually)."""
    inside = {id(p) for p in decoder_layers(causal_lm).parameters()}
    inside |= {id(input_embedding(causal_lm).weight), id(head_weight(causal_lm))}
    return sum(p.numel() for p in causal_lm.parameters() if id(p) not in inside)


def linear_names(causal_lm: nn.Module) -> list[str]:
    return [n for n, m in causal_lm.named_modules() if isinstance(m, nn.Linear)]


def name_matches(name: str, suffixes: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def lora_targets(recipe: Recipe, causal_lm: nn.Module) -> list[str]:
    """Module-name suffixes LoRA wraps; validated against the architecture before any weight is read.

    "all-linear" is every linear inside the decoder layers, by leaf name (Phi-3: qkv_proj, o_proj,
    gate_up_proj, down_proj)."""
    names = linear_names(causal_lm)
    if recipe.lora.target_modules == "all-linear":
        layers = decoder_layers(causal_lm)
        inside = {id(m) for m in layers.modules()}
        linear = set(names)
        return sorted({n.rsplit(".", 1)[-1] for n, m in causal_lm.named_modules() if id(m) in inside and n in linear})
    experts = {f"{n}.{pn}" for n, m in experts_modules(causal_lm) for pn, _ in m.named_parameters(recurse=False)}
    for t in recipe.lora.target_modules:
        if not any(name_matches(n, [t]) for n in names) and any(name_matches(n, [t]) for n in experts | {"experts"}):
            raise UserError(
                f"lora.target_modules: {t!r} names the fused experts of a mixture-of-experts layer; "
                "LoRA on experts is not yet supported (adapt the attention projections)"
            )
        if not any(name_matches(n, [t]) for n in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise UserError(f"lora.target_modules: {t!r} matches no linear layer; this model has {', '.join(leaves)}")
    return list(recipe.lora.target_modules)
