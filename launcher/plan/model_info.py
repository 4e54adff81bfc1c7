"""Facts about the model read from its config.json, without building it: the directory a recipe names,
the config's checks and size bounds, the decoder-layer class FSDP wraps, max positions, the shape the planner uses."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

from launcher.errors import UserError
from launcher.plan.recipe import Recipe
from launcher.safe_files import read_json_object


def decoder_layer_class(recipe: Recipe) -> str:
    """The decoder layer class name of the recipe's model (reads its config.json; not pure)."""
    config = load_config(recipe, resolve_model_dir(recipe))
    return causal_lm_class(config)._no_split_modules[0]


def causal_lm_class(config):
    """The class transformers builds for CONFIG as a causal LM (AutoModelForCausalLM's choice)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


# The families qlaunch's tests train (tiny configs, world 1 against world 2, lr=0), named in messages. Any
# other dense decoder-only causal LM of transformers is accepted too when preflight's structural checks and
# logit probe pass (launcher/launch/preflight.py).
TESTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "granite")

# Sizes the skeleton is built from: transformers accepts 0 or negative values for some and builds a
# model without layers, or fails deep inside torch with a negative dimension.
POSITIVE_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

# Upper bounds no real model reaches (Llama-3.1-405B: 126 layers, hidden 16384, intermediate 53248, 128 heads;
# Gemma 3: a 262,208-token vocabulary; Llama 4 Scout: 10M positions), so that a crafted config.json cannot make
# preflight build a skeleton of 100,000 layers (it hangs) or the planner count absurd bytes.
MAX_SIZES = {
    "vocab_size": 1 << 24,
    "hidden_size": 1 << 20,
    "intermediate_size": 1 << 20,
    "num_hidden_layers": 1024,
    "num_attention_heads": 4096,
    "num_key_value_heads": 4096,
    "head_dim": 1 << 16,
    "max_position_embeddings": 1 << 28,
}


def resolve_model_dir(recipe: Recipe) -> Path:
    """Local directory for the model's config/weights; hub ids go through huggingface_hub's cache.

    A relative path is never looked up in the current directory: the recipe made every local path absolute
    (relative to the recipe file, or to where `--set` was typed), so what is still relative is a hub id,
    and a planted ./org/name folder where qlaunch runs must not stand in for it."""
    p = Path(recipe.model.path).expanduser()
    if p.is_absolute() and p.exists():
        if not p.is_dir():
            raise UserError(
                f"model.path = {recipe.model.path!r}: not a directory (a model directory holds config.json "
                "and *.safetensors files)"
            )
        # lexists: a config.json that is a FIFO or a dangling link exists, and load_config says what it is.
        if not os.path.lexists(p / "config.json"):
            raise UserError(f"model.path = {recipe.model.path!r}: directory has no config.json")
        return p
    if recipe.model.path.count("/") == 1 and not recipe.model.path.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.model", "*.txt"]
        if recipe.model.init == "pretrained":
            patterns.append("*.safetensors")
        try:
            return Path(snapshot_download(recipe.model.path, revision=recipe.model.revision, allow_patterns=patterns))
        except Exception as err:  # network, auth, missing repo: all user-facing
            raise UserError(f"model.path = {recipe.model.path!r}: could not fetch from the hub ({err})") from None
    raise UserError(f"model.path = {recipe.model.path!r}: no such directory (and not a hub id of the form org/name)")


def load_config(recipe: Recipe, model_dir: Path):
    """The model's transformers config; anything wrong with config.json is one line naming it."""
    from transformers import AutoConfig

    path = model_dir / "config.json"
    raw = read_json_object(path, "model config")
    problem = config_dict_problem(raw, recipe.model.trust_remote_code) or quantization_problem(raw)
    if problem:
        raise UserError(f"{path}: {problem}")
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=recipe.model.trust_remote_code)
    except Exception as err:  # any refusal of a config file is bad input, not a crash
        raise UserError(f"{path}: transformers cannot load this config ({transformers_refusal(err)})") from None
    archs = list(getattr(config, "architectures", None) or [])
    remote = recipe.model.trust_remote_code and bool(getattr(config, "auto_map", None))
    problem = architecture_problem(config, archs, remote)
    if problem:
        raise UserError(f"{path}: {problem}")
    problem = config_size_problem(config)
    if problem:
        raise UserError(f"{path}: {problem}")
    return config


def architecture_problem(config, archs: list[str], remote: bool) -> str | None:
    """Why the config's architecture is not a causal LM transformers builds from its model_type, if not.

    transformers builds the model from model_type, not from architectures: a config whose architectures
    names another class would have another family's tensors expected (and reported missing)."""
    if not archs:
        return 'no architectures (a list such as ["LlamaForCausalLM"])'
    name = _identifier(archs[0]) or "(not a class name)"
    if remote:
        return None  # the repository's own code; preflight's structural checks still apply
    try:
        cls = causal_lm_class(config)
    except KeyError:
        return (
            f"architecture {name} (model_type {_identifier(config.model_type) or '?'}) is not a causal language "
            "model transformers can build; tested: " + ", ".join(TESTED_FAMILIES)
        )
    if archs[0].endswith("ForConditionalGeneration") or getattr(config, "vision_config", None) is not None:
        return (
            f"architecture {name} is a multimodal checkpoint (its text model is stored under another prefix); "
            "only text-only causal LM checkpoints are supported yet"
        )
    if cls.__name__ != archs[0]:
        return (
            f"model_type {config.model_type!r} does not match architectures = [{name!r}] "
            f"(model_type {config.model_type!r} builds {cls.__name__})"
        )
    return None


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Errors only from transformers' loggers: its warnings about a config quote the file's values (and
    would be a second line beside qlaunch's one-line error)."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _identifier(value: object) -> str | None:
    """VALUE if it is a short name such as `llama` or `LlamaForCausalLM` (safe to show), else None."""
    return value if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value) else None


def config_dict_problem(raw: dict, trust_remote_code: bool) -> str | None:
    """What makes a parsed config.json unloadable before transformers sees it (its messages quote values)."""
    from transformers import CONFIG_MAPPING

    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        return f"no model_type (a string such as {', '.join(map(repr, TESTED_FAMILIES[:4]))})"
    remote = trust_remote_code and "auto_map" in raw
    if model_type not in CONFIG_MAPPING and not remote:
        import transformers

        name = _identifier(model_type)
        return (
            f"model_type {name + ' ' if name else ''}is not an architecture transformers "
            f"{transformers.__version__} knows; tested: {', '.join(TESTED_FAMILIES)}"
        )
    archs = raw.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        return 'architectures must be a list of class names such as ["LlamaForCausalLM"]'
    return None


def quantization_config(config) -> dict | None:
    """config.json's quantization_config (from a transformers config or the parsed file), or None."""
    qc = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict) and hasattr(qc, "to_dict"):
        qc = qc.to_dict()
    return qc


def is_bnb_4bit(config) -> bool:
    """Whether CONFIG describes a bitsandbytes 4-bit checkpoint (load_config refused every other kind)."""
    qc = quantization_config(config)
    return isinstance(qc, dict) and qc.get("quant_method") == "bitsandbytes" and _flag(qc, "load_in_4bit")


def _flag(qc: dict, key: str) -> bool:
    # transformers' BitsAndBytesConfig.to_dict writes both KEY and _KEY (its private field).
    return qc.get(key) is True or qc.get("_" + key) is True


def quantized_as(config: dict) -> str:
    """How a config.json with a quantization_config says its weights are quantized, in words safe to show
    ('bitsandbytes nf4')."""
    qc = config["quantization_config"]
    if is_bnb_4bit(config):
        return f"bitsandbytes {_identifier(qc.get('bnb_4bit_quant_type')) or '4-bit'}"
    method = _identifier(qc.get("quant_method")) if isinstance(qc, dict) else None
    return f"quantization_config.quant_method = {method or '?'}"


def quantization_problem(raw: dict) -> str | None:
    """Why a config.json's quantization_config names weights qlaunch cannot load, or None (none, or a
    bitsandbytes 4-bit checkpoint, whose tensors open_source checks one by one)."""
    if "quantization_config" not in raw:
        return None
    qc = raw["quantization_config"]
    if not isinstance(qc, dict):
        return "quantization_config must be an object (as transformers writes it)"
    method = qc.get("quant_method")
    if method != "bitsandbytes":
        shown = _identifier(method) or "(not a name)"
        return (
            f"quantization_config.quant_method = {shown}: qlaunch loads only bitsandbytes 4-bit checkpoints "
            "(quantized weights of another method cannot be trained with bitsandbytes layers); set model.path "
            "to the unquantized model"
        )
    if _flag(qc, "load_in_8bit"):
        return (
            "a bitsandbytes 8-bit checkpoint (quantization_config.load_in_8bit = true) cannot be loaded yet; "
            "set model.path to the unquantized model and quant.bits = 8, or use a 4-bit checkpoint"
        )
    if not _flag(qc, "load_in_4bit"):
        return "quantization_config (bitsandbytes) has neither load_in_4bit nor load_in_8bit set to true"
    return None


def config_size_problem(config) -> str | None:
    """The sizes the skeleton is built from, checked (transformers lets some impossible ones through).

    CONFIG is a transformers config or a config.json dict (the memory planner reads the file itself)."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    for key in POSITIVE_SIZES:
        value = get(key)
        if type(value) is not int or value <= 0:
            return f"{key} must be a positive integer"
    heads = get("num_attention_heads")
    kv_heads = heads if get("num_key_value_heads") is None else get("num_key_value_heads")
    if type(kv_heads) is not int or kv_heads <= 0 or heads % kv_heads:
        return "num_key_value_heads must be a positive integer that divides num_attention_heads"
    for key in ("head_dim", "max_position_embeddings"):
        value = get(key)
        if value is not None and (type(value) is not int or value <= 0):
            return f"{key} must be a positive integer"
    for key, limit in MAX_SIZES.items():
        value = get(key)
        if type(value) is int and value > limit:  # the value itself is not shown: it comes from the file
            return f"{key} is larger than any real model's (at most {limit:,})"
    return None


def transformers_refusal(err: Exception) -> str:
    """Why transformers refused a config, naming no value from it.

    A strict-dataclass error's first line names the field or validator, and its next line the value; other
    messages may quote the file, so only their class is given."""
    from huggingface_hub.errors import StrictDataclassError

    first = str(err).strip().splitlines()[0].rstrip(":") if str(err).strip() else ""
    if isinstance(err, StrictDataclassError) and first:
        return first[:1].lower() + first[1:200]
    return f"{type(err).__name__}; compare it with the config.json of the same model on the hub"


def max_positions(config) -> int | None:
    """max_position_embeddings of the (text) model, if the config gives one."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return value if type(value) is int and value > 0 else None


def model_shape(rec, required: bool):
    """The model's shape for the memory planner (config.json only, no weights); None if unavailable
    and not required (preflight then reports why with its own message)."""
    from launcher.plan.memory import ModelShape
    from launcher.safe_files import read_json_object

    try:
        # Read and checked as preflight does: a FIFO must not block here, nor a zero size divide.
        path = resolve_model_dir(rec) / "config.json"
        config = read_json_object(path, "model config")
        text = config.get("text_config", config)
        problem = config_size_problem(text) if isinstance(text, dict) else "text_config must be an object"
        if problem:
            raise UserError(f"{path}: {problem}")
        return ModelShape.from_config(text)
    except (UserError, OSError, ValueError, TypeError, KeyError) as err:
        if required:
            msg = str(err) if isinstance(err, UserError) else f"cannot read the model config ({err})"
            raise UserError(
                f"train.micro_batch/gradient_checkpointing = 'auto' needs the model's shape: {msg}"
            ) from None
        return None
