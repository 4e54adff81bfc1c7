"""Pure per-GPU memory planner: recipe + model shape + world size + micro-batch -> bytes, by cause.

It models what this launcher actually builds (see loading.py, parallel/fsdp.py, train.py), not a generic
trainer:
  * NF4 bytes live in a `quant.storage_dtype` tensor that FSDP2 shards on dim 0 (0.5 byte/param / world);
  * the per-block scales (quant state) are all-gathered at load time and *replicated* on every rank;
  * LLM.int8 weights (quant.bits = 8; backend none or ZeRO-2 only) are one byte per weight plus an fp32
    scale per output row, whole on every rank;
  * dense frozen weights (embeddings, lm_head, norms) are sharded in `model.dtype`;
  * during forward/backward whole decoder layers are all-gathered in `quant.compute_dtype` (the current one
    plus the prefetched next; with parallel.fsdp.reshard_after_forward = false every layer stays gathered
    until its backward), and bitsandbytes dequantizes each 4-bit weight to a full compute-dtype matrix for
    its matmul. FSDP never gathers a plain frozen lm_head (the loss splits the vocabulary over the ranks);
    DeepSpeed ZeRO-3 and a LoRA-wrapped or quantized head gather it with the root;
  * LoRA masters, their gradients (reduced in fp32) and AdamW's two moments are fp32 and sharded;
  * activations are either one hidden state per layer boundary (gradient checkpointing) or every tensor a
    layer saves for backward; the loss runs lm_head over chunks of up to 2048 tokens, fewer for a large
    vocabulary (loss_chunk_tokens; rank/loss.LinearCrossEntropy; split over the vocabulary, world x the chunk
    over 1/world of it, plus every rank's hidden states).

Every coefficient below is a named constant with the reason for its value. They are first estimates from
counting the saved tensors; GPU calibration (against torch.cuda.max_memory_reserved) adjusts them.
First check, 1x H100 (torch 2.11), Llama-3.1-8B shapes, random init, seq 2048, LoRA r16 all-linear, FSDP2
world 1, micro-batch 2: checkpointing 12.78 GiB reserved (estimate 13.59, +6%); no checkpointing 35.49 GiB
(estimate 36.71, +3%); micro-batch 16 without checkpointing (estimate 214 GiB) ran out of memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from launcher.plan.recipe import Recipe

GiB = 2**30

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

# --- coefficients (calibrate on GPU; see module doc) --------------------------------------------------
# FSDP2 all-gathers layer i+1 while layer i computes (implicit prefetch), in forward and in backward.
GATHERED_LAYERS = 2

# With more than one shard, FSDP2 keeps each all-gather's flat output buffer alive beside the unsharded
# parameters copied out of it until the next group's copy-out. Measured on 8B/70B shapes on 2 and 4 H100s
# (bench/RESULTS.md, 2026-11-27) as 0.6 of the gathered bytes. With one shard FSDP2 gathers nothing: the
# unsharded parameters are views of the local shards (torch's FSDPParamGroup world_size == 1 path).
GATHER_OUTPUT_FACTOR = 0.6

# bitsandbytes' 4-bit matmul dequantizes the whole weight to compute dtype; in backward the weight is
# dequantized again for the input gradient while the forward's copy of the next op may still be alive.
DEQUANT_BUFFERS = 2

# DoRA's forward (peft) holds, per adapted linear, the dequantized weight, B·A (built from an identity
# matrix pushed through A and B) and their sum, for the row norms of W + s·B·A: three compute-dtype
# [out, in] matrices beside the matmul's own dequantized copy.
DORA_BUFFERS = 3

# RMSNorm upcasts its input to fp32 and saves it; its compute-dtype output is what the linears save.
NORM_FP32_BYTES = 4

# Gradient of the hidden state flowing backward plus the residual branch's gradient (compute dtype).
HIDDEN_GRAD_BUFFERS = 3

# Tensors the root saves after the last layer, per token x hidden, in bytes: fp32 norm input (4), norm
# output (2), the shifted/reshaped copy (2), and the gradients of the last two (2+2).
ROOT_BYTES_PER_TOKEN_HIDDEN = 12

# Loss chunk (rank/loss.CausalLMLoss): lm_head over at most this many tokens at a time, fewer for a large
# vocabulary: a chunk's fp32 logits stay within LOSS_CHUNK_FP32_BYTES (loss_chunk_tokens), but never fewer
# than LOSS_CHUNK_MIN_TOKENS (a [256, hidden] x [hidden, vocab] product still fills the matrix units).
# 0.25 GiB gives Llama-3's 128,256-token vocabulary 512 tokens, Qwen2.5's 152,064 and Gemma's 256-262k 256;
# at 1.25 GiB (2048 tokens for Llama-3) the chunk's logits, probabilities and input gradient were the
# largest thing live in an 8B step on one GPU (1.48 of 2.71 GiB above the model; bench/RESULTS.md).
LOSS_CHUNK_TOKENS = 2048
LOSS_CHUNK_MIN_TOKENS = 256
LOSS_CHUNK_FP32_BYTES = int(0.25 * GiB)

# Per chunk token x vocab, counted for the earlier loss (recomputed in backward): bf16 logits (2) + fp32
# copy (4) + log-softmax output (4) + its gradient (4). train.LinearCrossEntropy needs about 8 (bf16 logits
# while the fp32 copy is made, then bf16 probabilities), but the measured peaks moved less than that
# (8B batch 2: 11.21 -> 10.92 GiB; 70B with compile and expandable segments: 25.14 -> 22.41), so the
# calibrated total keeps 14 until the terms are re-fitted on a GPU: the estimate errs high (safe).
LOGIT_BYTES_PER_ELEMENT = 14

# A final logit soft-cap (Gemma 2) keeps the slope d(c*tanh(z/c))/dz of each chunk logit in fp32 beside the
# logits, for the input gradient: a second fp32 buffer (loss_chunk_tokens halves the chunk for it).
SOFTCAP_SLOPE_BYTES = 4

# model.attn_implementation = "eager" materialises the attention scores, per head and query x key, and
# saves them for backward: the fp32 softmax (4) and its compute-dtype copy that multiplies v (2), beside
# the compute-dtype scores it is made from (2) and Gemma 2's soft-capped tanh output (2). SDPA and flash
# attention save only a log-sum-exp per head (counted in the layer). A first estimate, not calibrated.
EAGER_SCORE_BYTES = 10

# Scale on the counted per-layer activation bytes (kernels' workspaces, views that are not free); 1.0
# until calibrated.
LAYER_ACTIVATION_SCALE = 1.0

# The caching allocator reserves more than it hands out (block rounding, fragmentation between
# differently sized activations); a fraction of everything allocated.
ALLOCATOR_SLACK = 0.06

# Outside torch's allocator (not in max_memory_reserved): CUDA context + cuBLAS workspaces, and NCCL's
# own buffers/channels when there is more than one rank.
CUDA_CONTEXT_BYTES = int(0.75 * GiB)

NCCL_BYTES = int(0.5 * GiB)

# A plan "fits" below this fraction of the card: other processes, allocator spikes, eval batches.
USABLE_FRACTION = 0.95

# Above this fraction a fitting plan still gets suggestions (a longer sequence or eval batch may not fit).
TIGHT_FRACTION = 0.85

# Speed model for choosing micro-batch/checkpointing: time per sequence ~ (1 + MICRO_STEP_OVERHEAD / mb),
# fitted to bare-FSDP2 QLoRA tok/s/GPU on 2xH100 (5,516 at micro-batch 2, 7,650 at 8, DESIGN.md);
# recomputing every layer in backward costs about one extra forward: 4/3 of the step.
MICRO_STEP_OVERHEAD = 1.2

RECOMPUTE_COST = 4 / 3

# Gathering each layer again for backward (FSDP resharding after forward, more than one shard) costs about
# this many sequence tokens of compute per micro-step: 4 x H100, 8B, micro-batch 2 x 2048 tokens, compile:
# 6,760 tok/s/GPU resharding against 7,529 keeping the layers gathered (+11.4% of 4,096 tokens).
REGATHER_TOKENS = 470

MAX_AUTO_MICRO_BATCH = 64

DEFAULT_GPU_MEMORY = 80 * GiB

# The decoder layer's linears when only config.json is known (no model built): Llama's.
LAYER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

LABELS = {
    "weights_4bit": "quantized weights (per rank)",
    "quant_constants": "quantization constants (replicated)",
    "dense_weights": "embeddings, lm_head, norms (shard)",
    "gathered": "gathered layers + dequantized weights",
    "lora": "LoRA weights + grads + AdamW state",
    "activations": "activations",
    "logits": "logits / loss chunk",
    "allocator": "allocator slack",
    "cuda_nccl": "CUDA context + NCCL",
}


def loss_chunk_tokens(vocab: int, softcap: bool = False) -> int:
    """Tokens per chunk of the loss: the largest power of two up to LOSS_CHUNK_TOKENS whose fp32 logits (and
    the soft-cap's fp32 slope beside them) fit LOSS_CHUNK_FP32_BYTES, at least LOSS_CHUNK_MIN_TOKENS. The loss and the planner both use it;
    the chunk changes where the sum over tokens is split, not what is summed."""
    buffers = 2 if softcap else 1
    chunk = LOSS_CHUNK_TOKENS
    while chunk > LOSS_CHUNK_MIN_TOKENS and chunk * vocab * 4 * buffers > LOSS_CHUNK_FP32_BYTES:
        chunk //= 2
    return chunk


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer as built: each nn.Linear as (leaf name, in_features, out_features), in module order
    (Phi-3's fused qkv_proj and gate_up_proj as they are), the count of its other parameters (norm scales,
    q/k norms, biases) and how many of those are hidden-sized norms (their inputs are saved for backward)."""

    linears: tuple[tuple[str, int, int], ...]
    other_params: int
    norms: int


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only model the estimate needs.

    From config.json alone (`from_config`) the layer is assumed to be Llama's (LAYER_LINEARS, two RMSNorms,
    no biases, one final norm). The launcher passes the layer and the parameters outside the layers as the
    built (meta) model has them (launch/prepare.py), so fused projections, extra norms and biases count."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False
    softcap: bool = False  # final_logit_softcapping: the loss keeps a second fp32 buffer per chunk
    layer: LayerShape | None = None  # None: Llama's layer from the config's sizes
    root_params: int | None = None  # outside the layers, embedding and head (the final norm); None: hidden

    @classmethod
    def from_config(cls, config: Any, **built: Any) -> ModelShape:
        """From a transformers config object or its config.json dict; BUILT: `layer`, `root_params`, `tied`
        as the built model has them."""
        get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
        hidden = int(get("hidden_size"))
        heads = int(get("num_attention_heads"))
        shape = cls(
            hidden=hidden,
            intermediate=int(get("intermediate_size")),
            layers=int(get("num_hidden_layers")),
            heads=heads,
            kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            vocab=int(get("vocab_size")),
            tied=bool(get("tie_word_embeddings", False)),
            softcap=bool(get("final_logit_softcapping")),
        )
        return replace(shape, **built)

    def layer_shape(self) -> LayerShape:
        """The decoder layer: as built, or Llama's from the config's sizes."""
        if self.layer is not None:
            return self.layer
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        linears = (
            ("q_proj", h, q),
            ("k_proj", h, kv),
            ("v_proj", h, kv),
            ("o_proj", q, h),
            ("gate_proj", h, i),
            ("up_proj", h, i),
            ("down_proj", i, h),
        )
        return LayerShape(linears, other_params=2 * h, norms=2)

    def linears(self) -> tuple[tuple[str, int, int], ...]:
        """Per decoder layer: (leaf name, in_features, out_features) of each linear."""
        return self.layer_shape().linears

    def root_other_params(self) -> int:
        return self.hidden if self.root_params is None else self.root_params

    def params(self) -> int:
        layer = self.layer_shape()
        per_layer = sum(a * b for _, a, b in layer.linears) + layer.other_params
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * per_layer + embeddings + self.root_other_params()


@dataclass(frozen=True)
class Setup:
    """The planner's view of a run: what the recipe says plus the numbers chosen for it."""

    world_size: int
    nproc_per_node: int
    micro_batch: int
    checkpointing: bool
    keep_gathered: bool = False  # FSDP layers stay gathered from forward to backward (no reshard after forward)


@dataclass(frozen=True)
class Estimate:
    parts: dict[str, int]  # key of LABELS -> bytes per GPU, in display order
    gpu_memory: int
    setup: Setup
    notes: list[str] = field(default_factory=list)
    layers: int = 0  # decoder layers of the model (the live view's loading progress uses it)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def reserved(self) -> int:
        """What torch.cuda.max_memory_reserved should show (everything but context/NCCL)."""
        return self.total - self.parts.get("cuda_nccl", 0)

    @property
    def fits(self) -> bool:
        return self.total <= USABLE_FRACTION * self.gpu_memory

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_gib": round(self.total / GiB, 3),
            "reserved_gib": round(self.reserved / GiB, 3),
            "gpu_memory_gib": round(self.gpu_memory / GiB, 3),
            "fits": self.fits,
            "micro_batch": self.setup.micro_batch,
            "gradient_checkpointing": self.setup.checkpointing,
            "keep_gathered": self.setup.keep_gathered,
            "layers": self.layers,
            "parts_gib": {k: round(v / GiB, 3) for k, v in self.parts.items()},
        }


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def lora_targets(recipe: Recipe, shape: ModelShape) -> set[str]:
    """Leaf names of the layer linears LoRA wraps ('lm_head' included if listed)."""
    t = recipe.lora.target_modules
    if t == "all-linear":
        return {name for name, _, _ in shape.linears()}
    return {_leaf(x) for x in t}


def _quantized(recipe: Recipe, leaf: str) -> bool:
    return recipe.quant.bits != "none" and leaf not in {_leaf(s) for s in recipe.quant.skip_modules}


def _fsdp_sharded(recipe: Recipe, setup: Setup) -> bool:
    """FSDP with more than one shard: layers are gathered (and may be kept), the head's vocabulary split."""
    return recipe.parallel.backend == "fsdp" and _shards(recipe, setup)[0] > 1


def _shards(recipe: Recipe, setup: Setup) -> tuple[int, bool, bool]:
    """(ranks a parameter is sharded over, weights on host, optimizer state on host)."""
    p = recipe.parallel
    if p.backend == "fsdp":
        n = setup.nproc_per_node if p.fsdp.hybrid else setup.world_size
        return n, p.fsdp.cpu_offload, p.fsdp.cpu_offload
    if p.backend == "deepspeed":
        ds = p.deepspeed
        return (setup.world_size if ds.stage == 3 else 1), ds.offload_params, ds.offload_optimizer
    return 1, False, False


def _quant_bytes(recipe: Recipe, n: int, rows: int) -> tuple[float, float]:
    """(packed weight bytes, scale bytes) of a quantized matrix with n elements in `rows` output rows."""
    q = recipe.quant
    if q.bits == 8:
        return float(n), 4.0 * rows  # LLM.int8: one int8 per weight + one fp32 scale per output row
    blocks = n / q.blocksize
    if q.double_quant:
        # uint8 code per block, plus an fp32 scale and offset per 256-block group (make_quant_state).
        return n / 2, blocks + blocks / 256 * 4
    return n / 2, blocks * 4


def layer_activation_bytes_per_token(shape: ModelShape, recipe: Recipe) -> float:
    """Bytes one decoder layer saves for backward per token, without checkpointing (a Llama-like layer,
    SDPA; every hidden-sized norm of the layer counted: Gemma's four, Llama's two)."""
    s = DTYPE_BYTES[recipe.quant.compute_dtype]
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    norms = shape.layer_shape().norms * (NORM_FP32_BYTES + s) * h
    # SDPA saves rotated q, k, v, its output and a fp32 log-sum-exp per head; o_proj saves its input
    # (the output transposed back into a fresh contiguous tensor).
    attn = s * (q + 2 * kv) + s * q + 4 * shape.heads + s * q
    # SwiGLU: gate and up outputs, silu(gate), and their product (down_proj's input).
    mlp = 4 * s * i
    lora = 0.0
    targets = lora_targets(recipe, shape)
    for name, fan_in, _ in shape.linears():
        if name in targets:
            lora += s * recipe.lora.rank  # lora_A's output, saved by lora_B
            if recipe.lora.dropout > 0:
                lora += (s + 1) * fan_in  # dropout's output and mask, a fresh copy per adapted module
    return LAYER_ACTIVATION_SCALE * (norms + attn + mlp + lora)


def estimate(
    recipe: Recipe,
    shape: ModelShape,
    world_size: int,
    micro_batch: int,
    checkpointing: bool,
    gpu_memory: int = DEFAULT_GPU_MEMORY,
    nproc_per_node: int | None = None,
) -> Estimate:
    """Peak bytes per GPU by cause for one training step of this recipe on this model."""
    setup = Setup(world_size, nproc_per_node or world_size, micro_batch, checkpointing)
    shard, weights_off, optim_off = _shards(recipe, setup)
    backend = recipe.parallel.backend
    gathers = backend == "fsdp" or (backend == "deepspeed" and recipe.parallel.deepspeed.stage == 3)
    fsdp_sharded = _fsdp_sharded(recipe, setup)
    # 'auto' counts as resharding here: choose() resolves it by estimating both.
    keep = fsdp_sharded and recipe.parallel.fsdp.reshard_after_forward is False
    setup = replace(setup, keep_gathered=keep)
    s_model = DTYPE_BYTES[recipe.model.dtype]
    s = DTYPE_BYTES[recipe.quant.compute_dtype]
    h, v, L = shape.hidden, shape.vocab, shape.layers
    targets = lora_targets(recipe, shape)
    layer, root_params = shape.layer_shape(), shape.root_other_params()
    notes: list[str] = []

    packed_layer = scales_layer = dense_layer = 0.0
    lora_layer = 0
    biggest_quant = biggest_target = 0
    for name, fan_in, fan_out in layer.linears:
        n = fan_in * fan_out
        if _quantized(recipe, name):
            pk, sc = _quant_bytes(recipe, n, fan_out)
            packed_layer += pk
            scales_layer += sc
            biggest_quant = max(biggest_quant, n)
        else:
            dense_layer += n * s_model
        if name in targets:
            lora_layer += recipe.lora.rank * (fan_in + fan_out) + (fan_out if recipe.lora.use_dora else 0)
            biggest_target = max(biggest_target, n)
    dense_layer += layer.other_params * s_model  # norm scales, biases

    head = 0 if shape.tied else v * h
    head_packed = head_scales = 0.0
    head_dense = 0.0
    if head and _quantized(recipe, "lm_head"):
        head_packed, head_scales = _quant_bytes(recipe, head, v)
        biggest_quant = max(biggest_quant, head)
    else:
        head_dense = head * s_model
    lora_params = L * lora_layer + (recipe.lora.rank * (h + v) if "lm_head" in targets else 0)
    # FSDP never gathers a plain frozen head: the loss splits the vocabulary over the ranks instead
    # (train.ShardedLinearCrossEntropy), which gathers every rank's hidden states and sums input gradients.
    # A tied head (never quantized: preflight) reads the embedding's own shard the same way.
    vocab_split = fsdp_sharded and not head_packed and "lm_head" not in targets

    parts: dict[str, float] = {}
    parts["weights_4bit"] = 0.0 if weights_off else (L * packed_layer + head_packed) / shard
    parts["quant_constants"] = L * scales_layer + head_scales
    dense_total = L * dense_layer + v * h * s_model + head_dense + root_params * s_model
    parts["dense_weights"] = 0.0 if weights_off else dense_total / shard

    gathered = 0.0
    if gathers and shard > 1:
        # Packed bytes travel in storage dtype == compute dtype (no cast); dense frozen weights and LoRA
        # are cast to compute dtype by the mixed-precision policy.
        per_layer = packed_layer + dense_layer * s / s_model + lora_layer * s
        if keep:  # every layer whole at the end of forward, plus the all-gather buffers of the newest two
            gathered += (L + GATHER_OUTPUT_FACTOR * GATHERED_LAYERS) * per_layer
        else:
            gathered += (1 + GATHER_OUTPUT_FACTOR) * GATHERED_LAYERS * per_layer
        if shape.tied and not vocab_split:  # the embedding (the LoRA-wrapped head) and the final norm
            root = (v * h + root_params) * s
        elif vocab_split:
            root = root_params * s  # the final norm
        else:
            root = head_packed + (head_dense + root_params * s_model) * s / s_model
        gathered += (1 + GATHER_OUTPUT_FACTOR) * root
    gathered += DEQUANT_BUFFERS * biggest_quant * s if recipe.quant.bits != "none" else 0.0
    gathered += DORA_BUFFERS * biggest_target * s if recipe.lora.use_dora else 0.0
    parts["gathered"] = gathered

    # LoRA: fp32 master + fp32 grad + 2 AdamW moments, sharded (FSDP2 keeps all four per shard).
    if backend == "deepspeed":
        # bf16 working copy (sharded under ZeRO-3), bf16 grads (full under ZeRO-2) + fp32 partitions.
        stage3 = recipe.parallel.deepspeed.stage == 3
        working = lora_params * 2 * (1 / shard if stage3 else 2)
        state = 0 if optim_off else lora_params * 16 / world_size
        parts["lora"] = working + state
    else:
        parts["lora"] = 0.0 if optim_off else lora_params * 16 / shard

    tokens = micro_batch * recipe.data.seq_len
    per_layer_act = layer_activation_bytes_per_token(shape, recipe) * tokens
    if recipe.model.attn_implementation == "eager":
        per_layer_act += EAGER_SCORE_BYTES * shape.heads * micro_batch * recipe.data.seq_len**2
    if checkpointing:
        # One hidden state per layer boundary is kept; in backward one layer at a time is recomputed
        # with its full saved set.
        act = L * tokens * h * s + per_layer_act
    else:
        act = L * per_layer_act
    act += HIDDEN_GRAD_BUFFERS * tokens * h * s
    act += ROOT_BYTES_PER_TOKEN_HIDDEN * tokens * h
    if recipe.data.packing:
        act += micro_batch * recipe.data.seq_len**2  # boolean block-causal mask for packed documents
    parts["activations"] = act
    chunk = min(loss_chunk_tokens(v, shape.softcap), tokens)
    # Split over the vocabulary, a chunk is world x as many tokens over 1/world of the vocabulary: the same.
    parts["logits"] = (LOGIT_BYTES_PER_ELEMENT + (SOFTCAP_SLOPE_BYTES if shape.softcap else 0)) * chunk * v
    if vocab_split:  # every rank's hidden states (compute dtype) and their fp32 input-gradient partial sums
        parts["logits"] += shard * tokens * h * (s + 4)

    parts["allocator"] = ALLOCATOR_SLACK * sum(parts.values())
    parts["cuda_nccl"] = CUDA_CONTEXT_BYTES + (NCCL_BYTES if world_size > 1 else 0)

    if weights_off or optim_off:
        notes.append("offloaded parameters/optimizer state need host memory instead")
    if backend == "deepspeed":
        notes.append(
            "DeepSpeed is estimated with the FSDP model; its own buffers are not modelled (ZeRO-3, 8B shapes, "
            "2 GPUs, batch 2: measured 19.4 GiB against an estimate of 11.3; bench/RESULTS.md)"
        )
    return Estimate({k: int(round(val)) for k, val in parts.items()}, int(gpu_memory), setup, notes, L)


def relative_step_time(micro_batch: int, checkpointing: bool, regather_tokens: float = 0.0) -> float:
    """Time per sequence relative to an ideal kernel, for ranking settings (lower is faster).

    `regather_tokens`: sequence tokens per micro-step; > 0 when FSDP gathers each layer again for backward
    (sharded, resharding after forward), which costs about REGATHER_TOKENS tokens' worth of compute."""
    regather = 1 + REGATHER_TOKENS / (micro_batch * regather_tokens) if regather_tokens else 1.0
    return (1 + MICRO_STEP_OVERHEAD / micro_batch) * (RECOMPUTE_COST if checkpointing else 1.0) * regather


def micro_batch_candidates(global_batch: int, world_size: int) -> list[int]:
    """Micro-batches that split the global batch exactly over the ranks (ascending)."""
    per_rank, rem = divmod(global_batch, world_size)
    if rem or per_rank == 0:
        return [1]
    return [m for m in range(1, min(per_rank, MAX_AUTO_MICRO_BATCH) + 1) if per_rank % m == 0]


def choose(
    recipe: Recipe,
    shape: ModelShape,
    world_size: int,
    gpu_memory: int = DEFAULT_GPU_MEMORY,
    nproc_per_node: int | None = None,
) -> Estimate:
    """The fastest (micro_batch, checkpointing) that fits, resolving only the settings that are 'auto'.

    When nothing fits, the smallest-memory setting is returned (its estimate says it does not fit).
    """
    t = recipe.train
    mbs = micro_batch_candidates(t.global_batch, world_size) if t.micro_batch == "auto" else [int(t.micro_batch)]
    cks = [False, True] if t.gradient_checkpointing == "auto" else [bool(t.gradient_checkpointing)]
    fs = recipe.parallel.fsdp
    recipes = [recipe]
    if recipe.parallel.backend == "fsdp" and fs.reshard_after_forward == "auto":
        keeps = [False] if fs.cpu_offload else [False, True]
        recipes = [with_fsdp(recipe, reshard_after_forward=not keep) for keep in keeps]
    options = [
        estimate(r, shape, world_size, mb, ck, gpu_memory, nproc_per_node) for r in recipes for mb in mbs for ck in cks
    ]
    fitting = [e for e in options if e.fits]

    def speed(e: Estimate) -> tuple[float, int, bool]:
        su = e.setup
        regathers = _fsdp_sharded(recipe, su) and not su.keep_gathered
        seq = recipe.data.seq_len if regathers else 0
        return relative_step_time(su.micro_batch, su.checkpointing, seq), -su.micro_batch, su.keep_gathered

    if fitting:
        return min(fitting, key=speed)
    return min(options, key=lambda e: e.total)


def with_fsdp(recipe: Recipe, **update: Any) -> Recipe:
    """The recipe with these parallel.fsdp keys replaced."""
    p = recipe.parallel
    fsdp = p.fsdp.model_copy(update=update)
    return recipe.model_copy(update={"parallel": p.model_copy(update={"fsdp": fsdp})})
