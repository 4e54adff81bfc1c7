"""Build the tiny preference datasets the tests use from assets/tiny-data/train.jsonl (committed; rerun to
regenerate identically).

- assets/tiny-data/preference.jsonl: 64 string rows {prompt, chosen, rejected}: the alpaca prompt of a
  training record, its own output as chosen, and the output of the next record that answers differently
  as rejected (a fluent answer to another question: what a preference pair is meant to tell apart).
- assets/tiny-data/preference-chat.jsonl: 32 conversational rows of the records after those: the prompt
  one user message, chosen and rejected one assistant message each.

Usage: python scripts/make_preference_data.py [--assets assets]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STRING_ROWS = 64
CHAT_ROWS = 32

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


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", default="assets")
    data = Path(ap.parse_args().assets) / "tiny-data"
    records = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    write_jsonl(data / "preference.jsonl", string_rows(records))
    write_jsonl(data / "preference-chat.jsonl", chat_rows(records))


if __name__ == "__main__":
    main()
