"""Recipe schema and cross-field validation (reading TOML and --set overrides: recipe_file).

A recipe is a TOML file validated into frozen pydantic models with `extra="forbid"`. The field
descriptions are the documentation: `qlaunch explain KEY` prints them.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    field_validator,
    model_validator,
)

from launcher.plan.chat_templates import NAMED, TOKENIZER, is_named_or_file
from launcher.plan.eval_samples import SamplesConfig
from launcher.plan.limits import (
    MAX_DATASET_WEIGHT,
    MAX_EPOCHS,
    MAX_GLOBAL_BATCH,
    MAX_GPU_MEMORY_GB,
    MAX_GPUS_PER_NODE,
    MAX_MICRO_BATCH,
    MAX_NODES,
    MAX_SEQ_LEN,
    MAX_STEPS,
    SEED_LIMIT,
)
from launcher.plan.recipe_types import Beta, Bool, Float, Int, PathText, Section, short_value, toml_integer

DType = Literal["bfloat16", "float16", "float32"]


# Run names become a directory under log.runs_dir: one plain path component, never '.', '..' or hidden.
RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")

# A multi-node run's node watch listens on master_port + 1 (spawn.WATCH_PORT_OFFSET), which must be a port too.
MAX_MULTINODE_MASTER_PORT = 65534


def is_jinja_template(text: str) -> bool:
    """Whether a chat template value is Jinja text at all (a template name such as 'chatml' is not)."""
    return "{{" in text or "{%" in text


class ModelConfig(Section):
    path: PathText = Field(
        description="Local Hugging Face model directory (config.json + *.safetensors), a directory written "
        "by `qlaunch quantize`, or a hub id (resolved through the huggingface_hub cache)."
    )
    init: Literal["pretrained", "random"] = Field(
        "pretrained",
        description="'pretrained' loads weights from `path`; 'random' builds the architecture from its "
        "config only and each rank generates its own slice from a seeded generator (a rehearsal mode "
        "to check memory and speed before downloading weights).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    dtype: DType = Field("bfloat16", description="Dtype of the non-quantized frozen weights (norms, embeddings).")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel passed to transformers."
    )
    trust_remote_code: Bool = Field(
        False, description="Allow model code from the checkpoint's repository to run (off by default)."
    )
    tokenizer: PathText | None = Field(None, description="Tokenizer path or hub id; defaults to `model.path`.")


class QuantConfig(Section):
    bits: Annotated[Literal[4, 8, "none"], BeforeValidator(toml_integer)] = Field(
        4,
        description="4 = bitsandbytes NF4/FP4 (QLoRA); 8 = LLM.int8 (bitsandbytes Linear8bitLt, outlier threshold "
        "6.0; replicated weights only: parallel.backend 'none' or DeepSpeed stage 2); 'none' = plain LoRA on the "
        "dtype weights.",
    )
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: Bool = Field(True, description="Quantize the per-block scales again (saves ~0.4 bit/param).")
    blocksize: Annotated[Literal[32, 64, 128, 256], BeforeValidator(toml_integer)] = Field(
        64, description="Elements per quantization block."
    )
    compute_dtype: DType = Field(
        "bfloat16", description="Dtype in which the 4-bit weights are dequantized and matmuls run."
    )
    storage_dtype: DType = Field(
        "bfloat16",
        description="Dtype of the tensor that stores the packed 4-bit bytes. FSDP shards and all-gathers it as "
        "this dtype, so it must equal the dtype FSDP computes in (`quant.compute_dtype`).",
    )
    skip_modules: list[str] = Field(["lm_head"], description="Linear layers (by name suffix) that stay unquantized.")


class LoraConfig(Section):
    rank: Int = Field(16, ge=1, le=1024, description="LoRA rank r.")
    alpha: Float = Field(32.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: Float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: Literal["all-linear"] | Annotated[list[str], Field(min_length=1)] = Field(
        "all-linear",
        description="'all-linear' (every linear layer of the decoder, not lm_head) or a list of module name suffixes.",
    )
    use_dora: Bool = Field(
        False,
        description="Weight-decomposed LoRA (DoRA): a trained magnitude per output row of each adapted linear; "
        "costs a whole-weight dequantize, B·A and row norms per adapted linear in every forward.",
    )
    init_seed: Int = Field(
        0, ge=0, lt=SEED_LIMIT, description="Seed of the LoRA A initialisation (identical on all ranks)."
    )
    train_router: Bool = Field(
        False,
        description="Mixture-of-experts models: train the router (the expert-choosing gate) beside the adapters; "
        "false keeps it frozen in compute dtype. true is not yet supported.",
    )


class DatasetSpec(Section):
    path: PathText = Field(
        description="A .jsonl/.json/.parquet/.csv/.arrow file, a directory written by Dataset.save_to_disk, a "
        "directory of data files, or a hub dataset name (org/name)."
    )
    weight: Float = Field(
        1.0,
        gt=0,
        le=MAX_DATASET_WEIGHT,
        description="How much of this dataset one epoch uses: 1 = every sample once, 2 = twice, 0.5 = a seeded "
        "half. Several datasets are mixed in proportion to weight x size, the same at any world size.",
    )
    split: str = Field("train", description="Split name for hub datasets and saved DatasetDicts (files have one).")


class DataConfig(Section):
    datasets: list[DatasetSpec] = Field(min_length=1, description="Training datasets (mixed by weight).")
    format: Literal["text", "alpaca", "chat", "tokenized", "preference"] = Field(
        "text",
        description="Record format. 'text': one string column, all tokens trained. 'alpaca': instruction, "
        "optional input, output, rendered as '### Instruction:\\n...\\n\\n### Input:\\n...\\n\\n### Response:\\n' "
        "+ output + EOS. 'chat': a list of {role, content} messages (roles system, user, assistant, tool) "
        "rendered with data.chat_template, else the tokenizer's chat template, else a ChatML-style default "
        "('<|im_start|>ROLE\\nCONTENT' + EOS per message). 'tokenized': input_ids and optional labels "
        "(-100 = no loss), used as they are. 'preference' (DPO/ORPO): prompt, chosen and rejected columns, "
        "either all strings (EOS appended to each completion that lacks it; tokenized with the tokenizer's own "
        "special tokens) or conversational (prompt a non-empty list of {role, content} messages, chosen and "
        "rejected the messages that follow it, rendered with the chat template as for 'chat'); tokenized as "
        "TRL 1.16's DPOTrainer does (the completions start where the tokenized prompt stops being a prefix of "
        "both tokenized prompt + completion). A pair is one document: prompt + chosen, then prompt + rejected, "
        "position ids restarting at 0 at both starts; only completion tokens are trained, never the first "
        "token of either sequence.",
    )
    text_column: str = Field("text", description="Column of `text` records.")
    instruction_column: str = Field("instruction", description="Instruction column of `alpaca` records.")
    input_column: str = Field("input", description="Optional input column of `alpaca` records.")
    output_column: str = Field("output", description="Response column of `alpaca` records.")
    messages_column: str = Field("messages", description="Column of `chat` records (list of {role, content}).")
    input_ids_column: str = Field("input_ids", description="Token ids column of `tokenized` records.")
    prompt_column: str = Field(
        "prompt", description="Prompt column of `preference` records (a string or a list of messages)."
    )
    chosen_column: str = Field(
        "chosen", description="Preferred completion column of `preference` records (a string or messages)."
    )
    rejected_column: str = Field(
        "rejected", description="Dispreferred completion column of `preference` records (a string or messages)."
    )
    labels_column: str = Field(
        "labels", description="Optional labels column of `tokenized` records (absent: train on every token)."
    )
    chat_template: str | None = Field(
        None,
        description="Chat template of `chat`/conversational `preference` records: a name (chatml, qwen, llama3, gemma, "
        "mistral, phi, phi4), 'tokenizer' (its own; the default if it has one), Jinja text, or a .jinja file of it.",
    )
    train_on_prompt: Bool = Field(
        False,
        description="Also train on prompt tokens (alpaca: the instruction part; chat: every message, not only "
        "the assistant's). Off: the loss covers responses only. Not for `preference` records, which train "
        "the completions only.",
    )
    seq_len: Int = Field(2048, ge=8, le=MAX_SEQ_LEN, description="Tokens per sample (packed or padded).")
    packing: Bool = Field(
        True,
        description="Pack several documents into each seq_len row (position ids restart per document and no "
        "token attends across a document boundary); off: one document per row, padded.",
    )
    overlong: Literal["truncate", "drop", "error"] = Field(
        "truncate",
        description="Samples longer than seq_len: 'truncate' keeps the first seq_len tokens, 'drop' skips "
        "them, 'error' stops with the file and line of the first one. A `preference` pair counts whole "
        "(2 x prompt P + chosen C + rejected R); 'truncate' owes the completions N = min(C + R, seq_len // 2): "
        "P stays whole if seq_len - 2P >= N, else keeps its last (seq_len - N) // 2 tokens (P'); the completions "
        "share B = seq_len - 2P', chosen keeps its first min(C, max(B // 2, B - R)) tokens and rejected its "
        "first min(R, B - chosen kept); a pair with no trained token in either completion is dropped.",
    )
    val_fraction: Float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Fraction of each training dataset carved off (fixed seed) as validation data, when "
        "val_path is not set.",
    )
    val_path: PathText | None = Field(
        None, description="Separate validation data (any form `datasets[].path` accepts); overrides val_fraction."
    )
    val_split: str = Field(
        "validation", description="Split of val_path for hub datasets and saved DatasetDicts (files have one)."
    )

    @model_validator(mode="after")
    def _preference(self) -> DataConfig:
        if self.format == "preference" and self.train_on_prompt:
            raise ValueError(
                "data.train_on_prompt = true has no meaning with data.format = 'preference' (a pair trains its "
                "completions only); remove it"
            )
        return self

    @field_validator("chat_template")
    @classmethod
    def _jinja(cls, template: str | None) -> str | None:
        if template is not None and not is_named_or_file(template) and not is_jinja_template(template):
            raise ValueError(
                f"data.chat_template = {short_value(template)}: neither a template name ({', '.join(NAMED)}, "
                f"{TOKENIZER!r}), a .jinja file, nor Jinja chat template text (with '{{{{' or '{{%')"
            )
        return template


class DPOConfig(Section):
    beta: Float = Field(
        0.1,
        gt=0.0,
        description="DPO's beta: the strength of the pull towards the reference (the base with the adapter off); "
        "rewards are beta x (log-prob under the policy - under the reference) of a completion.",
    )
    loss: Literal["sigmoid", "ipo", "robust"] = Field(
        "sigmoid",
        description="'sigmoid': the DPO paper's -log sigmoid(beta x log-ratio margin). 'ipo': (margin / tokens - "
        "1 / (2 beta))^2 with each completion's log-ratio averaged over its tokens (as TRL does). 'robust': "
        "sigmoid made unbiased under label_smoothing's flip rate e: [-(1-e) log s(beta m) + e log s(-beta m)] / "
        "(1 - 2e) (TRL's 'robust').",
    )
    label_smoothing: Float = Field(
        0.0,
        ge=0.0,
        lt=0.5,
        description="The assumed fraction of pairs whose preference is flipped, 0..0.5. With loss 'sigmoid': "
        "conservative DPO, -(1 - e) log sigmoid(beta m) - e log sigmoid(-beta m); with 'robust': its e.",
    )


class ORPOConfig(Section):
    odds_ratio_weight: Float = Field(
        0.1,
        gt=0.0,
        description="ORPO's lambda: the weight of the odds-ratio term beside the chosen completions' token-mean "
        "NLL (TRL's ORPOConfig.beta).",
    )


class TrainConfig(Section):
    objective: Literal["sft", "dpo", "orpo"] = Field(
        "sft",
        description="'sft': next-token cross-entropy on the labelled tokens. 'dpo': direct preference "
        "optimization against the frozen base (the adapter switched off: no second model is loaded). 'orpo': "
        "odds-ratio preference optimization (no reference). dpo and orpo need data.format = 'preference'; "
        "train.global_batch and micro_batch then count packed rows, each holding one or more whole pairs, and "
        "the loss is the mean over the global batch's pairs.",
    )
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="DPO settings (train.objective = 'dpo').")
    orpo: ORPOConfig = Field(default_factory=ORPOConfig, description="ORPO settings (train.objective = 'orpo').")
    max_steps: Int | None = Field(None, ge=1, le=MAX_STEPS, description="Optimizer steps to run (or give `epochs`).")
    epochs: Float | None = Field(
        None, gt=0, le=MAX_EPOCHS, description="Passes over the training data (if max_steps is not set)."
    )
    micro_batch: Int | Literal["auto"] = Field(
        1, description="Sequences per rank per forward pass (1..65536), or 'auto' (planner)."
    )
    global_batch: Int = Field(8, ge=1, le=MAX_GLOBAL_BATCH, description="Sequences per optimizer step over all ranks.")
    lr: Float = Field(2e-4, ge=0.0, description="Peak learning rate (0 is allowed: a parity check).")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    warmup_steps: Int = Field(0, ge=0, le=MAX_STEPS, description="Linear warmup steps.")
    min_lr_ratio: Float = Field(0.0, ge=0.0, le=1.0, description="Final lr as a fraction of the peak.")
    weight_decay: Float = Field(0.0, ge=0.0, description="AdamW weight decay on LoRA weights.")
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    grad_clip: Float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this (None = off).")
    gradient_checkpointing: Bool | Literal["auto"] = Field(True, description="Recompute decoder layers in backward.")
    compile: Bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile each decoder layer: fuses the norms, rotary, activation and LoRA "
        "arithmetic into fewer kernels and cuts per-layer host work (the 4-bit matmuls stay bitsandbytes'). "
        "'auto' = on for 4-bit models on GPUs (every backend; ZeRO-3 gathers each layer whole so that its "
        "forward holds no DeepSpeed hook), off on CPU (compiling there costs more than it saves in short runs) "
        "and with log.memory_steps.",
    )
    seed: Int = Field(0, ge=0, lt=SEED_LIMIT, description="Seed for data order and dropout.")
    eval_every: Int = Field(
        0, ge=0, le=MAX_STEPS, description="Run validation (and train.samples) every N steps (0 = never)."
    )
    samples: SamplesConfig = Field(
        default_factory=SamplesConfig,
        description="Prompts completed by the adapter at each evaluation and after the last step.",
    )

    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set train.max_steps or train.epochs")
        if isinstance(self.micro_batch, int) and not 1 <= self.micro_batch <= MAX_MICRO_BATCH:
            raise ValueError(f"train.micro_batch = {self.micro_batch}: must be 1..{MAX_MICRO_BATCH} or 'auto'")
        return self


class FSDPConfig(Section):
    reshard_after_forward: Bool | Literal["auto"] = Field(
        "auto",
        description="Free each gathered decoder layer after its forward and gather it again for backward (less "
        "memory; two all-gathers per layer and micro-step). false keeps every layer gathered from its forward "
        "to its backward (one all-gather; all layers whole at the end of forward). 'auto' = the planner keeps "
        "them when that fits the card and its speed model prefers it (measured on 4 H100s, 8B, batch 2: "
        "+11% tok/s/GPU; bench/RESULTS.md), else frees them; always frees with cpu_offload.",
    )
    cpu_offload: Bool = Field(
        False, description="Keep sharded parameters and optimizer state in host memory (GPU runs only)."
    )
    hybrid: Bool = Field(False, description="Shard within a node, replicate across nodes (HSDP).")


class DeepSpeedConfig(Section):
    stage: Annotated[Literal[2, 3], BeforeValidator(toml_integer)] = Field(
        3,
        description="ZeRO stage: 2 partitions optimizer state and gradients (every rank holds the whole frozen "
        "4-bit model); 3 also partitions the parameters, 4-bit weights included.",
    )
    offload_optimizer: Bool = Field(False, description="Keep optimizer state in host memory.")
    offload_params: Bool = Field(False, description="Keep parameters in host memory (stage 3 only).")
    persistence_threshold: Int = Field(
        100_000,
        ge=0,
        description="Stage 3: parameters with at most this many elements are not re-partitioned after use; every "
        "rank keeps them whole (DeepSpeed's stage3_param_persistence_threshold, default 1e5). 0 partitions all.",
    )


class ParallelConfig(Section):
    backend: Literal["fsdp", "deepspeed", "none"] = Field(
        "fsdp",
        description="'fsdp' (FSDP2 fully_shard), 'deepspeed' (ZeRO), or 'none' (single process, no wrapping).",
    )
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig, description="FSDP2 options.")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="DeepSpeed options.")


class CheckpointConfig(Section):
    every_steps: Int = Field(
        0,
        ge=0,
        le=MAX_STEPS,
        description="Save a sharded checkpoint every N steps and after the last (0 = none on "
        "a schedule; a preemption still saves one, and checkpoint.save_final_adapter exports the adapter).",
    )
    keep_last: Int = Field(2, ge=1, description="Complete checkpoints to keep.")
    save_final_adapter: Bool = Field(True, description="Export the PEFT adapter at the end of training.")


class LaunchConfig(Section):
    gpus: Int = Field(
        1,
        ge=1,
        le=MAX_GPUS_PER_NODE,
        description="Ranks per node (GPUs, or CPU processes on a machine without CUDA).",
    )
    nnodes: Int = Field(1, ge=1, le=MAX_NODES, description="Number of nodes.")
    max_restarts: Int = Field(0, ge=0, description="Elastic restarts of the whole worker group after a failure.")
    master_port: Int = Field(
        29500,
        ge=1,
        le=65535,
        description="Rendezvous port of a multi-node run (node 0's; one node picks a free one itself).",
    )
    gpu_memory_gb: Float | None = Field(
        None,
        ge=1,  # below a GiB the cap would round to nothing (no card is that small)
        le=MAX_GPU_MEMORY_GB,
        description="Cap each rank's GPU memory at this many GiB (torch's allocator, through "
        "torch.cuda.set_per_process_memory_fraction) and plan for a card of that size: rehearse a smaller "
        "card on a bigger one. None = the whole card.",
    )


class LogConfig(Section):
    every_steps: Int = Field(1, ge=1, le=MAX_STEPS, description="Write a metrics line every N steps.")
    runs_dir: PathText = Field("runs", description="Where run directories are created.")
    tensorboard: Bool = Field(False, description="Also write TensorBoard event files (needs tensorboard).")
    wandb: Bool = Field(False, description="Also log to Weights & Biases (offline works without network).")
    profile_steps: tuple[Int, Int] | None = Field(
        None,
        description="Run the torch profiler over steps [first, last] (1-based, inclusive) and write "
        "profile/rank<R>.txt (GPU busy time, device time by kernel kind, top operators) and rank 0's trace.",
    )

    memory_steps: tuple[Int, Int] | None = Field(
        None,
        description="Record the GPU allocator's history over steps [first, last] (1-based, inclusive) and write "
        "profile/memory-rank<R>.txt (the peak and what was live at it, by allocation site) and rank 0's "
        "snapshot (profile/memory-rank0.pickle, for pytorch.org/memory_viz). GPUs only.",
    )

    @model_validator(mode="after")
    def _profile(self) -> LogConfig:
        for key in ("profile_steps", "memory_steps"):
            steps = getattr(self, key)
            if steps is not None and not 1 <= steps[0] <= steps[1] <= MAX_STEPS:
                raise ValueError(
                    f"log.{key} = [{steps[0]}, {steps[1]}]: need 1 <= first <= last <= {MAX_STEPS} (1-based step "
                    "numbers)"
                )
        return self


class Recipe(Section):
    name: str = Field(
        description="Run name; the run directory is runs/<name>/<timestamp>/. Letters, digits, '.', '_' and '-' "
        "(not first: '.'), at most 128 characters."
    )
    model: ModelConfig
    quant: QuantConfig = Field(default_factory=QuantConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig
    train: TrainConfig
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @field_validator("name")
    @classmethod
    def _run_name(cls, name: str) -> str:
        if not RUN_NAME.fullmatch(name):
            raise ValueError(
                f"name = {short_value(name)}: a run name is one directory name: 1-128 letters, digits, '.', '_' or "
                "'-', not starting with '.'"
            )
        return name

    @model_validator(mode="after")
    def _cross(self) -> Recipe:
        q, p = self.quant, self.parallel
        if q.bits == 4 and q.storage_dtype != q.compute_dtype and p.backend in ("fsdp", "deepspeed"):
            raise ValueError(
                f"quant.storage_dtype = {q.storage_dtype!r} but {p.backend} shards parameters as "
                f"{q.compute_dtype!r} (quant.compute_dtype); set quant.storage_dtype = {q.compute_dtype!r}"
            )
        if q.bits == 8 and (p.backend == "fsdp" or (p.backend == "deepspeed" and p.deepspeed.stage == 3)):
            raise ValueError(
                "quant.bits = 8 cannot be sharded by "
                + ("FSDP" if p.backend == "fsdp" else "ZeRO-3")
                + " (LLM.int8 weights carry row scales that break when split); use quant.bits = 4, "
                "or parallel.backend = 'deepspeed' with parallel.deepspeed.stage = 2"
            )
        if self.launch.nnodes > 1 and self.launch.master_port > MAX_MULTINODE_MASTER_PORT:
            raise ValueError(
                f"launch.master_port = {self.launch.master_port}: a multi-node run's node watch listens on "
                f"master_port + 1, so the port must be 1..{MAX_MULTINODE_MASTER_PORT}"
            )
        if p.deepspeed.offload_params and p.deepspeed.stage != 3 and p.backend == "deepspeed":
            raise ValueError("parallel.deepspeed.offload_params needs parallel.deepspeed.stage = 3")
        preference(self)
        if self.log.memory_steps is not None and self.train.compile is True:
            raise ValueError(
                "log.memory_steps cannot record compiled layers (torch's allocator history breaks compiled, "
                "checkpointed layers: their backward fails with 'returned NULL without setting an exception'); "
                "set train.compile = false or 'auto' (which then compiles nothing)"
            )
        return self


def preference(recipe: Recipe) -> None:
    """The objective and the data format belong together; settings of an objective that does not run are a
    mistake (a DPO beta under ORPO would silently do nothing)."""
    t, fmt = recipe.train, recipe.data.format
    if t.objective == "sft" and fmt == "preference":
        raise ValueError(
            "data.format = 'preference' holds chosen/rejected pairs: set train.objective = 'dpo' or 'orpo'"
        )
    if t.objective != "sft" and fmt != "preference":
        raise ValueError(
            f"train.objective = {t.objective!r} trains on chosen/rejected pairs: set data.format = 'preference' "
            f"(rows with prompt, chosen, rejected); data.format is {fmt!r}"
        )
    # Compared with the defaults, not model_fields_set: a run directory's recipe.json holds every key.
    for section, default in (("dpo", DPOConfig()), ("orpo", ORPOConfig())):
        if getattr(t, section) != default and t.objective != section:
            raise ValueError(
                f"train.{section} is set but train.objective = {t.objective!r}; remove it or set train.objective "
                f"= {section!r}"
            )
    if t.objective == "dpo" and t.dpo.loss == "ipo" and t.dpo.label_smoothing:
        raise ValueError("train.dpo.label_smoothing applies to train.dpo.loss = 'sigmoid' or 'robust'; IPO has none")


def _all_keys(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the schema -> its FieldInfo (sections included)."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        out[key] = info
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(_all_keys(ann, key + "."))
    return out


SCHEMA_KEYS = _all_keys(Recipe)


def is_section(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def override_label(item: str) -> str:
    """How a message names an override: the flag it came from, else the --set item."""
    return getattr(item, "flag", None) or f"--set {short_value(str(item))}"


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return recipe.model_dump(mode="json")
