"""Recipe schema, TOML loading, `--set` overrides, cross-field validation and friendly errors.

A recipe is a TOML file validated into frozen pydantic models with `extra="forbid"`. The field
descriptions are the documentation: `qlaunch explain KEY` prints them.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from launcher.errors import RecipeError

DType = Literal["bfloat16", "float16", "float32"]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class ModelConfig(_Section):
    path: str = Field(
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
    trust_remote_code: bool = Field(
        False, description="Allow model code from the checkpoint's repository to run (off by default)."
    )
    tokenizer: str | None = Field(None, description="Tokenizer path or hub id; defaults to `model.path`.")


class QuantConfig(_Section):
    bits: Literal[4, 8, "none"] = Field(
        4,
        description="4 = bitsandbytes NF4/FP4 (QLoRA); 8 = LLM.int8 (bitsandbytes Linear8bitLt, outlier threshold "
        "6.0; replicated weights only: parallel.backend 'none' or DeepSpeed stage 2); 'none' = plain LoRA on the "
        "dtype weights.",
    )
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the per-block scales again (saves ~0.4 bit/param).")
    blocksize: Literal[32, 64, 128, 256] = Field(64, description="Elements per quantization block.")
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
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank r.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        description="'all-linear' (every linear layer of the decoder, not lm_head) or a list of module name suffixes.",
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    init_seed: int = Field(0, description="Seed of the LoRA A initialisation (identical on all ranks).")


class DatasetSpec(_Section):
    path: str = Field(
        description="A .jsonl/.json/.parquet/.csv/.arrow file, a directory written by Dataset.save_to_disk, a "
        "directory of data files, or a hub dataset name (org/name)."
    )
    weight: float = Field(
        1.0,
        gt=0,
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
        None, description="Jinja chat template for `chat` records, overriding the tokenizer's own."
    )
    train_on_prompt: bool = Field(
        False,
        description="Also train on prompt tokens (alpaca: the instruction part; chat: every message, not only "
        "the assistant's). Off: the loss covers responses only.",
    )
    seq_len: int = Field(2048, ge=8, description="Tokens per sample (packed or padded).")
    packing: bool = Field(
        True,
        description="Pack several documents into each seq_len row (position ids restart per document and no "
        "token attends across a document boundary); off: one document per row, padded.",
    )
    overlong: Literal["truncate", "drop", "error"] = Field(
        "truncate",
        description="Samples longer than seq_len: 'truncate' keeps the first seq_len tokens, 'drop' skips "
        "them, 'error' stops with the file and line of the first one.",
    )
    val_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Fraction of each training dataset carved off (fixed seed) as validation data, when "
        "val_path is not set.",
    )
    val_path: str | None = Field(
        None, description="Separate validation data (any form `datasets[].path` accepts); overrides val_fraction."
    )
    val_split: str = Field(
        "validation", description="Split of val_path for hub datasets and saved DatasetDicts (files have one)."
    )


class TrainConfig(_Section):
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run (or give `epochs`).")
    epochs: float | None = Field(None, gt=0, description="Passes over the training data (if max_steps is not set).")
    micro_batch: int | Literal["auto"] = Field(
        1, description="Sequences per rank per forward pass, or 'auto' (planner)."
    )
    global_batch: int = Field(8, ge=1, description="Sequences per optimizer step over all ranks.")
    lr: float = Field(2e-4, ge=0.0, description="Peak learning rate (0 is allowed: a parity check).")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Final lr as a fraction of the peak.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay on LoRA weights.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this (None = off).")
    gradient_checkpointing: bool | Literal["auto"] = Field(True, description="Recompute decoder layers in backward.")
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile each decoder layer: fuses the norms, rotary, activation and LoRA "
        "arithmetic into fewer kernels and cuts per-layer host work (the 4-bit matmuls stay bitsandbytes'). "
        "'auto' = on for 4-bit models on GPUs (every backend; ZeRO-3 gathers each layer whole so that its "
        "forward holds no DeepSpeed hook), off on CPU (compiling there costs more than it saves in short runs) "
        "and with log.memory_steps.",
    )
    seed: int = Field(0, description="Seed for data order and dropout.")
    eval_every: int = Field(0, ge=0, description="Run validation every N steps (0 = never).")

    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set train.max_steps or train.epochs")
        if isinstance(self.micro_batch, int) and self.micro_batch < 1:
            raise ValueError("train.micro_batch must be >= 1 or 'auto'")
        return self


class FSDPConfig(_Section):
    reshard_after_forward: bool | Literal["auto"] = Field(
        "auto",
        description="Free each gathered decoder layer after its forward and gather it again for backward (less "
        "memory; two all-gathers per layer and micro-step). false keeps every layer gathered from its forward "
        "to its backward (one all-gather; all layers whole at the end of forward). 'auto' = the planner keeps "
        "them when that fits the card and its speed model prefers it (measured on 4 H100s, 8B, batch 2: "
        "+11% tok/s/GPU; bench/RESULTS.md), else frees them; always frees with cpu_offload.",
    )
    cpu_offload: bool = Field(
        False, description="Keep sharded parameters and optimizer state in host memory (GPU runs only)."
    )
    hybrid: bool = Field(False, description="Shard within a node, replicate across nodes (HSDP).")


class DeepSpeedConfig(_Section):
    stage: Literal[2, 3] = Field(
        3,
        description="ZeRO stage: 2 partitions optimizer state and gradients (every rank holds the whole frozen "
        "4-bit model); 3 also partitions the parameters, 4-bit weights included.",
    )
    offload_optimizer: bool = Field(False, description="Keep optimizer state in host memory.")
    offload_params: bool = Field(False, description="Keep parameters in host memory (stage 3 only).")
    persistence_threshold: int = Field(
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
    every_steps: int = Field(0, ge=0, description="Save a sharded checkpoint every N steps (0 = only at the end).")
    keep_last: int = Field(2, ge=1, description="Complete checkpoints to keep.")
    save_final_adapter: bool = Field(True, description="Export the PEFT adapter at the end of training.")


class LaunchConfig(_Section):
    gpus: int = Field(1, ge=1, description="Ranks per node (GPUs, or CPU processes on a machine without CUDA).")
    nnodes: int = Field(1, ge=1, description="Number of nodes.")
    max_restarts: int = Field(0, ge=0, description="Elastic restarts of the whole worker group after a failure.")
    master_port: int = Field(29500, ge=1, le=65535, description="Rendezvous port (0 = pick a free one).")
    gpu_memory_gb: float | None = Field(
        None,
        gt=0,
        description="Cap each rank's GPU memory at this many GiB (torch's allocator, through "
        "torch.cuda.set_per_process_memory_fraction) and plan for a card of that size: rehearse a smaller "
        "card on a bigger one. None = the whole card.",
    )


class LogConfig(_Section):
    every_steps: int = Field(1, ge=1, description="Write a metrics line every N steps.")
    runs_dir: str = Field("runs", description="Where run directories are created.")
    tensorboard: bool = Field(False, description="Also write TensorBoard event files (needs tensorboard).")
    wandb: bool = Field(False, description="Also log to Weights & Biases (offline works without network).")
    profile_steps: tuple[int, int] | None = Field(
        None,
        description="Run the torch profiler over steps [first, last] (1-based, inclusive) and write "
        "profile/rank<R>.txt (GPU busy time, device time by kernel kind, top operators) and rank 0's trace.",
    )

    memory_steps: tuple[int, int] | None = Field(
        None,
        description="Record the GPU allocator's history over steps [first, last] (1-based, inclusive) and write "
        "profile/memory-rank<R>.txt (the peak and what was live at it, by allocation site) and rank 0's "
        "snapshot (profile/memory-rank0.pickle, for pytorch.org/memory_viz). GPUs only.",
    )

    @model_validator(mode="after")
    def _profile(self) -> LogConfig:
        for key in ("profile_steps", "memory_steps"):
            steps = getattr(self, key)
            if steps is not None and not 1 <= steps[0] <= steps[1]:
                raise ValueError(
                    f"log.{key} = [{steps[0]}, {steps[1]}]: need 1 <= first <= last (1-based step numbers)"
                )
        return self


class Recipe(_Section):
    name: str = Field(description="Run name; the run directory is runs/<name>/<timestamp>/.")
    model: ModelConfig
    quant: QuantConfig = Field(default_factory=QuantConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig
    train: TrainConfig
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    log: LogConfig = Field(default_factory=LogConfig)

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


def _section_of(key: str) -> type[BaseModel] | None:
    model: type[BaseModel] = Recipe
    for part in key.split(".") if key else []:
        info = model.model_fields.get(part)
        if info is None or not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)):
            return None
        model = info.annotation
    return model


def suggest(key: str) -> str:
    """' (did you mean X?)' for an unknown dotted key, using its siblings first."""
    parent, _, leaf = key.rpartition(".")
    section = _section_of(parent)
    if section is not None:
        close = difflib.get_close_matches(leaf, list(section.model_fields), n=1, cutoff=0.5)
        if close:
            return f" (did you mean {(parent + '.') if parent else ''}{close[0]}?)"
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


def _format_validation(err: ValidationError, source: str, text: str | None) -> str:
    e = err.errors()[0]
    loc = tuple(p for p in e["loc"] if p not in ("function-after", "tagged-union"))
    key = ".".join(str(p) for p in loc if not isinstance(p, int))
    where = source
    if text is not None:
        line = _key_line(text, loc)
        if line:
            where = f"{source}:{line}"
    typ = e["type"]
    if typ == "extra_forbidden":
        return f"{where}: unknown key '{key}'{suggest(key)}"
    if typ == "missing":
        info = SCHEMA_KEYS.get(key)
        doc = f" ({info.description})" if info is not None and info.description else ""
        return f"{where}: missing required key '{key}'{doc}"
    if typ == "value_error":
        msg = str(e.get("ctx", {}).get("error", e["msg"]))
        return f"{where}: {msg}"
    value = e.get("input")
    shown = repr(value) if not isinstance(value, dict) else "a table"
    return f"{where}: {key or 'recipe'} = {shown}: {e['msg'].lower()}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=2e-4' -> (['train', 'lr'], 0.0002). Values are TOML literals; bare words are strings."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=2e-4")
    key, raw = (s.strip() for s in item.split("=", 1))
    if not key or not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", key):
        raise RecipeError(f"--set {item!r}: bad key {key!r}; keys look like section.field")
    if key not in SCHEMA_KEYS:
        raise RecipeError(f"--set {item!r}: unknown key '{key}'{suggest(key)}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if re.fullmatch(r"[A-Za-z0-9_\-./:~][A-Za-z0-9_\-./:~+]*", raw) and raw not in ("true", "false"):
            value = raw  # a bare word such as a path or a backend name
        else:
            raise RecipeError(
                f"--set {item!r}: {raw!r} is not a TOML value (strings in quotes, e.g. --set model.path='\"x\"')"
            ) from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = _deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        cur = out
        for part in path[:-1]:
            nxt = cur.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise RecipeError(f"--set {item!r}: '{part}' is not a table")
            cur = nxt
        cur[path[-1]] = value
    return out


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def validate(data: dict[str, Any], source: str = "<recipe>", text: str | None = None) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_validation(err, source, text)) from None


def read_toml(path: str | Path) -> tuple[dict[str, Any], str]:
    p = Path(path)
    if not p.is_file():
        hint = ""
        bundled = bundled_recipes()
        close = difflib.get_close_matches(p.stem, [b.stem for b in bundled], n=1)
        if close:
            hint = f" (did you mean recipes/{close[0]}.toml?)"
        elif bundled:
            hint = " (bundled recipes: " + ", ".join(f"recipes/{b.name}" for b in bundled) + ")"
        raise RecipeError(f"{path}: recipe file not found{hint}")
    text = p.read_text()
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as err:
        # tomllib puts "(at line L, column C)" at the end of its message.
        raise RecipeError(f"{path}: TOML syntax error: {err}") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    data, text = read_toml(path)
    recipe_dir = Path(path).resolve().parent
    data = apply_overrides(data, overrides or [])
    recipe = validate(data, str(path), text)
    return resolve_paths(recipe, recipe_dir)


def _looks_local(s: str) -> bool:
    return s.startswith((".", "/", "~")) or "/" not in s or s.count("/") > 1


def resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    """Recipe-relative local paths become absolute so the run dir's copy works from anywhere.

    A path that exists relative to the current directory or the recipe's directory is local; anything
    else with one slash (org/name) is left alone as a hub id.
    """

    def fix(s: str | None) -> str | None:
        if s is None:
            return None
        for cand in (Path(s).expanduser(), base / s, base.parent / s):
            if cand.exists():
                return str(cand.resolve())
        return s

    model = recipe.model.model_copy(update={"path": fix(recipe.model.path), "tokenizer": fix(recipe.model.tokenizer)})
    ds = [d.model_copy(update={"path": fix(d.path)}) for d in recipe.data.datasets]
    data = recipe.data.model_copy(update={"datasets": ds, "val_path": fix(recipe.data.val_path)})
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


def _describe(info: Any) -> str:
    ann = getattr(info.annotation, "__name__", None) or str(info.annotation).replace("typing.", "")
    default = "required" if info.is_required() else f"default {info.get_default(call_default_factory=True)!r}"
    if isinstance(info.get_default(call_default_factory=True), BaseModel):
        default = "table"
    return f"{info.description or ''} [{ann}; {default}]"
