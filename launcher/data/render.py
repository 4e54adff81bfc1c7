"""Rendering one row into token ids and labels: alpaca/completion prompts, chat templates (roles checked,
trained turns marked, a time limit on the template) and preference pairs, with counts of what was dropped
and why."""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from launcher.errors import UserError
from launcher.safe_files import shown

if TYPE_CHECKING:  # annotations only: packing and sampling import without pydantic (GPU hosts, tools)
    from launcher.plan.recipe import DataConfig
from launcher.data.pack import IGNORE
from launcher.data.preference import PairIds, PairText, cut_pair, pair_document, pair_length, split_pair, trains_both
from launcher.data.source import Source, value_kind
from launcher.data.tokenizer import leading_special_ids
from launcher.plan.chat_templates import template_text

# Wall-clock limit of one chat-template rendering: real templates take milliseconds; a Jinja loop bomb
# (range(100000) nested twice) would otherwise render for hours before a rank is even spawned.
RENDER_LIMIT_S = 5.0

ROLES = ("system", "user", "assistant", "tool")

# The Stanford-Alpaca style prompt; the response follows it and then the EOS token.
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"

ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"

# Used for `chat` when neither data.chat_template nor the tokenizer has a template: ChatML-style turn
# headers, each turn closed by the tokenizer's EOS token so a fine-tuned model learns to stop.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# The end-of-turn markers of the named templates (plan/chat_templates.py) and of common tokenizer templates.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|eot|>")


@dataclass
class RenderStats:
    rows: int = 0
    truncated: int = 0
    overlong_dropped: int = 0
    no_target: int = 0


Segments = list[tuple[str, bool]]  # (text, trainable)


class _RenderTimeout(Exception):
    pass


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise _RenderTimeout inside the body after `seconds` of wall-clock time (SIGALRM: main thread only;
    elsewhere, e.g. a test's worker thread, no limit). The previous handler and timer are restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise _RenderTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    finally:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:  # even if the alarm fired just now, the previous handler comes back
            signal.signal(signal.SIGALRM, previous)
        if outer:  # someone else's timer was running: give it back what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 1e-3))


class Renderer:
    """Validates one row of the configured format and renders it into trainable / prompt segments."""

    def __init__(self, cfg: DataConfig, tokenizer, model_vocab: int | None = None):
        self.cfg = cfg
        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id
        self.bos = leading_special_ids(tokenizer) if cfg.format in ("text", "alpaca") else []
        self.vocab = len(tokenizer)
        # Rows of the model's embedding: an id at or past it is an IndexError on every rank, whatever the
        # tokenizer's length (a tokenizer with added tokens the model was never resized for).
        self.model_vocab = model_vocab
        try:
            self.template = template_text(
                cfg.chat_template, getattr(tokenizer, "chat_template", None), DEFAULT_CHAT_TEMPLATE
            )
        except ValueError as err:
            raise UserError(str(err)) from None

    def required_columns(self) -> list[tuple[str, str]]:
        c = self.cfg
        return {
            "text": [(c.text_column, "data.text_column")],
            "alpaca": [(c.instruction_column, "data.instruction_column"), (c.output_column, "data.output_column")],
            "chat": [(c.messages_column, "data.messages_column")],
            "tokenized": [(c.input_ids_column, "data.input_ids_column")],
            "preference": [
                (c.prompt_column, "data.prompt_column"),
                (c.chosen_column, "data.chosen_column"),
                (c.rejected_column, "data.rejected_column"),
            ],
        }[c.format]

    def check_columns(self, columns: Iterable[str], src: Source) -> None:
        have = list(columns)
        for col, key in self.required_columns():
            if col not in have:
                raise UserError(
                    f"{src.path}: missing column '{col}' ({key}); its columns are: {', '.join(have) or '(none)'}"
                )

    # -- field validation

    def _string(self, row: dict, col: str, key: str, where: object, lenient: bool, required: bool = True) -> str | None:
        v = row.get(col)
        if lenient and isinstance(v, float) and math.isnan(v):
            v = None  # an empty CSV cell
        if v is None:
            if required:
                raise UserError(f"{where}: column '{col}' is missing or null ({key})")
            return None
        if isinstance(v, str):
            return v
        if lenient and isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)  # CSV has no types: a cell "47" is text that pandas read as a number
        raise UserError(f"{where}: column '{col}' must be a string, got {value_kind(v)} ({key})")

    def _int_list(self, v: Any, col: str, key: str, where: object, allow_ignore: bool) -> list[int]:
        if v is None:
            raise UserError(f"{where}: column '{col}' is missing or null ({key})")
        if isinstance(v, np.ndarray):
            v = v.tolist()
        if not isinstance(v, (list, tuple)):
            raise UserError(f"{where}: column '{col}' must be a list of integer token ids, got {value_kind(v)} ({key})")
        for k, x in enumerate(v, 1):
            if not isinstance(x, int) or isinstance(x, bool):
                what = (
                    "a boolean"
                    if isinstance(x, bool)
                    else "a fractional number"
                    if isinstance(x, float)
                    else value_kind(x)
                )
                raise UserError(
                    f"{where}: column '{col}' must be a list of integer token ids; element {k} is {what} ({key})"
                )
        for x in v:
            if allow_ignore and x == IGNORE:
                continue
            if self.model_vocab is not None and x >= self.model_vocab:
                raise UserError(
                    f"{where}: column '{col}' has token id {x}, outside the model's vocabulary "
                    f"0..{self.model_vocab - 1} (config.json vocab_size = {self.model_vocab}) ({key})"
                )
            if not (0 <= x < self.vocab):
                raise UserError(
                    f"{where}: column '{col}' has token id {x}, outside the tokenizer's 0..{self.vocab - 1} ({key})"
                )
        return list(v)

    # -- rendering

    def render(
        self, row: dict, where: object, lenient: bool = False
    ) -> Segments | tuple[list[int], list[int]] | PairText:
        c = self.cfg
        if c.format == "preference":
            return self._pair(row, where, lenient)
        if c.format == "text":
            return [(self._string(row, c.text_column, "data.text_column", where, lenient), True)]
        if c.format == "alpaca":
            instruction = self._string(row, c.instruction_column, "data.instruction_column", where, lenient)
            extra = self._string(row, c.input_column, "data.input_column", where, lenient, required=False)
            output = self._string(row, c.output_column, "data.output_column", where, lenient)
            if extra and extra.strip():
                prompt = ALPACA_PROMPT.format(instruction=instruction, input=extra)
            else:
                prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
            return [(prompt, c.train_on_prompt), (output, True)]
        if c.format == "chat":
            return self._chat(row.get(c.messages_column), where)
        ids = self._int_list(row.get(c.input_ids_column), c.input_ids_column, "data.input_ids_column", where, False)
        raw = row.get(c.labels_column)
        if raw is None:
            return ids, list(ids)
        labels = self._int_list(raw, c.labels_column, "data.labels_column", where, True)
        if len(labels) != len(ids):
            raise UserError(
                f"{where}: column '{c.labels_column}' has {len(labels)} labels for {len(ids)} input ids "
                "(data.labels_column)"
            )
        return ids, labels

    def _messages(self, v: Any, where: object, col: str | None = None, key: str | None = None) -> list[dict]:
        """A non-empty list of {role, content} messages. `key`: the recipe key of a column that is not
        data.messages_column (preference rows), named in every message about it."""
        col = col or self.cfg.messages_column
        at = f"{where}: column '{col}'" if key else f"{where}:"
        end = f" ({key})" if key else ""
        if v is None:
            raise UserError(f"{where}: column '{col}' is missing or null ({key or 'data.messages_column'})")
        if not isinstance(v, (list, tuple)) or not v:
            what = "an empty list" if isinstance(v, (list, tuple)) else value_kind(v)
            raise UserError(
                f"{where}: column '{col}' must be a non-empty list of {{role, content}} messages, got {what}{end}"
            )
        for k, m in enumerate(v, 1):
            if not isinstance(m, dict):
                raise UserError(f"{at} message {k} must be an object with role and content, got {value_kind(m)}{end}")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                what = shown(role) if isinstance(role, str) else value_kind(role)
                raise UserError(f"{at} message {k} has unknown role {what} (expected one of {', '.join(ROLES)}){end}")
            if not isinstance(content, str):
                raise UserError(f"{at} message {k} ({role}) content must be a string, got {value_kind(content)}{end}")
        return list(v)

    def _pair(self, row: dict, where: object, lenient: bool) -> PairText:
        """A preference row: prompt, chosen and rejected, all strings or all conversational (the prompt a
        list of messages, each completion the messages that follow it), rendered as TRL 1.16 does."""
        c = self.cfg
        cols = [
            (c.prompt_column, "data.prompt_column"),
            (c.chosen_column, "data.chosen_column"),
            (c.rejected_column, "data.rejected_column"),
        ]
        values = [row.get(col) for col, _ in cols]
        if lenient:  # an empty CSV cell
            values = [None if isinstance(v, float) and math.isnan(v) else v for v in values]
        for (col, key), v in zip(cols, values, strict=True):
            if v is None:
                raise UserError(f"{where}: column '{col}' is missing or null ({key})")
        chat = isinstance(values[0], (list, tuple, np.ndarray))
        for (col, key), v in zip(cols[1:], values[1:], strict=True):
            if isinstance(v, (list, tuple, np.ndarray)) != chat:
                raise UserError(
                    f"{where}: column '{col}' is {value_kind(v)} but column '{cols[0][0]}' is "
                    f"{value_kind(values[0])}: a preference row is all strings or all lists of messages ({key})"
                )
        if chat:
            prompt, chosen, rejected = (
                self._messages(list(v), where, col, key) for (col, key), v in zip(cols, values, strict=True)
            )
            return PairText(
                self._apply(prompt, True, where),
                self._apply(prompt + chosen, False, where),
                self._apply(prompt + rejected, False, where),
                special=False,
            )
        prompt, chosen, rejected = (self._string(row, col, key, where, lenient) for col, key in cols)
        for (col, key), text in zip(cols[1:], (chosen, rejected), strict=True):
            if not text.strip():
                raise UserError(f"{where}: column '{col}' is empty: a completion needs text to compare ({key})")
        # TRL's add_eos: each completion ends with the EOS text, so the model learns to stop after it.
        eos = self.tok.eos_token or ""
        chosen, rejected = (t if t.endswith(eos) else t + eos for t in (chosen, rejected))
        return PairText(prompt, prompt + chosen, prompt + rejected, special=True)

    def _apply(self, messages: list[dict], generation: bool, where: object) -> str:
        which = "data.chat_template" if self.cfg.chat_template else "the tokenizer's chat_template"
        try:
            with _time_limit(RENDER_LIMIT_S):
                out = self.tok.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=generation, chat_template=self.template
                )
        except _RenderTimeout:
            raise UserError(
                f"{where}: the chat template ({which}) did not finish rendering one conversation within "
                f"{RENDER_LIMIT_S:g} s (a template renders in milliseconds; does it loop?)"
            ) from None
        except Exception as err:  # noqa: BLE001 - jinja errors, raise_exception() in templates
            raise UserError(
                f"{where}: the chat template ({which}) failed: {' '.join(str(err).split())[:300]}"
            ) from None
        return out if isinstance(out, str) else str(out)

    def _chat(self, value: Any, where: object) -> Segments:
        msgs = self._messages(value, where)
        full = self._apply(msgs, False, where)
        if not full.strip():
            raise UserError(
                f"{where}: the chat template rendered nothing for this conversation "
                "(check data.chat_template or the tokenizer's chat_template)"
            )
        if self.cfg.train_on_prompt:
            return [(full, True)]
        # Each assistant reply is the text between the rendering of the conversation before it (with the
        # generation prompt) and the rendering up to and including it. That needs templates that render
        # prefixes of a conversation as prefixes of the whole; most do, and we refuse rather than guess.
        segs: Segments = []
        pos = 0
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            start = self._apply(msgs[:i], True, where) if i else ""
            end = self._apply(msgs[: i + 1], False, where)
            if not (pos <= len(start) <= len(end) and full.startswith(end) and end.startswith(start)):
                raise UserError(
                    f"{where}: the chat template does not render this conversation prefix by prefix, so the "
                    "assistant replies cannot be located; set data.train_on_prompt = true or data.chat_template"
                )
            segs += [(full[pos : len(start)], False), (full[len(start) : len(end)], True)]
            pos = len(end)
        segs.append((full[pos:], False))
        return [s for s in segs if s[0]]

    def prompt_ids(self, prompt: str) -> list[int]:
        """PROMPT's token ids as training renders the part before a reply, so that a model continues with the
        reply it was trained on: alpaca the instruction and its '### Response:' header, chat one user message
        and the template's assistant header (tokenized without the tokenizer's specials, as chat rows are),
        text the bos and the text; tokenized and preference runs have no prompt layout of their own, so the
        text is tokenized as it is, with the tokenizer's own special tokens (as string preference prompts are)."""
        fmt = self.cfg.format
        if fmt == "alpaca":
            return self.bos + list(
                self.tok(ALPACA_PROMPT_NO_INPUT.format(instruction=prompt), add_special_tokens=False)["input_ids"]
            )
        if fmt == "chat":
            text = self._apply([{"role": "user", "content": prompt}], True, "a sample prompt")
            return list(self.tok(text, add_special_tokens=False)["input_ids"])
        if fmt == "text":
            return self.bos + list(self.tok(prompt, add_special_tokens=False)["input_ids"])
        return list(self.tok(prompt)["input_ids"])

    def stop_ids(self) -> list[int]:
        """Token ids that end a generated reply: EOS, and for templated formats each end-of-turn marker the
        template writes that is one token of this tokenizer (a llama3 reply ends with <|eot_id|>, not EOS)."""
        out = [] if self.eos is None else [self.eos]
        if self.cfg.format in ("chat", "preference"):
            for marker in END_OF_TURN:
                ids = self.tok.convert_tokens_to_ids(marker) if marker in self.template else None
                if isinstance(ids, int) and ids != self.tok.unk_token_id and ids not in out:
                    out.append(ids)
        return out

    def check_ids(self, ids: list[int], where: object) -> None:
        """Ids the tokenizer produced must have a row in the model's embedding."""
        if self.model_vocab is None or not ids:
            return
        top = max(ids)
        if top >= self.model_vocab:
            raise UserError(
                f"{where}: the tokenizer gives token id {top}, but the model has embeddings for ids "
                f"0..{self.model_vocab - 1} only (config.json vocab_size = {self.model_vocab}): the tokenizer "
                "has tokens the model has no embedding for; use the model's own tokenizer (model.tokenizer)"
            )

    def tokenize_pairs(self, rendered: list[PairText]) -> list[PairIds]:
        """Each pair's prompt and completion ids, split by TRL's rule; the texts of the batch go through at
        most two tokenizer calls (with and without the tokenizer's own special tokens)."""
        ids: dict[tuple[int, int], list[int]] = {}
        for special in (True, False):
            which = [k for k, r in enumerate(rendered) if r.special == special]
            texts = [
                t for k in which for t in (rendered[k].prompt, rendered[k].prompt_chosen, rendered[k].prompt_rejected)
            ]
            if not texts:
                continue
            enc = self.tok(texts, add_special_tokens=special)["input_ids"]
            for j, k in enumerate(which):
                for part in range(3):
                    ids[k, part] = list(enc[3 * j + part])
        return [split_pair(ids[k, 0], ids[k, 1], ids[k, 2]) for k in range(len(rendered))]

    def tokenize(self, rendered: list[Segments | tuple[list[int], list[int]]]) -> list[tuple[list[int], list[int]]]:
        """Token ids and labels per rendered row; all text segments of the batch go through one call."""
        texts = [t for r in rendered if isinstance(r, list) for t, _ in r]
        enc = iter(self.tok(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
        out = []
        for r in rendered:
            if isinstance(r, tuple):
                out.append(r)
                continue
            ids: list[int] = list(self.bos)
            labels: list[int] = [IGNORE] * len(self.bos)
            for _, trainable in r:
                piece = list(next(enc))
                ids += piece
                labels += piece if trainable else [IGNORE] * len(piece)
            if self.cfg.format != "chat" and self.eos is not None:
                ids.append(self.eos)
                labels.append(self.eos)
            out.append((ids, labels))
        return out


def finish_sample(ids: list[int], labels: list[int], cfg: DataConfig, where: object, stats: RenderStats):
    """Apply the over-long policy and drop documents with nothing to learn; None when dropped."""
    stats.rows += 1
    if len(ids) > cfg.seq_len:
        if cfg.overlong == "error":
            raise UserError(
                f"{where}: sample has {len(ids)} tokens, more than data.seq_len = {cfg.seq_len} "
                "(data.overlong = 'error'; 'truncate' or 'drop' accept it)"
            )
        if cfg.overlong == "drop":
            stats.overlong_dropped += 1
            return None
        ids, labels = ids[: cfg.seq_len], labels[: cfg.seq_len]
        stats.truncated += 1
    lab = np.asarray(labels, dtype=np.int32)
    if len(lab):
        lab[0] = IGNORE  # nothing predicts a document's first token (see the module docstring)
    if not len(lab) or bool((lab == IGNORE).all()):
        stats.no_target += 1
        return None
    return np.asarray(ids, dtype=np.int32), lab


def finish_pair(pair: PairIds, cfg: DataConfig, where: object, stats: RenderStats):
    """The over-long policy for a whole pair (2 x prompt + chosen + rejected against seq_len; 'truncate'
    cuts by preference.fit_pair), then the pair as one document (ids, labels, split); None when dropped,
    including a pair left with nothing to learn in either completion."""
    stats.rows += 1
    n = pair_length(len(pair.prompt), len(pair.chosen), len(pair.rejected))
    if n > cfg.seq_len:
        if cfg.overlong == "error":
            raise UserError(
                f"{where}: preference pair has {n} tokens (2 x prompt {len(pair.prompt)} + chosen "
                f"{len(pair.chosen)} + rejected {len(pair.rejected)}), more than data.seq_len = {cfg.seq_len} "
                "(data.overlong = 'error'; 'truncate' or 'drop' accept it)"
            )
        if cfg.overlong == "drop":
            stats.overlong_dropped += 1
            return None
        pair = cut_pair(pair, cfg.seq_len)
        stats.truncated += 1
    if not pair.chosen or not pair.rejected:
        stats.no_target += 1
        return None
    ids, labels, split = pair_document(pair)
    if not trains_both(labels, split):
        stats.no_target += 1
        return None
    return ids, labels, split


class RowAt:
    """A row's location, worked out only when a message needs it (JSON line numbers cost a file scan)."""

    __slots__ = ("where", "i")

    def __init__(self, where: Callable[[int], str], i: int):
        self.where, self.i = where, i

    def __str__(self) -> str:
        return self.where(self.i)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)
