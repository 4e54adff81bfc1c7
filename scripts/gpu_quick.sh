#!/usr/bin/env bash
# One short GPU session: tiny-model parity on 2 GPUs, then an 8B-shape rehearsal for throughput/memory.
# Usage (GPU host, repo root): bash scripts/gpu_quick.sh OUTDIR
set -uo pipefail
OUT=${1:-/tmp/gpu-quick}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.csv"
timeout 150 bash scripts/gpu_parity.sh "$OUT/parity" 2>&1 | tee "$OUT/parity.txt"
timeout 170 python3 -m launcher.cli run recipes/llama8b-rehearsal.toml --gpus 2 --set "log.runs_dir=\"$OUT/r8b\"" > "$OUT/r8b.out" 2>&1
echo "r8b rc=$?"
python3 - "$OUT" <<'PY'
import json, sys, glob, statistics
out = sys.argv[1]
f = sorted(glob.glob(f"{out}/r8b/*/*/metrics.jsonl"))
if f:
    recs = [json.loads(x) for x in open(f[-1])]
    steps = [r for r in recs if r["event"] == "step"]
    start = [r for r in recs if r["event"] == "start"]
    loaded = [r for r in recs if r["event"] == "loaded"]
    tps = [r["tokens_per_s_per_gpu"] for r in steps[3:]]
    print("8B mb2 ckpt 2 GPUs: steps", len(steps), "median tok/s/gpu after 3 warm-up:", round(statistics.median(tps)) if tps else None)
    if steps:
        print("peak reserved per rank GiB:", steps[-1].get("rank_gpu_reserved_gb"), "alloc:", steps[-1].get("rank_gpu_alloc_gb"))
    print("loaded:", {k: loaded[0][k] for k in loaded[0] if k not in ("event",)} if loaded else None)
    print("start:", start[0] if start else None)
    print("losses:", [round(r["loss"], 4) for r in steps])
PY
tail -5 "$OUT/r8b.out"
