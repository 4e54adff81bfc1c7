"""Quiet libraries for the commands that do their work in the qlaunch process (merge, quantize, doctor)."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Only qlaunch's own lines while the block runs.

    bitsandbytes logs a kernel notice on import, transformers FutureWarnings, deprecation notes and a
    progress bar, DeepSpeed its accelerator choice; none is about the user's input. Errors still show."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # every logger, also those a library configures while it is imported
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                from transformers.utils import logging as hf_logging
            except Exception:  # noqa: BLE001 - doctor runs where transformers is missing or broken: it reports that
                hf_logging = None
            bars = hf_logging is not None and hf_logging.is_progress_bar_enabled()
            if bars:
                hf_logging.disable_progress_bar()
            try:
                yield
            finally:
                if bars:
                    hf_logging.enable_progress_bar()
    finally:
        logging.disable(previous)
