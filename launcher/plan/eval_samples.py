"""`[train.samples]`: prompts whose greedy completions by the adapter in training are logged at each evaluation
and after the last step (metrics.jsonl `samples` events, TensorBoard text, `qlaunch report`)."""

from __future__ import annotations

from pydantic import Field, field_validator

from launcher.plan.recipe_types import Int, Section, short_value

# Sampling is a forward per new token on every rank: a few prompts of a few dozen tokens keep each
# evaluation's sampling to seconds; the limits only stop a typo (100000 tokens) from stalling training.
MAX_SAMPLE_PROMPTS = 64
MAX_NEW_TOKENS = 4096


class SamplesConfig(Section):
    prompts: list[str] = Field(
        [],
        max_length=MAX_SAMPLE_PROMPTS,
        description="Prompts to complete with the adapter as it trains, every train.eval_every steps (when > 0) "
        "and after the last step: greedy decoding, rendered as training renders a prompt (alpaca: the "
        "instruction with its '### Response:' header; chat: one user message and the template's assistant "
        "header; text: the text after the tokenizer's leading special tokens; tokenized and preference: the "
        "text with the tokenizer's own special tokens). Logged as `samples` events in "
        "metrics.jsonl, TensorBoard text (samples/<n>), a line in the terminal and `qlaunch report`. Every "
        "rank runs the generation together (sharded models need all of them); compiled layers run eagerly "
        "for it. Empty: no samples.",
    )
    max_new_tokens: Int = Field(
        32,
        ge=1,
        le=MAX_NEW_TOKENS,
        description="Tokens generated per sample prompt at most (a reply stops earlier at EOS or at the chat "
        "template's end-of-turn token).",
    )

    @field_validator("prompts")
    @classmethod
    def _not_blank(cls, prompts: list[str]) -> list[str]:
        for i, text in enumerate(prompts):
            if not text.strip():
                raise ValueError(
                    f"train.samples.prompts[{i}] = {short_value(text)}: a sample prompt needs text (remove it "
                    "or write one)"
                )
        return prompts
