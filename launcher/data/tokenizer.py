"""The tokenizer: its files checked (regular files, a known class), built for a recipe, fingerprinted, and the
model's vocabulary size that token ids must stay below."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.errors import UserError
from launcher.safe_files import open_regular, shown

if TYPE_CHECKING:  # annotations only: packing and sampling import without pydantic (GPU hosts, tools)
    from launcher.plan.recipe import Recipe
from launcher.data.source import HUB_ID_PATTERN, value_kind

# The files transformers reads from a tokenizer directory. It skips one it cannot read, or a tokenizer_config.json
# that is a directory, and loads a tokenizer without its special tokens: a run that trains on the wrong ids.
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "tokenizer.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
)


def check_tokenizer_dir(directory: Path, trust_remote_code: bool) -> None:
    """Every tokenizer file present is a regular file; tokenizer_config.json is a JSON object whose
    tokenizer_class, if it names one, is a class transformers has (or the directory's own remote code)."""
    from launcher.safe_files import read_json_object

    for name in TOKENIZER_FILES:
        if os.path.lexists(directory / name):
            os.close(open_regular(directory / name, "tokenizer file"))
    config_path = directory / "tokenizer_config.json"
    if not os.path.lexists(config_path):
        return
    config = read_json_object(config_path, "tokenizer config")
    cls = config.get("tokenizer_class")
    if cls is None or (trust_remote_code and config.get("auto_map")):
        return
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    if not isinstance(cls, str) or tokenizer_class_from_name(cls) is None:
        what = shown(cls) if isinstance(cls, str) else value_kind(cls)
        raise UserError(
            f"{config_path}: tokenizer_class {what} is not a tokenizer class transformers knows "
            "(e.g. PreTrainedTokenizerFast, LlamaTokenizer)"
        )


def build_tokenizer(recipe: Recipe, model_dir: Path):
    from transformers import AutoTokenizer

    path = recipe.model.tokenizer or str(model_dir)
    local = Path(path).expanduser()
    if not local.is_absolute() and not HUB_ID_PATTERN.fullmatch(path):
        # Local tokenizer paths are absolute by now (see loading.resolve_model_dir): never the current directory.
        raise UserError(f"model.tokenizer = {path!r}: no such directory (and not a hub id of the form org/name)")
    if local.is_absolute() and local.is_dir():
        check_tokenizer_dir(local, recipe.model.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=recipe.model.trust_remote_code)
    # Its "Token indices sequence length is longer than ..." warning (once per tokenizer: twice per launch)
    # is about model_max_length; qlaunch applies data.overlong against data.seq_len and says so itself.
    getattr(tokenizer, "deprecation_warnings", {})["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything about a tokenizer that changes the token ids this module produces."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    meta = [
        type(tokenizer).__name__,
        getattr(tokenizer, "chat_template", None),
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        len(tokenizer),
    ]
    h.update(json.dumps(meta, default=str).encode())
    return h.hexdigest()


def leading_special_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text by itself (e.g. Llama's BOS); [] for most others."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for j in range(len(full) - len(plain) + 1):
        if full[j : j + len(plain)] == plain:
            return list(full[:j])
    return []


def model_vocab_size(recipe: Recipe) -> int | None:
    """Rows of the model's input embedding (config.json vocab_size), if its config states them."""
    from launcher.plan.model_info import load_config, resolve_model_dir

    config = load_config(recipe, resolve_model_dir(recipe))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "vocab_size", None)
    return value if type(value) is int and value > 0 else None


def recipe_tokenizer(recipe: Recipe):
    from launcher.plan.model_info import resolve_model_dir

    try:
        return build_tokenizer(recipe, resolve_model_dir(recipe))
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - a tokenizer that cannot load is the user's to fix
        name = recipe.model.tokenizer or recipe.model.path
        raise UserError(f"{name}: the tokenizer could not be loaded ({type(err).__name__}: {err})") from None
