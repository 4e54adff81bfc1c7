"""DPO on one GPU: qlaunch against TRL's DPOTrainer + PEFT QLoRA at the same settings, one after another.

    python3 scripts/bench_dpo.py OUT [--rows q1,t1,q2,t2] [--steps 10] [--warmup 3] [--trl-path DIR]

Rows: `q<M>` is qlaunch (`python -m launcher.cli run recipes/llama8b-dpo-rehearsal.toml --gpus 1`) at
train.micro_batch = M packed rows; `t<M>` is TRL at the same number of pairs per micro-batch (M rows x the
pairs a row holds) and the same pairs per optimizer step (gradient accumulation makes up the rest).
`q<M>-eager` is the qlaunch row with train.compile = false, `q<M>-single` with parallel.backend = "none" (one
process without FSDP2's wrapping, which at world 1 shards nothing but still gathers each layer into a buffer of
its own); suffixes combine (`q1-single-eager`).

Both sides: the same Llama-3.1-8B-shaped checkpoint of random bf16 weights, written once to OUT/model-bf16
(or --model) by scripts/bench.py's writer and quantized as it loads (qlaunch: the recipe with model.path set
to it and model.init = "pretrained"; TRL: bitsandbytes in from_pretrained), NF4 + double quant with bf16 compute and storage, LoRA r16 alpha 32 dropout 0 on all
linear layers, SDPA, bf16, non-reentrant gradient checkpointing, AdamW lr 1e-4 cosine, no warmup, grad clip
1.0, DPO sigmoid beta 0.1, reference = the base with the adapter disabled (TRL: peft_config given and no
ref_model; precompute_ref_log_probs = False), the pairs of assets/tiny-data/preference-long.jsonl.

Tokens/s, the same for both: tokens of (prompt + chosen) + (prompt + rejected) of the step's pairs, over the
wall time between the ends of consecutive optimizer steps (the GPU synchronized), median over the steps
after `--warmup`. Peak memory: torch.cuda.max_memory_reserved of the training process at its end. The TRL
side runs this file with --trl-worker under the interpreter path given by --trl-path (trl, datasets, peft,
bitsandbytes there). A benchmark, not a test: the table goes to stdout and OUT/results.md, raw numbers to
OUT/results.json, each process's output to OUT/<row>.log.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "llama8b-dpo-rehearsal.toml"
CONFIG_8B = ROOT / "assets" / "configs" / "llama-3.1-8b"
TOKENIZER = ROOT / "assets" / "tiny-llama"
DATA = ROOT / "assets" / "tiny-data" / "preference-long.jsonl"
SEQ = 2048
GLOBAL_ROWS = 4  # the recipe's global batch: packed rows per optimizer step
BETA = 0.1


def pair_tokens(data: Path) -> list[int]:
    """Tokens each pair puts through the model: len(prompt + chosen) + len(prompt + rejected), tokenized as
    TRL does (the EOS text appended to each completion; this tokenizer adds no special tokens of its own)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    out = []
    for line in open(data):
        r = json.loads(line)
        n = [len(tok(r["prompt"] + r[k] + tok.eos_token)["input_ids"]) for k in ("chosen", "rejected")]
        out.append(sum(n))
    return out


def median_after(xs: list[float], warmup: int) -> float | None:
    timed = xs[warmup:]
    return statistics.median(timed) if timed else None


# ------------------------------------------------------------------ qlaunch


def run_qlaunch(row: str, mb: int, variants: set[str], a, out: Path, model: Path) -> dict:
    runs = out / f"runs-{row}"
    cmd = [sys.executable, "-m", "launcher.cli", "run", str(RECIPE), "--gpus", "1"]
    sets = [
        f'model.path="{model}"',  # the checkpoint TRL loads: the same weights, read from disk the same way
        'model.init="pretrained"',
        f"train.micro_batch={mb}",
        f"train.max_steps={a.steps}",
        f'log.runs_dir="{runs}"',
        "checkpoint.every_steps=0",
        "checkpoint.save_final_adapter=false",
    ]
    sets += ["train.compile=false"] if "eager" in variants else []
    sets += ['parallel.backend="none"'] if "single" in variants else []
    for s in sets:
        cmd += ["--set", s]
    rc = sh(cmd, out / f"{row}.log", a.timeout)
    files = sorted(glob.glob(str(runs / "*" / "*" / "metrics.jsonl")))
    events = [json.loads(x) for x in open(files[-1])] if files else []
    steps = [e for e in events if e["event"] == "step"]
    done = [e for e in events if e["event"] == "done"]
    return {
        "rc": rc,
        "step_s": [e["step_time_s"] for e in steps],
        "qlaunch_tokens_per_s": [e["tokens_per_s"] for e in steps],  # its own count: rows x seq_len
        "loss": [e["loss"] for e in steps],
        "chosen": [e.get("rewards_chosen") for e in steps],
        "rejected": [e.get("rewards_rejected") for e in steps],
        "margin": [e.get("reward_margin") for e in steps],
        "accuracy": [e.get("reward_accuracy") for e in steps],
        "peak_gib": done[-1]["gpu_reserved_gb"] if done else (steps[-1].get("gpu_reserved_gb") if steps else None),
        "alloc_gib": done[-1]["gpu_alloc_gb"] if done else None,
    }


def sh(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> int:
    """One process, its output to LOG, from the project root (scripts/bench.py's runner); 124 on timeout."""
    import bench  # beside this file: scripts/ is sys.path[0] when it runs

    return bench.sh(cmd, log, env=env, timeout=timeout)


# ------------------------------------------------------------------ TRL


def write_checkpoint(model: Path, a, out: Path) -> None:
    """The random bf16 8B checkpoint both sides load, written once (bitsandbytes quantizes in from_pretrained)."""
    if (model / "model.safetensors.index.json").exists():
        return
    t = time.time()
    # A separate process: the writer's CUDA context and cache stay out of this one and the rows'.
    code = "import sys; sys.path.insert(0, 'scripts'); import bench; from pathlib import Path; "
    code += f"bench.write_random_checkpoint(Path({str(model)!r}), Path({str(CONFIG_8B)!r}))"
    rc = sh([sys.executable, "-c", code], out / "write-checkpoint.log", a.timeout)
    print(f"random checkpoint rc={rc} in {time.time() - t:.0f}s", flush=True)


def run_trl(row: str, pairs_per_micro: int, accum: int, a, out: Path, model: Path) -> dict:
    res = out / f"{row}.json"
    env = dict(os.environ, PYTHONPATH=a.trl_path, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trl-worker", str(res), "--model", str(model)]
    cmd += ["--pairs", str(pairs_per_micro), "--accum", str(accum), "--steps", str(a.steps)]
    rc = sh(cmd, out / f"{row}.log", a.timeout, env)
    rec = json.loads(res.read_text()) if res.exists() else {}
    logs = [g for g in rec.get("logs", []) if "loss" in g]
    return {
        "rc": rc,
        "step_s": rec.get("step_s", []),
        "loss": [g["loss"] for g in logs],
        "chosen": [g.get("rewards/chosen") for g in logs],
        "rejected": [g.get("rewards/rejected") for g in logs],
        "margin": [g.get("rewards/margins") for g in logs],
        "accuracy": [g.get("rewards/accuracies") for g in logs],
        "peak_gib": rec.get("peak_reserved_gib"),
        "alloc_gib": rec.get("peak_allocated_gib"),
        "padded_tokens_per_step": rec.get("padded_tokens_per_step"),
        "load_s": rec.get("load_s"),
        "versions": rec.get("versions"),
    }


def trl_worker(a) -> None:
    """One TRL DPOTrainer run as its documentation sets up QLoRA DPO: the 4-bit base and a peft_config."""
    import torch
    import trl
    from bench_peer import peer_quantization
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    t0 = time.time()
    bnb = peer_quantization()  # the Trainer peer's, scripts/ being this file's import path
    gpu = torch.cuda.is_available()  # no GPU: a CPU smoke test of this function on the tiny model

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize()

    model = AutoModelForCausalLM.from_pretrained(
        a.model,
        quantization_config=bnb,
        dtype=torch.bfloat16,
        attn_implementation="sdpa",
        device_map={"": 0} if gpu else None,
    )
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    rows = [json.loads(x) for x in open(a.data or DATA)]
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    args = DPOConfig(
        output_dir=str(Path(a.trl_worker).with_suffix(".trainer")),
        per_device_train_batch_size=a.pairs,
        gradient_accumulation_steps=a.accum,
        max_steps=a.steps,
        learning_rate=1e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        max_grad_norm=1.0,
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=None,  # the pairs are 512 + 512 tokens: nothing to truncate
        precompute_ref_log_probs=False,
        bf16=gpu,
        use_cpu=not gpu,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    rec: dict = {"step_s": [], "logs": [], "padded_tokens_per_step": []}
    seen = {"tokens": 0}

    class Timer(TrainerCallback):
        # Wall time between the ends of consecutive optimizer steps, as qlaunch's step_time_s is measured.
        def on_train_begin(self, args, state, control, **kw):
            sync()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            now = time.perf_counter()
            rec["step_s"].append(now - self.t)
            self.t = now
            rec["padded_tokens_per_step"].append(seen["tokens"])
            seen["tokens"] = 0

        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                rec["logs"].append(dict(logs))

    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=lora,
        callbacks=[Timer()],
    )
    collate = trainer.data_collator

    def counting(examples):  # the tokens the model is given, padding included
        batch = collate(examples)
        seen["tokens"] += int(batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting
    rec["load_s"] = time.time() - t0
    trainer.train()
    import peft

    rec.update(
        peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if gpu else None,
        peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
        trainable=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        versions={"trl": trl.__version__, "peft": peft.__version__, "torch": torch.__version__},
    )
    Path(a.trl_worker).write_text(json.dumps(rec))


# ------------------------------------------------------------------ table


def fmt(x, p=0) -> str:
    return "-" if x is None else f"{x:,.{p}f}"


def first(xs: list, n: int = 3, p: int = 4) -> str:
    return " / ".join("-" if x is None else f"{x:.{p}f}" for x in xs[:n]) or "-"


def table(results: list[dict]) -> str:
    trl = {r["pairs_per_micro"]: r for r in results if r["who"] == "trl"}
    head = "| row | pairs / micro-batch x micro-batches | tok/s | step s | peak reserved GiB | tok/s vs TRL | "
    head += "memory vs TRL | loss, steps 1-3 | margin, steps 1-3 | accuracy, steps 1-3 |"
    lines = [head, "|" + "---|" * 10]
    for r in results:
        peer = trl.get(r["pairs_per_micro"])
        ratio = mem = None
        if peer and r["who"] == "qlaunch" and peer.get("tok_s") and r.get("tok_s"):
            ratio = r["tok_s"] / peer["tok_s"]
        if peer and r["who"] == "qlaunch" and peer.get("peak_gib") and r.get("peak_gib"):
            mem = r["peak_gib"] / peer["peak_gib"]
        lines.append(
            f"| {r['row']} ({r['who']}, rc {r['rc']}) | {r['pairs_per_micro']} x {r['accum']} | {fmt(r.get('tok_s'))} "
            f"| {fmt(r.get('step_med_s'), 2)} | {fmt(r.get('peak_gib'), 2)} | {fmt(ratio, 2)} | {fmt(mem, 2)} "
            f"| {first(r['loss'])} | {first(r['margin'])} | {first(r['accuracy'], p=2)} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path, nargs="?")
    p.add_argument("--rows", default="q1,t1,q2,t2")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--timeout", type=float, default=240, help="seconds per process")
    p.add_argument("--trl-path", default="/tmp/site-u", help="PYTHONPATH of the TRL side")
    p.add_argument("--model", type=Path, help="random bf16 checkpoint dir (default OUT/model-bf16)")
    p.add_argument("--trl-worker", help=argparse.SUPPRESS)
    p.add_argument("--pairs", type=int, help=argparse.SUPPRESS)
    p.add_argument("--accum", type=int, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)  # the worker's pairs (a smoke test's)
    a = p.parse_args()
    if a.trl_worker:
        return trl_worker(a)
    out: Path = a.out
    out.mkdir(parents=True, exist_ok=True)
    lengths = pair_tokens(DATA)
    per_pair = lengths[0]
    if any(n != per_pair for n in lengths):  # one tokens-per-step figure for every step of both sides
        raise SystemExit(f"{DATA}: pairs of different lengths {sorted(set(lengths))}")
    per_row = SEQ // per_pair
    step_tokens = GLOBAL_ROWS * per_row * per_pair
    print(f"{len(lengths)} pairs of {per_pair} tokens; {per_row} a row; {step_tokens} tokens a step", flush=True)
    model = a.model or out / "model-bf16"
    write_checkpoint(model, a, out)
    results = []
    for row in a.rows.split(","):
        mb = int(row[1:].split("-")[0])
        pairs, accum = mb * per_row, GLOBAL_ROWS // mb
        t = time.time()
        if row.startswith("q"):
            variants = set(row.split("-")[1:])
            if variants - {"eager", "single"}:
                raise SystemExit(f"row {row}: suffixes are -eager and -single")
            r = run_qlaunch(row, mb, variants, a, out, model)
            r["who"] = "qlaunch"
        else:
            r = run_trl(row, pairs, accum, a, out, model)
            r["who"] = "trl"
        step = median_after(r["step_s"], a.warmup)
        r.update(row=row, pairs_per_micro=pairs, accum=accum, step_med_s=step, wall_s=round(time.time() - t))
        r["tok_s"] = step_tokens / step if step else None
        results.append(r)
        print(
            f"== {row}: rc={r['rc']} steps={len(r['step_s'])} tok/s={fmt(r['tok_s'])} peak={fmt(r['peak_gib'], 2)} "
            f"GiB losses={first(r['loss'], 10)} in {r['wall_s']}s",
            flush=True,
        )
        (out / "results.json").write_text(
            json.dumps(
                {"pair_tokens": per_pair, "step_tokens": step_tokens, "ln2": math.log(2), "rows": results}, indent=1
            )
        )
    text = table(results)
    (out / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
