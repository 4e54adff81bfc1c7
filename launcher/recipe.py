"""Recipe schema, TOML loading, `--set` overrides, cross-field validation and friendly errors.

A recipe is a TOML file validated into frozen pydantic models with `extra="forbid"`. The field
descriptions are the documentation: `qlaunch explain KEY` prints them.
"""

from __future__ import annotations

import datetime
import difflib
import json
import os
import re
import stat
import tomllib
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from launcher.errors import RecipeError
from launcher.limits import (
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

DType = Literal["bfloat16", "float16", "float32"]


def _not_a_bool(value: Any) -> Any:
    # pydantic takes true as 1 for numbers; `gpus = true` or `lr = true` is a mistake, not 1.
    if isinstance(value, bool):
        raise PydanticCustomError("bool_for_number", "input should be a number, not true or false")
    return value


# A decimal number as someone would type it in quotes by mistake ("8", "1e-3"); not "nan" or "inf", which are
# words that happen to parse.
_NUMERAL = re.compile(r"\s*[+-]?(\d[\d_]*\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")


def _is_numeral(text: str) -> bool:
    return _NUMERAL.fullmatch(text) is not None


def _toml_integer(value: Any) -> Any:
    # TOML has integers and floats of their own; pydantic's lax mode would also take 1e3 (a float) and "8"
    # (a string) for an integer, so a typo such as `rank = 1e3` silently became rank 1000.
    _not_a_bool(value)
    if isinstance(value, float):
        hint = f" (write {int(value)})" if value.is_integer() and abs(value) < 1e18 else ""  # no 300-digit hint
        raise PydanticCustomError("int_from_float", "input should be an integer, not a float{hint}", {"hint": hint})
    if isinstance(value, str) and _is_numeral(value):
        raise PydanticCustomError(
            "number_in_quotes", "input should be an integer, not a string (write it without quotes)"
        )
    return value  # other strings: pydantic's own 'unable to parse' message


def _toml_number(value: Any) -> Any:
    _not_a_bool(value)
    if isinstance(value, str) and _is_numeral(value):
        raise PydanticCustomError(
            "number_in_quotes", "input should be a number, not a string (write it without quotes)"
        )
    return value


def _toml_bool(value: Any) -> Any:
    # pydantic's lax mode reads 1, "yes" or "on" as true: `trust_remote_code = 1` must not switch code on.
    if not isinstance(value, bool):
        raise PydanticCustomError("bool_type", "input should be true or false")
    return value


def _not_blank(text: str) -> str:
    # '' would resolve to the recipe's own directory (or the current one) and be reported as a model there.
    if not text.strip():
        raise PydanticCustomError("empty_path", "input should be a path, not an empty string")
    return text


Int = Annotated[int, BeforeValidator(_toml_integer)]
Float = Annotated[float, BeforeValidator(_toml_number)]
Bool = Annotated[bool, BeforeValidator(_toml_bool)]
PathText = Annotated[str, AfterValidator(_not_blank)]
# Adam's moment decay rates: 1 would never forget, and a rate outside [0, 1) diverges.
Beta = Annotated[Float, Field(ge=0.0, lt=1.0)]
# Run names become a directory under log.runs_dir: one plain path component, never '.', '..' or hidden.
RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
# A multi-node run's node watch listens on master_port + 1 (spawn.WATCH_PORT_OFFSET), which must be a port too.
MAX_MULTINODE_MASTER_PORT = 65534


def is_jinja_template(text: str) -> bool:
    """Whether a chat template value is Jinja text at all (a template name such as 'chatml' is not)."""
    return "{{" in text or "{%" in text


def _short(value: Any, limit: int = 80) -> str:
    """repr of a recipe value (booleans, dates and times as TOML writes them), cut to fit a one-line message."""
    if isinstance(value, bool):
        shown = "true" if value else "false"
    elif isinstance(value, datetime.date | datetime.time):
        shown = value.isoformat()  # `lr = 1979-05-27` is a TOML date; datetime.date(1979, 5, 27) is Python's
    else:
        shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


class _Section(BaseModel):
    # allow_inf_nan=False: inf/nan (TOML's inf, nan, and 1e400, which overflows to inf) in any float field
    # would train to NaN or crash the ranks; they are refused where the recipe is validated.
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True, allow_inf_nan=False)


class ModelConfig(_Section):
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


class QuantConfig(_Section):
    bits: Annotated[Literal[4, 8, "none"], BeforeValidator(_toml_integer)] = Field(
        4,
        description="4 = bitsandbytes NF4/FP4 (QLoRA); 8 = LLM.int8 (bitsandbytes Linear8bitLt, outlier threshold "
        "6.0; replicated weights only: parallel.backend 'none' or DeepSpeed stage 2); 'none' = plain LoRA on the "
        "dtype weights.",
    )
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: Bool = Field(True, description="Quantize the per-block scales again (saves ~0.4 bit/param).")
    blocksize: Annotated[Literal[32, 64, 128, 256], BeforeValidator(_toml_integer)] = Field(
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


class LoraConfig(_Section):
    rank: Int = Field(16, ge=1, le=1024, description="LoRA rank r.")
    alpha: Float = Field(32.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: Float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: Literal["all-linear"] | Annotated[list[str], Field(min_length=1)] = Field(
        "all-linear",
        description="'all-linear' (every linear layer of the decoder, not lm_head) or a list of module name suffixes.",
    )
    use_dora: Bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    init_seed: Int = Field(
        0, ge=0, lt=SEED_LIMIT, description="Seed of the LoRA A initialisation (identical on all ranks)."
    )


class DatasetSpec(_Section):
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


class DataConfig(_Section):
    datasets: list[DatasetSpec] = Field(min_length=1, description="Training datasets (mixed by weight).")
    format: Literal["text", "alpaca", "chat", "tokenized"] = Field(
        "text",
        description="Record format. 'text': one string column, all tokens trained. 'alpaca': instruction, "
        "optional input, output, rendered as '### Instruction:\\n...\\n\\n### Input:\\n...\\n\\n### Response:\\n' "
        "+ output + EOS. 'chat': a list of {role, content} messages (roles system, user, assistant, tool) "
        "rendered with data.chat_template, else the tokenizer's chat template, else a ChatML-style default "
        "('<|im_start|>ROLE\\nCONTENT' + EOS per message). 'tokenized': input_ids and optional labels "
        "(-100 = no loss), used as they are.",
    )
    text_column: str = Field("text", description="Column of `text` records.")
    instruction_column: str = Field("instruction", description="Instruction column of `alpaca` records.")
    input_column: str = Field("input", description="Optional input column of `alpaca` records.")
    output_column: str = Field("output", description="Response column of `alpaca` records.")
    messages_column: str = Field("messages", description="Column of `chat` records (list of {role, content}).")
    input_ids_column: str = Field("input_ids", description="Token ids column of `tokenized` records.")
    labels_column: str = Field(
        "labels", description="Optional labels column of `tokenized` records (absent: train on every token)."
    )
    chat_template: str | None = Field(
        None,
        description="Jinja chat template text for `chat` records (with {{ ... }} / {% ... %}), overriding the "
        "tokenizer's own.",
    )
    train_on_prompt: Bool = Field(
        False,
        description="Also train on prompt tokens (alpaca: the instruction part; chat: every message, not only "
        "the assistant's). Off: the loss covers responses only.",
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
        "them, 'error' stops with the file and line of the first one.",
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

    @field_validator("chat_template")
    @classmethod
    def _jinja(cls, template: str | None) -> str | None:
        if template is not None and not is_jinja_template(template):
            raise ValueError(
                f"data.chat_template = {_short(template)}: not a Jinja chat template (no '{{{{' or '{{%'); give "
                "the template text itself (named templates are not supported), or leave it unset to use the "
                "tokenizer's template"
            )
        return template


class TrainConfig(_Section):
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
    eval_every: Int = Field(0, ge=0, le=MAX_STEPS, description="Run validation every N steps (0 = never).")

    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set train.max_steps or train.epochs")
        if isinstance(self.micro_batch, int) and not 1 <= self.micro_batch <= MAX_MICRO_BATCH:
            raise ValueError(f"train.micro_batch = {self.micro_batch}: must be 1..{MAX_MICRO_BATCH} or 'auto'")
        return self


class FSDPConfig(_Section):
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


class DeepSpeedConfig(_Section):
    stage: Annotated[Literal[2, 3], BeforeValidator(_toml_integer)] = Field(
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


class ParallelConfig(_Section):
    backend: Literal["fsdp", "deepspeed", "none"] = Field(
        "fsdp",
        description="'fsdp' (FSDP2 fully_shard), 'deepspeed' (ZeRO), or 'none' (single process, no wrapping).",
    )
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig, description="FSDP2 options.")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="DeepSpeed options.")


class CheckpointConfig(_Section):
    every_steps: Int = Field(
        0, ge=0, le=MAX_STEPS, description="Save a sharded checkpoint every N steps (0 = only at the end)."
    )
    keep_last: Int = Field(2, ge=1, description="Complete checkpoints to keep.")
    save_final_adapter: Bool = Field(True, description="Export the PEFT adapter at the end of training.")


class LaunchConfig(_Section):
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


class LogConfig(_Section):
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


class Recipe(_Section):
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
                f"name = {_short(name)}: a run name is one directory name: 1-128 letters, digits, '.', '_' or "
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
        if self.log.memory_steps is not None and self.train.compile is True:
            raise ValueError(
                "log.memory_steps cannot record compiled layers (torch's allocator history breaks compiled, "
                "checkpointed layers: their backward fails with 'returned NULL without setting an exception'); "
                "set train.compile = false or 'auto' (which then compiles nothing)"
            )
        return self


# ---------------------------------------------------------------- loading & errors


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


def _is_section(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _section_of(key: str, through_lists: bool = False) -> type[BaseModel] | None:
    """The section model at a dotted key; with through_lists also the item model of a list of sections
    (data.datasets -> DatasetSpec)."""
    model: type[BaseModel] = Recipe
    for part in key.split(".") if key else []:
        info = model.model_fields.get(part)
        if info is None:
            return None
        found = [a for a in (info.annotation, *(get_args(info.annotation) if through_lists else ())) if _is_section(a)]
        if not found:
            return None
        model = found[0]
    return model


def suggest(key: str, shown_parent: str | None = None) -> str:
    """' (did you mean X?)' for an unknown dotted key, using its siblings first. shown_parent: the parent
    as the message shows it (data.datasets[0]), when the key lies inside a list."""
    parent, _, leaf = key.rpartition(".")
    section = _section_of(parent, through_lists=True)
    if section is not None:
        close = difflib.get_close_matches(leaf, list(section.model_fields), n=1, cutoff=0.5)
        if close:
            prefix = parent if shown_parent is None else shown_parent
            return f" (did you mean {(prefix + '.') if prefix else ''}{close[0]}?)"
    close = difflib.get_close_matches(key, list(SCHEMA_KEYS), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _key_line(text: str, loc: tuple[Any, ...]) -> int | None:
    """Best-effort line number of a dotted key in TOML text (for error messages)."""
    parts = [str(p) for p in loc if not isinstance(p, int)]
    if not parts:
        return None
    header = None
    lines = text.splitlines()
    leaf = parts[-1]
    for i in range(len(parts) - 1, -1, -1):
        section = ".".join(parts[:i])
        rest = parts[i:]
        cur = ""
        for n, raw in enumerate(lines, 1):
            s = raw.strip()
            m = re.match(r"^\[\[?\s*([^\]]+?)\s*\]\]?", s)
            if m:
                cur = m.group(1).replace(" ", "")
                if cur == ".".join(parts) and header is None:
                    header = n
                continue
            dotted = ".".join(rest)
            if cur == section and re.match(rf"^{re.escape(dotted)}\s*=", s):
                return n
            if cur == section and re.match(rf"^{re.escape(leaf)}\s*=", s) and len(rest) == 1:
                return n
    return header


# A cross-field check reports at its section; its message starts with the key it is about.
_LEADING_KEY = re.compile(r"[a-z_]+(?:\.[a-z_]+)+")


def _field_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """loc up to the recipe field it is about: pydantic adds a union member's name after the field
    (('train', 'micro_batch', 'int'), ('lora', 'target_modules', "literal['all-linear']"))."""
    model: type[BaseModel] | None = Recipe
    out: list[Any] = []
    for p in loc:
        if isinstance(p, int):
            out.append(p)
            continue
        if model is None or p not in model.model_fields:
            break
        out.append(p)
        ann = model.model_fields[p].annotation
        args = get_args(ann)
        # A section, or a list of sections (data.datasets): the next names are its fields; otherwise a leaf.
        model = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return tuple(out)


def _error_loc(e: dict[str, Any]) -> tuple[Any, ...]:
    loc = tuple(p for p in e["loc"] if p not in ("function-after", "tagged-union"))
    if e["type"] != "extra_forbidden":  # an unknown key is not in the schema: keep it whole
        loc = _field_loc(loc)
    if e["type"] == "value_error":
        m = _LEADING_KEY.match(str(e.get("ctx", {}).get("error", e["msg"])))
        section = [str(p) for p in loc if not isinstance(p, int)]
        if m and m.group(0) in SCHEMA_KEYS and m.group(0).split(".")[: len(section)] == section:
            return tuple(m.group(0).split("."))
    return loc


def _shown_key(loc: tuple[Any, ...]) -> str:
    """('data', 'datasets', 0, 'weight') -> 'data.datasets[0].weight'."""
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else ("." if out else "") + str(p)
    return out


class FlagOverride(str):
    """An override that a command-line flag stands for (`--gpus 4` is launch.gpus=4): messages name the flag."""

    flag: str

    def __new__(cls, item: str, flag: str) -> FlagOverride:
        self = super().__new__(cls, item)
        self.flag = flag
        return self


def _override_label(item: str) -> str:
    """How a message names an override: the flag it came from, else the --set item."""
    return getattr(item, "flag", None) or f"--set {_short(str(item))}"


def _override_for(loc: tuple[Any, ...], overrides: Sequence[str]) -> str | None:
    """The --set item that put the value at `loc` there (it set that key or a table above it); the last wins."""
    parts = [str(p) for p in loc if not isinstance(p, int)]
    for item in reversed(overrides):
        key = item.split("=", 1)[0].strip().split(".")
        if parts[: len(key)] == key:
            return item
    return None


def _format_validation(err: ValidationError, source: str, text: str | None, overrides: Sequence[str] = ()) -> str:
    errors = err.errors()
    e = errors[0]
    loc = _error_loc(e)
    key = ".".join(str(p) for p in loc if not isinstance(p, int))
    where = source
    item = _override_for(loc, overrides)
    if item is not None:
        where = _override_label(item)  # the value came from the command line, not from the file
    elif text is not None:
        # A key inside a list of tables (data.datasets[0].x, often an inline table) is found by its list's line.
        first_index = next((i for i, p in enumerate(loc) if isinstance(p, int)), len(loc))
        line = _key_line(text, loc) or (_key_line(text, loc[:first_index]) if first_index < len(loc) else None)
        if line:
            where = f"{source}:{line}"
    typ = e["type"]
    if typ == "extra_forbidden":
        return f"{where}: unknown key '{_shown_key(loc)}'{suggest(key, _shown_key(loc[:-1]))}"
    if typ == "missing" and loc and isinstance(loc[-1], int):  # a tuple such as train.betas given too few items
        return f"{where}: {_shown_key(loc)} is missing: {_shown_key(loc[:-1])} needs more items"
    if typ == "missing":
        info = SCHEMA_KEYS.get(key)
        doc = f" ({info.description})" if info is not None and info.description else ""
        return f"{where}: missing required key '{key}'{doc}"
    if typ == "value_error":
        msg = str(e.get("ctx", {}).get("error", e["msg"]))
        return f"{where}: {msg}"
    value = e.get("input")
    shown = _short(value) if not isinstance(value, dict) else "a table"
    # A value that fits no member of a union (int or 'auto', 'all-linear' or a list): what each would need.
    reasons = [x["msg"].lower() for x in errors if _error_loc(x) == loc and x["type"] not in ("missing", "value_error")]
    if typ == "finite_number":
        reasons = ["must be a finite number (inf and nan are not allowed)"]
    return f"{where}: {_shown_key(loc) or 'recipe'} = {shown}: {' or '.join(dict.fromkeys(reasons))}"


def _too_deep(value: Any, limit: int) -> bool:
    """Whether arrays/tables nest deeper than `limit` (checked without recursion, so depth cannot crash it)."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict | list):
            if depth >= limit:
                return True
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=2e-4' -> (['train', 'lr'], 0.0002). Values are TOML literals; bare words are strings."""
    label = _override_label(item)
    if "=" not in item:
        raise RecipeError(f"{label}: expected KEY=VALUE, e.g. --set train.lr=2e-4")
    key, raw = (s.strip() for s in item.split("=", 1))
    if not key or not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", key):
        raise RecipeError(f"{label}: bad key {_short(key)}; keys look like section.field")
    if key not in SCHEMA_KEYS:
        raise RecipeError(f"{label}: unknown key '{key}'{suggest(key)}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except RecursionError:
        raise RecipeError(f"{label}: the value nests arrays or tables too deeply") from None
    except tomllib.TOMLDecodeError:
        if re.fullmatch(r"[A-Za-z0-9_\-./:~][A-Za-z0-9_\-./:~+]*", raw) and raw not in ("true", "false"):
            value = raw  # a bare word such as a path or a backend name
        else:
            raise RecipeError(
                f"{label}: {_short(raw)} is not a TOML value (strings in quotes, e.g. --set model.path='\"x\"')"
            ) from None
    if _too_deep(value, MAX_NESTING):
        raise RecipeError(f"{label}: the value nests arrays or tables more than {MAX_NESTING} levels deep")
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = _deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        cur = out
        for part in path[:-1]:
            nxt = cur.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise RecipeError(f"--set {_short(item)}: '{part}' is not a table")
            cur = nxt
        cur[path[-1]] = value
    return out


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def validate(
    data: dict[str, Any], source: str = "<recipe>", text: str | None = None, overrides: Sequence[str] = ()
) -> Recipe:
    """The recipe model; an invalid value is one line naming the file and line, or the --set item it came from."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_validation(err, source, text, overrides)) from None


# A recipe is a few kilobytes (a long chat template, tens); the caps keep a wrong path or a crafted file
# from filling memory or recursing until Python's stack gives out (tomllib parses nesting recursively).
MAX_RECIPE_BYTES = 4 * 2**20
MAX_NESTING = 32


def _not_found(path: str | Path) -> RecipeError:
    hint = ""
    bundled = bundled_recipes()
    close = difflib.get_close_matches(Path(path).stem, [b.stem for b in bundled], n=1)
    if close:
        hint = f" (did you mean recipes/{close[0]}.toml?)"
    elif bundled:
        hint = " (bundled recipes: " + ", ".join(f"recipes/{b.name}" for b in bundled) + ")"
    return RecipeError(f"{path}: recipe file not found{hint}")


def _read_recipe_bytes(path: str | Path) -> bytes:
    """The bytes of a regular file of at most MAX_RECIPE_BYTES; one line naming the path otherwise."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer (forever).
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise _not_found(path) from None
    except IsADirectoryError:
        raise RecipeError(f"{path}: is a directory, not a recipe file (give a .toml file)") from None
    except OSError as err:
        raise RecipeError(f"{path}: cannot open the recipe ({err.strerror or type(err).__name__})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise RecipeError(f"{path}: is a directory, not a recipe file (give a .toml file)")
        if not stat.S_ISREG(st.st_mode):
            raise RecipeError(f"{path}: not a regular file (a FIFO, socket or device); give a recipe .toml file")
        chunks, size = [], 0
        while size <= MAX_RECIPE_BYTES and (chunk := os.read(fd, 1 << 20)):
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{path}: {st.st_size} bytes is too large for a recipe (at most {MAX_RECIPE_BYTES})")
        return b"".join(chunks)
    except OSError as err:
        raise RecipeError(f"{path}: cannot read the recipe ({err.strerror or type(err).__name__})") from None
    finally:
        os.close(fd)


def _toml_error(err: tomllib.TOMLDecodeError) -> str:
    """tomllib's message, without the characters of the file it quotes ("Illegal character '\\x00'")."""
    return re.sub(r"(character) (?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")", r"\1", str(err))


def read_toml(path: str | Path) -> tuple[dict[str, Any], str]:
    raw = _read_recipe_bytes(path)
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark some editors write
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise RecipeError(f"{path}:{line}: not UTF-8 text ({err.reason}); a recipe is a UTF-8 TOML file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        # tomllib puts "(at line L, column C)" at the end of its message.
        raise RecipeError(f"{path}: TOML syntax error: {_toml_error(err)}") from None
    except RecursionError:
        raise RecipeError(f"{path}: arrays or inline tables nest too deeply for a recipe") from None
    if _too_deep(data, MAX_NESTING):
        raise RecipeError(
            f"{path}: arrays or tables nest more than {MAX_NESTING} levels deep; no recipe key needs that"
        )
    return data, text


# Paths a recipe may name that are not local: hub ids look like org/name (huggingface_hub's form), and a
# dataset path with a data file's suffix is never one (data.FILE_KINDS).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow")
PATH_KEYS = ("model.path", "model.tokenizer", "data.datasets", "data.val_path")


def _set_on_command_line(key: str, overrides: list[str]) -> bool:
    """Whether a --set item set `key` or a table above it."""
    return any(key == k or key.startswith(k + ".") for k in (o.split("=", 1)[0].strip() for o in overrides))


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    data, text = read_toml(path)
    recipe_dir = Path(path).resolve().parent
    items = list(overrides or [])
    data = apply_overrides(data, items)
    recipe = validate(data, str(path), text, items)
    return resolve_paths(recipe, recipe_dir, {k for k in PATH_KEYS if _set_on_command_line(k, items)})


def resolve_path(s: str | None, base: Path, dataset: bool = False) -> str | None:
    """A local path made absolute against `base` only (the current directory is never tried unless it is
    base); absolute and ~ paths as they are. A relative path that does not exist under base and has the
    form of a hub id (org/name) stays as written: it is a hub id."""
    if s is None:
        return None
    p = Path(s).expanduser()
    if not p.is_absolute():
        candidate = base / p
        hub = HUB_ID.fullmatch(s) and not (dataset and p.suffix.lower() in DATA_FILE_SUFFIXES)
        if hub and not candidate.exists():
            return s
        p = candidate
    return str(p.resolve()) if p.exists() else os.path.normpath(p)


def resolve_paths(recipe: Recipe, base: Path, from_command_line: set[str] | frozenset[str] = frozenset()) -> Recipe:
    """Local paths become absolute so the run dir's copy works from anywhere.

    Relative paths written in the recipe file are relative to the recipe's directory (`base`); those given
    with --set (keys in `from_command_line`, of PATH_KEYS) to the current directory, where they were typed.
    """
    cwd = Path.cwd()

    def fix(key: str, s: str | None, dataset: bool = False) -> str | None:
        return resolve_path(s, cwd if key in from_command_line else base, dataset)

    m, d = recipe.model, recipe.data
    model = m.model_copy(update={"path": fix("model.path", m.path), "tokenizer": fix("model.tokenizer", m.tokenizer)})
    ds = [x.model_copy(update={"path": fix("data.datasets", x.path, True)}) for x in d.datasets]
    data = d.model_copy(update={"datasets": ds, "val_path": fix("data.val_path", d.val_path, True)})
    return recipe.model_copy(update={"model": model, "data": data})


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return recipe.model_dump(mode="json")


def dump_toml(recipe: Recipe) -> str:
    """The resolved recipe (every default filled in) as TOML."""
    return _to_toml(recipe_to_dict(recipe))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        # JSON's string escapes are valid TOML basic-string escapes (newlines in chat templates included);
        # TOML also wants DEL escaped.
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def _to_toml(d: dict[str, Any], prefix: str = "") -> str:
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    arrays: list[tuple[str, list[dict[str, Any]]]] = []
    for k, v in d.items():
        if v is None:
            lines.append(f"# {k} = (unset)")
        elif isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            arrays.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    out = "\n".join(lines)
    for k, items in arrays:
        for item in items:
            out += f"\n\n[[{prefix}{k}]]\n" + _to_toml(item, f"{prefix}{k}.")
    for k, v in tables:
        out += f"\n\n[{prefix}{k}]\n" + _to_toml(v, f"{prefix}{k}.")
    return out.strip("\n") + "\n"


def bundled_recipes() -> list[Path]:
    root = Path(__file__).resolve().parent.parent / "recipes"
    return sorted(root.glob("*.toml")) if root.is_dir() else []


def explain(key: str) -> str:
    """Documentation of one dotted key (or a whole section)."""
    if key not in SCHEMA_KEYS and key:
        raise RecipeError(f"unknown key '{key}'{suggest(key)}")
    section = _section_of(key)
    if section is not None:
        rows = [f"[{key}]" if key else "recipe"]
        for name, info in section.model_fields.items():
            rows.append(f"  {name}: {_describe(info)}")
        return "\n".join(rows)
    return f"{key}: {_describe(SCHEMA_KEYS[key])}"


def _bounds(info: Any) -> str:
    """'0 <= x < 2147483648' from a field's ge/gt/le/lt constraints ('' if it has none)."""
    low = high = ""
    for c in info.metadata:
        if getattr(c, "ge", None) is not None:
            low = f"{c.ge} <= "
        elif getattr(c, "gt", None) is not None:
            low = f"{c.gt} < "
        elif getattr(c, "le", None) is not None:
            high = f" <= {c.le}"
        elif getattr(c, "lt", None) is not None:
            high = f" < {c.lt}"
    return f"{low}x{high}" if low or high else ""


def _type_name(ann: Any) -> str:
    """'int | None', 'bool | Literal', 'tuple' for a field's annotation (validators and constraints left out)."""
    origin, args = get_origin(ann), get_args(ann)
    if origin is Annotated:
        return _type_name(args[0])
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if ann is type(None):
        return "None"
    return getattr(origin or ann, "__name__", None) or str(origin or ann).replace("typing.", "")


def _describe(info: Any) -> str:
    ann = _type_name(info.annotation)
    default = "required" if info.is_required() else f"default {info.get_default(call_default_factory=True)!r}"
    if isinstance(info.get_default(call_default_factory=True), BaseModel):
        default = "table"
    bounds = _bounds(info)
    return f"{info.description or ''} [{ann}; {default}{'; ' + bounds if bounds else ''}]"
