"""The peer in scripts/bench.py: Hugging Face Trainer QLoRA as users run it today, under `accelerate launch`.

    accelerate launch --config_file CFG scripts/bench_peer.py --model DIR --data tokens.jsonl --mb 2 --steps 13 --out DIR

BitsAndBytesConfig NF4 + double quant + bf16 compute + bf16 quant storage, model dtype bf16, SDPA, LoRA r16
alpha 32 dropout 0 on all linear layers with the trainable parameters cast to bf16 (what FSDP needs to
flatten them with the 4-bit storage), non-reentrant gradient checkpointing. Each rank writes
OUT/peer.rank<R>.json: step times, losses, load time, peak GPU memory and peak host RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch


class Tokens(torch.utils.data.Dataset):
    def __init__(self, path: str):
        self.rows = [json.loads(x)["input_ids"] for x in open(path)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        ids = torch.tensor(self.rows[i])
        return {"input_ids": ids, "labels": ids.clone()}


def peer_quantization():
    """The peers' quantization (this Trainer row and scripts/bench_dpo.py's TRL rows): NF4, double quant, bf16
    compute and bf16 storage, as qlaunch's benchmark recipes quantize."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--mb", type=int, default=2)
    p.add_argument("--steps", type=int, default=13)
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--profile", type=int, nargs=2, metavar=("FIRST", "LAST"), help="steps (1-based) to profile")
    a = p.parse_args()
    t0 = float(os.environ.get("BENCH_T0", time.time()))

    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    rank = int(os.environ.get("RANK", 0))
    if torch.cuda.is_available():  # as the PEFT examples do: bnb quantizes onto the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    t_load = time.time()
    model = AutoModelForCausalLM.from_pretrained(
        a.model, quantization_config=peer_quantization(), dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    model = get_peft_model(
        model,
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    load_s = time.time() - t_load

    rec: dict = {"step_s": [], "losses": [], "load_s": load_s}
    # The same summary as qlaunch's log.profile_steps, so the two can be read side by side.
    from launcher.rank.profiling import StepProfiler

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    profiler = StepProfiler(tuple(a.profile) if a.profile else None, a.out / "profile", rank, device)

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            profiler.begin(state.global_step + 1)
            if "first_step_s" not in rec:
                rec["first_step_s"] = time.time() - t0
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            rec["step_s"].append(time.perf_counter() - self.t)
            profiler.end(state.global_step)  # global_step counts this step already

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                rec["losses"].append(float(logs["loss"]))

    args = TrainingArguments(
        output_dir=str(a.out / "trainer"),
        per_device_train_batch_size=a.mb,
        gradient_accumulation_steps=1,
        max_steps=a.steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # a CPU smoke test of this script; the benchmark runs on GPUs
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        gradient_checkpointing=not a.no_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        remove_unused_columns=False,
        disable_tqdm=True,
        max_grad_norm=1.0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(a.data),
        data_collator=default_data_collator,
        callbacks=[Timer()],
    )
    trainer.train()
    seq = len(trainer.train_dataset[0]["input_ids"])
    rec.update(
        tokens_per_step_per_gpu=a.mb * seq,
        peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0,
        peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    )
    (a.out / f"peer.rank{rank}.json").write_text(json.dumps(rec))


if __name__ == "__main__":
    main()
