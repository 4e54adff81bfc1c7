"""qlaunch calls no deprecated API of its libraries: building the training model, merging and generating raise
no deprecation warning or deprecation log line that qlaunch's own code triggered.

A library's deprecation of its *own* internal call (PEFT reading transformers' `is_gradient_checkpointing`)
is not qlaunch's to fix; one qlaunch triggers is, whichever stacklevel the library warns with: the warning is
qlaunch's when the frame it is attributed to, or that frame's caller, is launcher/ code. Found while the
warning is being shown, with the stack still live.
"""

from __future__ import annotations

import logging
import traceback
import warnings
from pathlib import Path

import torch

from tests.conftest import BASE_RECIPE

LAUNCHER = str(Path(__file__).resolve().parents[1] / "launcher")
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def _ours(stack: list[traceback.FrameSummary], filename: str | None, lineno: int | None) -> bool:
    """Whether the frame at (filename, lineno), or the frame that called it, is launcher/ code."""
    if filename and str(Path(filename).resolve()).startswith(LAUNCHER):
        return True
    for i, frame in enumerate(stack):
        if frame.filename == filename and frame.lineno == lineno and i > 0:
            return str(Path(stack[i - 1].filename).resolve()).startswith(LAUNCHER)
    return False


class _Deprecations(logging.Handler):
    """Deprecation warnings and log lines ("... is deprecated") that launcher/ code triggered."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.found: list[str] = []

    def show(self, message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, DEPRECATIONS) and _ours(traceback.extract_stack(), filename, lineno):
            self.found.append(f"{category.__name__} at {filename}:{lineno}: {message}")

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "deprecat" in text.lower() and _ours(traceback.extract_stack(), record.pathname, record.lineno):
            self.found.append(f"log {record.name} at {record.pathname}:{record.lineno}: {text}")


def _watching(work) -> list[str]:
    seen = _Deprecations()
    loggers = [logging.getLogger(name) for name in ("transformers", "peft", "accelerate", "bitsandbytes", "torch")]
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = seen.show
        for lg in loggers:
            lg.addHandler(seen)
        try:
            work()
        finally:
            for lg in loggers:
                lg.removeHandler(seen)
    return seen.found


def test_the_watch_catches_a_deprecated_call_made_from_launcher_code():
    """The check itself: transformers' old gradient_checkpointing_enable warns from its own file (stacklevel
    1); called from launcher/ code it counts, called from a library it does not."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64))  # fmt: skip
    if not hasattr(model, "activation_checkpointing_enable"):
        return  # transformers before the rename: the old name is not deprecated there
    caller = compile("model.gradient_checkpointing_enable()", f"{LAUNCHER}/probe.py", "exec")
    found = _watching(lambda: exec(caller, {"model": model}))
    assert any("gradient_checkpointing_enable" in f for f in found), found
    assert _watching(lambda: model.gradient_checkpointing_enable()) == []  # this file is not launcher/


def test_training_build_merge_and_generate_call_nothing_deprecated(tmp_path):
    from launcher.launch.generate import generate_run
    from launcher.launch.merge import merge_run
    from launcher.plan.recipe_file import load_recipe
    from launcher.rank.build import build_model
    from tests.test_export import _adapter, _hand_made_run, _lora_shapes

    recipe_path = tmp_path / "r.toml"
    recipe_path.write_text(BASE_RECIPE)
    recipe = load_recipe(recipe_path)
    assert recipe.train.gradient_checkpointing is True  # the build enables activation checkpointing

    def work() -> None:
        build_model(recipe, torch.device("cpu"), None)
        run = _hand_made_run(tmp_path, _adapter(_lora_shapes(recipe_path)))
        for onto in ("original", "dequantized"):
            merge_run(run, tmp_path / f"merged-{onto}", "float32", onto)
        generate_run(run, "Add 2 and 3.", max_new_tokens=2, device="cpu")

    assert _watching(work) == []
