"""Build the small assets the CPU demo and the tests use (committed; rerun to regenerate identically).

- assets/tiny-data/train.jsonl, val.jsonl: instruction/response pairs (alpaca format) about arithmetic,
  word reversal, capitals and counting — small, real text with structure a tiny model can learn.
- assets/tiny-llama/: a 2-layer Llama (hidden 64) with seeded random bf16 weights as safetensors,
  its config, and a byte-level BPE tokenizer (vocab 512) trained on the data above.

Usage: python scripts/make_tiny_assets.py [--out assets]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Austria": "Vienna", "Poland": "Warsaw", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Greece": "Athens", "Ireland": "Dublin", "Japan": "Tokyo", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago", "Canada": "Ottawa", "Mexico": "Mexico City",
}  # fmt: skip
WORDS = (
    "apple river stone cloud garden window silver orange planet forest yellow candle mirror winter "
    "summer rocket pencil dragon castle bridge"
).split()


def make_records(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.randrange(4)
        if kind == 0:
            a, b = rng.randrange(100), rng.randrange(100)
            out.append(
                {
                    "instruction": "Add the two numbers.",
                    "input": f"{a} + {b}",
                    "output": f"{a} + {b} = {a + b}.",
                }
            )
        elif kind == 1:
            w = rng.choice(WORDS)
            out.append({"instruction": "Reverse the word.", "input": w, "output": f"{w} reversed is {w[::-1]}."})
        elif kind == 2:
            c = rng.choice(sorted(CAPITALS))
            out.append(
                {
                    "instruction": f"What is the capital of {c}?",
                    "input": "",
                    "output": f"The capital of {c} is {CAPITALS[c]}.",
                }
            )
        else:
            w = rng.choice(WORDS)
            out.append(
                {
                    "instruction": "How many letters does the word have?",
                    "input": w,
                    "output": f"{w} has {len(w)} letters.",
                }
            )
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def make_tokenizer(texts: list[str], out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")
    fast.save_pretrained(str(out))


def make_model(out: Path, vocab: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1234)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="assets")
    args = ap.parse_args()
    root = Path(args.out)
    train, val = make_records(1200, seed=1), make_records(64, seed=2)
    write_jsonl(root / "tiny-data" / "train.jsonl", train)
    write_jsonl(root / "tiny-data" / "val.jsonl", val)
    texts = [f"{r['instruction']} {r['input']} {r['output']}" for r in train]
    make_tokenizer(texts, root / "tiny-llama")
    make_model(root / "tiny-llama", vocab=512)


if __name__ == "__main__":
    main()
