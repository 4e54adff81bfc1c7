"""Build the tiny preference datasets the tests use from assets/tiny-data/train.jsonl (committed; rerun to
regenerate identically).

- assets/tiny-data/preference.jsonl: 64 string rows {prompt, chosen, rejected}: the alpaca prompt of a
  training record, its own output as chosen, and the output of the next record that answers differently
  as rejected (a fluent answer to another question: what a preference pair is meant to tell apart).
- assets/tiny-data/preference-chat.jsonl: 32 conversational rows of the records after those: the prompt
  one user message, chosen and rejected one assistant message each.
- assets/tiny-data/preference-long.jsonl: 80 string rows at realistic lengths for GPU rehearsals and the DPO
  benchmark (recipes/llama8b-dpo-rehearsal.toml, scripts/bench_dpo.py): in the tiny-llama tokenizer's
  tokens, a prompt of exactly 256 (a numbered list of training tasks) and completions of exactly 255 (+ the
  EOS token qlaunch and TRL append = 256): the answers of those tasks and of the records after them as
  chosen, other records' answers as rejected.
  So a pair is 2 x 256 + 256 + 256 = 1024 tokens and a 2048-token row holds exactly 2 pairs, no padding.

Usage: python scripts/make_preference_data.py [--assets assets]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STRING_ROWS = 64
CHAT_ROWS = 32
LONG_ROWS = 80
LONG_PROMPT = 256  # tokens
LONG_COMPLETION = 255  # tokens, before the EOS token

# The alpaca prompt of launcher/data/render.py, so string pairs read like the alpaca data they come from.
PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def other_output(records: list[dict], i: int) -> str:
    """The output of the first record after i whose output differs from record i's."""
    for k in range(1, len(records)):
        out = records[(i + k) % len(records)]["output"]
        if out != records[i]["output"]:
            return out
    raise ValueError("every record has the same output")


def string_rows(records: list[dict]) -> list[dict]:
    return [
        {"prompt": PROMPT.format(**r), "chosen": r["output"], "rejected": other_output(records, i)}
        for i, r in enumerate(records[:STRING_ROWS])
    ]


def chat_rows(records: list[dict]) -> list[dict]:
    rows = []
    for i in range(STRING_ROWS, STRING_ROWS + CHAT_ROWS):
        r = records[i]
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"{r['instruction']}\n{r['input']}"}],
                "chosen": [{"role": "assistant", "content": r["output"]}],
                "rejected": [{"role": "assistant", "content": other_output(records, i)}],
            }
        )
    return rows


def fill(head: str, pieces: list[str], tail: str, target: int, count) -> str:
    """head + as many pieces as fit + tail, padded with '.' tokens to exactly `target` tokens by `count`."""
    text = head
    for piece in pieces:
        if count(text + piece + tail) > target:
            break
        text += piece
    text += tail
    while count(text) < target:  # '.' is one token and merges with nothing in this vocabulary
        text = text[: len(text) - len(tail)] + "." + tail
    if count(text) != target:
        raise ValueError(f"could not hit {target} tokens: got {count(text)}")
    return text


def long_rows(records: list[dict], tokenizer_file: Path) -> list[dict]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))

    def count(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False).ids)

    rows, n = [], len(records)
    for i in range(LONG_ROWS):
        start = (i * 17) % n  # spread the rows over the records
        tasks = [records[(start + k) % n] for k in range(n)]
        head = "### Instruction:\nDo each task below, in order, one sentence each.\n\n### Input:\n"
        lines = [f"{k + 1}. {r['instruction']} {r['input']}\n" for k, r in enumerate(tasks)]
        prompt = fill(head, lines, "\n### Response:\n", LONG_PROMPT, count)
        chosen = fill("", [r["output"] + " " for r in tasks], "", LONG_COMPLETION, count)
        wrong = [other_output(records, (start + k) % n) + " " for k in range(n)]
        rejected = fill("", wrong[1:] + wrong[:1], "", LONG_COMPLETION, count)
        # The prompt ends with a newline and each completion starts with a letter: the boundary is a
        # pre-tokenizer split, so prompt + completion tokenizes as the two apart (no merged tokens).
        for completion in (chosen, rejected):
            if count(prompt + completion) != LONG_PROMPT + LONG_COMPLETION:
                raise ValueError(f"row {i}: tokens merge across the prompt/completion boundary")
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", default="assets")
    assets = Path(ap.parse_args().assets)
    data = assets / "tiny-data"
    records = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    write_jsonl(data / "preference.jsonl", string_rows(records))
    write_jsonl(data / "preference-chat.jsonl", chat_rows(records))
    write_jsonl(data / "preference-long.jsonl", long_rows(records, assets / "tiny-llama" / "tokenizer.json"))


if __name__ == "__main__":
    main()
