"""GPU benchmark: qlaunch against the HF Trainer recipes people use today, on the same GPUs, one after another.

    python scripts/bench.py OUT [--gpus 2] [--rows ROW,ROW,...] [--steps 10] [--warmup 3]
    make bench-gpu                      # every row on 2 GPUs, OUT=bench/out

Model: Llama-3.1-8B shapes (assets/configs/llama-3.1-8b) with random weights written once as bf16 safetensors
(OUT/model-bf16, reused when present), and once pre-quantized by `qlaunch quantize` (OUT/model-nf4).
Data: random token ids, one 2048-token document per row (no packing boundaries, so attention is plainly
causal for every row). Every row: NF4 + double quant, bf16 compute and storage, LoRA r16 alpha 32 dropout 0
on all linear layers, SDPA, `--warmup` steps then `--steps` timed steps.

Per row: tokens/s per GPU (median of the timed steps), MFU (6 x params x tokens/s / the bf16 matmul peak
measured here), peak GPU memory (max over ranks of max_memory_reserved), seconds from spawn to the first
step, and for qlaunch rows the load time, peak host RSS per rank and bytes read per rank. The table goes to
stdout and OUT/results.md; every row's raw numbers to OUT/results.jsonl. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG_8B = ROOT / "assets" / "configs" / "llama-3.1-8b"
TOKENIZER = ROOT / "assets" / "tiny-llama"
SEQ = 2048

# name -> settings. kind: qlaunch | peer | accelerate (a qlaunch run directory started by `accelerate launch`).
ROWS: dict[str, dict] = {
    # The peers: HF Trainer + accelerate, the configs users copy today.
    "peer-fsdp2-mb2": dict(kind="peer", config="fsdp2", mb=2),
    "peer-fsdp2-mb4": dict(kind="peer", config="fsdp2", mb=4),
    "peer-fsdp2-mb8": dict(kind="peer", config="fsdp2", mb=8),
    "peer-fsdp1-mb2": dict(kind="peer", config="fsdp1", mb=2),
    "peer-zero3-mb2": dict(kind="peer", config="zero3", mb=2),
    # qlaunch at the peers' settings, from the bf16 checkpoint and from the pre-quantized one.
    "qlaunch-fsdp2-mb2": dict(kind="qlaunch", mb=2, ckpt=True),
    "qlaunch-fsdp2-mb2-prequant": dict(kind="qlaunch", mb=2, ckpt=True, source="nf4"),
    "qlaunch-zero3-mb2": dict(kind="qlaunch", mb=2, ckpt=True, backend="deepspeed"),
    # qlaunch's own settings.
    "qlaunch-fsdp2-mb8": dict(kind="qlaunch", mb=8, ckpt=True),
    "qlaunch-fsdp2-mb2-nockpt": dict(kind="qlaunch", mb=2, ckpt=False),
    "qlaunch-fsdp2-auto": dict(kind="qlaunch", mb="auto", ckpt="auto"),
    "qlaunch-fsdp2-auto-keep": dict(kind="qlaunch", mb="auto", ckpt="auto", reshard=False),
    "qlaunch-zero3-mb8": dict(kind="qlaunch", mb=8, ckpt=True, backend="deepspeed"),
    # train.compile: each decoder layer through torch.compile.
    "qlaunch-fsdp2-mb2-compile": dict(kind="qlaunch", mb=2, ckpt=True, compile=True),
    "qlaunch-fsdp2-mb8-compile": dict(kind="qlaunch", mb=8, ckpt=True, compile=True),
    "qlaunch-fsdp2-auto-compile": dict(kind="qlaunch", mb="auto", ckpt="auto", compile=True),
    # Layers kept gathered from forward to backward: one all-gather per layer and step instead of two.
    "qlaunch-fsdp2-mb2-compile-keep": dict(kind="qlaunch", mb=2, ckpt=True, compile=True, reshard=False),
    # ZeRO-3 with train.compile (each decoder layer one ZeRO-3 unit), at the peers' settings and at the
    # micro-batch/checkpointing the planner picks for FSDP2 on this card (batch 4, no checkpointing).
    "qlaunch-zero3-mb2-compile": dict(kind="qlaunch", mb=2, ckpt=True, backend="deepspeed", compile=True),
    "qlaunch-zero3-mb4-nockpt-compile": dict(kind="qlaunch", mb=4, ckpt=False, backend="deepspeed", compile=True),
    # The generated accelerate config starting the same run.
    "accelerate-fsdp2-mb2": dict(kind="accelerate", mb=2, ckpt=True),
}
DEFAULT_ROWS = [
    "qlaunch-fsdp2-mb2",
    "qlaunch-fsdp2-mb2-prequant",
    "peer-fsdp2-mb2",
    "peer-fsdp1-mb2",
    "peer-zero3-mb2",
    "peer-fsdp2-mb8",
    "qlaunch-zero3-mb2",
    "qlaunch-fsdp2-mb8",
    "qlaunch-fsdp2-auto",
]


def sh(cmd: list[str], log: Path, env: dict | None = None, timeout: float | None = None) -> int:
    with open(log, "w") as f:
        try:
            return subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=ROOT
            ).returncode
        except subprocess.TimeoutExpired:
            return 124


# ------------------------------------------------------------------ one-time inputs


def write_random_checkpoint(out: Path, config_dir: Path) -> None:
    """The config's shapes (Llama-3.1-8B by default), random bf16 weights (std 0.02, norms 1), safetensors shards of <= 5 GB + index."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(dev).manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    index: dict[str, str] = {}
    size, n = 0, 0

    def flush() -> None:
        nonlocal shard, size, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, size = {}, 0

    for name, p in model.state_dict().items():
        if "norm" in name:
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(p.shape, generator=g, device=dev, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()
        if size + t.numel() * 2 > 5 * 2**30:
            flush()
        shard[name] = t
        size += t.numel() * 2
    flush()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))
    shutil.copy2(config_dir / "config.json", tmp / "config.json")
    os.replace(tmp, out)


def write_random_tokens(path: Path, rows: int, vocab: int) -> None:
    """One SEQ-token document per row. Ids come from the shipped tokenizer's range (the ids' values do not
    change the compute; the data pipeline checks them against the tokenizer)."""
    import random

    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"input_ids": [rng.randrange(vocab) for _ in range(SEQ)]}) + "\n")


def matmul_peak_tflops() -> float:
    """Sustained bf16 matmul rate of this card (8192^3, best of 3 timed bursts)."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    best = 0.0
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(50):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 50 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12)
    return best


def nf4_cpu_equals_cuda() -> bool:
    """The pre-quantized checkpoint is written on the CPU, the bf16 path quantizes on the GPU: same bytes?"""
    import torch

    from launcher.plan.recipe import QuantConfig
    from launcher.rank.model.quant import quantize_blocks

    x = (torch.randn(4096 * 1024, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
    q = QuantConfig()
    pc, ac = quantize_blocks(x, q)
    pg, ag = quantize_blocks(x.cuda(), q)
    return bool(torch.equal(pc, pg.cpu()) and torch.equal(ac, ag.cpu()))


# ------------------------------------------------------------------ rows


def recipe_text(row: dict, model: Path, data: Path, runs: Path, gpus: int, steps: int, profile=None) -> str:
    mb = row["mb"]
    backend = row.get("backend", "fsdp")
    mb_toml = f'"{mb}"' if mb == "auto" else str(mb)
    ckpt = row["ckpt"]
    ckpt_toml = f'"{ckpt}"' if ckpt == "auto" else str(ckpt).lower()
    # "auto": the planner picks micro-batch; keep the global batch a multiple of any micro-batch it may pick.
    gb = (8 if mb == "auto" else mb) * gpus
    extra = "[parallel.deepspeed]\nstage = 3\n" if backend == "deepspeed" else ""
    if backend == "fsdp":
        # Rows at fixed settings reshard after forward (as they were first measured) unless they say
        # otherwise; rows with the planner's micro-batch also take its reshard choice.
        reshard = row.get("reshard", "auto" if mb == "auto" else True)
        extra = f"[parallel.fsdp]\nreshard_after_forward = {json.dumps(reshard)}\n"
    return f"""name = "bench"
[model]
path = "{model}"
tokenizer = "{TOKENIZER}"
[quant]
bits = 4
type = "nf4"
double_quant = true
[lora]
rank = 16
alpha = 32
dropout = 0.0
target_modules = "all-linear"
[data]
datasets = [{{ path = "{data}" }}]
format = "tokenized"
seq_len = {SEQ}
packing = false
[train]
max_steps = {steps}
micro_batch = {mb_toml}
global_batch = {gb}
lr = 1e-4
schedule = "constant"
gradient_checkpointing = {ckpt_toml}
compile = {str(bool(row.get("compile"))).lower()}
[parallel]
backend = "{backend}"
{extra}[checkpoint]
save_final_adapter = false
[log]
runs_dir = "{runs}"
{f"profile_steps = [{profile[0]}, {profile[1]}]" if profile else ""}
"""


def qlaunch_result(run_dir: Path, warmup: int, timed_steps: int) -> dict:
    events = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    steps = [e for e in events if e["event"] == "step"]
    start = next(e for e in events if e["event"] == "start")
    loaded = next(e for e in events if e["event"] == "loaded")
    timed = steps[warmup : warmup + timed_steps]  # profiled steps come after these
    read = {}
    for log in sorted(glob.glob(str(run_dir / "logs" / "rank*.log"))):
        m = re.search(r"\[rank (\d+)\] loaded \d+ tensors in ([\d.]+)s, read ([\d.]+) MiB", open(log).read())
        if m:
            read[int(m.group(1))] = (float(m.group(2)), float(m.group(3)))
    plan = json.loads((run_dir / "plan.json").read_text())
    rec, estimate = planner_estimate(run_dir, plan)
    return {
        "tok_s_gpu": statistics.median(e["tokens_per_s_per_gpu"] for e in timed) if timed else None,
        "peak_gib": max(steps[-1].get("rank_gpu_reserved_gb") or [steps[-1].get("gpu_reserved_gb", 0)]),
        "peak_gib_ranks": steps[-1].get("rank_gpu_reserved_gb"),
        "first_step_s": start["first_step_after_s"],
        "load_s_ranks": [read[r][0] for r in sorted(read)],
        "read_mib_ranks": [read[r][1] for r in sorted(read)],
        "rss_gib_ranks": steps[-1].get("rank_host_rss_gb"),
        "data_s_per_step": statistics.median(e.get("data_time_s", 0.0) for e in timed) if timed else None,
        "losses": [round(e["loss"], 4) for e in steps],
        "micro_batch": plan["micro_batch"],
        "gradient_checkpointing": rec.train.gradient_checkpointing,
        "estimate_gib": estimate,
        "loaded_s": loaded["seconds"],
    }


def planner_estimate(run_dir: Path, plan: dict):
    """The memory planner's figure for what max_memory_reserved will show, for the run as it was resolved."""
    from launcher.plan.memory import ModelShape, estimate
    from launcher.rundir import RunDir

    rec = RunDir(run_dir).load_recipe()
    shape = ModelShape.from_config(json.loads((Path(rec.model.path) / "config.json").read_text()))
    kw = {}
    try:
        import torch

        kw["gpu_memory"] = torch.cuda.get_device_properties(0).total_memory
    except Exception:  # no GPU: the planner's default card
        pass
    e = estimate(rec, shape, plan["world_size"], plan["micro_batch"], bool(rec.train.gradient_checkpointing),
                 nproc_per_node=plan["nproc_per_node"], **kw)  # fmt: skip
    return rec, round(e.reserved / 2**30, 2)


def peer_result(out: Path, warmup: int, timed_steps: int) -> dict:
    ranks = [json.loads(Path(f).read_text()) for f in sorted(glob.glob(str(out / "peer.rank*.json")))]
    r0 = ranks[0]
    timed = r0["step_s"][warmup : warmup + timed_steps]
    tok = r0["tokens_per_step_per_gpu"]
    return {
        "tok_s_gpu": statistics.median(tok / s for s in timed) if timed else None,
        "peak_gib": max(r["peak_reserved_gib"] for r in ranks),
        "peak_gib_ranks": [r["peak_reserved_gib"] for r in ranks],
        "first_step_s": r0["first_step_s"],
        "load_s_ranks": [r["load_s"] for r in ranks],
        "rss_gib_ranks": [r["peak_rss_gib"] for r in ranks],
        "losses": [round(x, 4) for x in r0["losses"]],
    }


PEER_CONFIGS = {
    "fsdp2": """distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_cpu_ram_efficient_loading: true
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_offload_params: false
""",
    # The PEFT documentation's QLoRA + FSDP config.
    "fsdp1": """distributed_type: FSDP
fsdp_config:
  fsdp_version: 1
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_backward_prefetch: BACKWARD_PRE
  fsdp_cpu_ram_efficient_loading: true
  fsdp_forward_prefetch: false
  fsdp_offload_params: false
  fsdp_sharding_strategy: FULL_SHARD
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_sync_module_states: true
  fsdp_use_orig_params: false
""",
    "zero3": """distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: 3
  zero3_init_flag: false
  offload_optimizer_device: none
  offload_param_device: none
  gradient_accumulation_steps: 1
  gradient_clipping: 1.0
""",
}


def run_row(name: str, row: dict, a, model: Path, nf4: Path, data: Path, out: Path) -> dict:
    d = out / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    steps = a.warmup + a.steps
    # --profile: two more steps under the torch profiler, after the timed ones (not in the figures).
    profile = (steps + 1, steps + 2) if a.profile else None
    steps += 2 if a.profile else 0
    env = dict(os.environ, BENCH_T0=str(time.time()))
    t = time.time()
    if row["kind"] == "peer":
        cfg = d / "accelerate.yaml"
        cfg.write_text(
            PEER_CONFIGS[row["config"]]
            + f"mixed_precision: bf16\nnum_machines: 1\nnum_processes: {a.gpus}\nmachine_rank: 0\nmain_training_function: main\n"
        )
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg),
               "--main_process_port", str(a.port), "scripts/bench_peer.py", "--model", str(model),
               "--data", str(data), "--mb", str(row["mb"]), "--steps", str(steps), "--out", str(d)]  # fmt: skip
        if profile:
            cmd += ["--profile", str(profile[0]), str(profile[1])]
        rc = sh(cmd, d / "out.log", env, a.timeout)
        res = peer_result(d, a.warmup, a.steps) if rc == 0 else {}
        prof_dir = d / "profile"
    else:
        src = nf4 if row.get("source") == "nf4" else model
        recipe = d / "recipe.toml"
        recipe.write_text(recipe_text(row, src, data, d / "runs", a.gpus, steps, profile))
        if row["kind"] == "accelerate":
            run_dir = d / "run"
            rc = sh(
                [
                    sys.executable,
                    "-m",
                    "launcher.cli",
                    "config",
                    str(recipe),
                    "--gpus",
                    str(a.gpus),
                    "-o",
                    str(run_dir),
                ],
                d / "config.log",
            )
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(run_dir / "accelerate_config.yaml"),
                   "--main_process_port", str(a.port), "-m", "launcher.rank.worker", str(run_dir)]  # fmt: skip
            rc = rc or sh(cmd, d / "out.log", env, a.timeout)
        else:
            cmd = [sys.executable, "-m", "launcher.cli", "run", str(recipe), "--gpus", str(a.gpus),
                   "--set", f"launch.master_port={a.port}"]  # fmt: skip
            rc = sh(cmd, d / "out.log", env, a.timeout)
            runs = sorted(glob.glob(str(d / "runs" / "bench" / "*")))
            run_dir = Path(runs[-1]) if runs else d
        res = qlaunch_result(run_dir, a.warmup, a.steps) if rc == 0 and (run_dir / "metrics.jsonl").is_file() else {}
        prof_dir = run_dir / "profile"
    if (prof_dir / "rank0.txt").is_file():  # beside results.jsonl, one file per row
        shutil.copy(prof_dir / "rank0.txt", out / f"{name}.profile.txt")
    res.update(row=name, rc=rc, wall_s=round(time.time() - t, 1), gpus=a.gpus, **{k: v for k, v in row.items()})
    if rc != 0:
        res["tail"] = (d / "out.log").read_text()[-3000:]
    a.port += 1
    return res


def table(results: list[dict], peak: float, params: float) -> str:
    lines = [
        "| row | GPUs | tok/s/GPU | MFU | peak GiB (max rank) | first step s | load s (ranks) | read MiB (ranks) | host RSS GiB (ranks) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        tps = r.get("tok_s_gpu")
        mfu = f"{6 * params * tps / (peak * 1e12):.0%}" if tps and peak else "-"

        def f(x, p=1):
            if x is None:
                return "-"
            if isinstance(x, list):
                return " / ".join(f"{v:.{p}f}" for v in x)
            return f"{x:,.{p}f}"

        if r["rc"] != 0:
            lines.append(f"| {r['row']} | {r['gpus']} | failed (rc {r['rc']}) | | | | | | |")
            continue
        lines.append(
            f"| {r['row']} | {r['gpus']} | {f(tps, 0)} | {mfu} | {f(r.get('peak_gib'), 2)} | {f(r.get('first_step_s'))} | "
            f"{f(r.get('load_s_ranks'))} | {f(r.get('read_mib_ranks'), 0)} | {f(r.get('rss_gib_ranks'), 2)} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated, from: {', '.join(ROWS)}")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--timeout", type=float, default=600, help="seconds per row")
    p.add_argument("--port", type=int, default=29611)
    p.add_argument("--prepare-only", action="store_true", help="write the checkpoints and data, run no row")
    p.add_argument("--config", type=Path, default=CONFIG_8B, help="model config dir (shapes of the random model)")
    p.add_argument("--profile", action="store_true", help="profile 2 extra steps per row: OUT/<row>.profile.txt")
    a = p.parse_args()
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    a.out.mkdir(parents=True, exist_ok=True)
    import torch

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    peak = matmul_peak_tflops() if torch.cuda.is_available() else 0.0
    model, nf4, data = a.out / "model-bf16", a.out / "model-nf4", a.out / "tokens.jsonl"
    t = time.time()
    if not model.exists():
        write_random_checkpoint(model, a.config)
    print(f"bf16 checkpoint ready in {time.time() - t:.1f}s", flush=True)
    if (a.prepare_only or any(ROWS[r].get("source") == "nf4" for r in rows)) and not nf4.exists():
        t = time.time()
        subprocess.run(
            [sys.executable, "-m", "launcher.cli", "quantize", str(model), "-o", str(nf4)], check=True, cwd=ROOT
        )
        print(f"qlaunch quantize: {time.time() - t:.1f}s", flush=True)
    if not data.exists():
        write_random_tokens(data, rows=64 * a.gpus * (a.warmup + a.steps + 2), vocab=512)
    print(f"card {card}, {a.gpus} GPUs, bf16 matmul peak {peak:.0f} TFLOP/s", flush=True)
    if torch.cuda.is_available():
        print(f"NF4 bytes quantized on CPU == on GPU: {nf4_cpu_equals_cuda()}", flush=True)
    if a.prepare_only:
        return
    results = []
    for name in rows:
        r = run_row(name, ROWS[name], a, model, nf4, data, a.out)
        results.append(r)
        with open(a.out / "results.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")
        print(
            f"{name}: rc {r['rc']} in {r['wall_s']}s: "
            + json.dumps({k: v for k, v in r.items() if k not in ("tail",)}),
            flush=True,
        )
        if r["rc"] != 0:
            print(r["tail"], flush=True)
    head = f"card {card} x{a.gpus}, date {time.strftime('%Y-%m-%d')}, bf16 matmul peak {peak:.0f} TFLOP/s, seq {SEQ}, {a.warmup} warm-up + {a.steps} timed steps"
    from launcher.plan.memory import ModelShape

    params = ModelShape.from_config(json.loads((a.config / "config.json").read_text())).params()
    text = head + "\n\n" + table(results, peak, params) + "\n"
    (a.out / "results.md").write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
