#!/usr/bin/env bash
# Rehearsals of bundled model-family recipes on one GPU: the planner's estimate, then a short run; prints tok/s
# (median after 3 warm-up steps), peak GPU memory and the losses of each.
# Usage (GPU host, repo root): [STEPS=10] bash scripts/gpu_rehearsals.sh OUTDIR RECIPE[:TAG[:--set k=v ...]] ...
#   e.g. bash scripts/gpu_rehearsals.sh /tmp/r recipes/qwen7b-rehearsal.toml "recipes/qwen7b-rehearsal.toml:dora:--set lora.use_dora=true"
set -uo pipefail
OUT=$1; shift
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.csv" 2>/dev/null
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
for spec in "$@"; do
  IFS=: read -r recipe tag sets <<< "$spec"
  tag=${tag:-$(basename "$recipe" .toml)}
  # shellcheck disable=SC2086  # sets is a list of flags
  python3 -m launcher.cli plan "$recipe" --gpus 1 --set train.micro_batch=2 $sets > "$OUT/plan-$tag.txt" 2>&1
  # shellcheck disable=SC2086
  python3 -m launcher.cli run "$recipe" --gpus 1 --set train.micro_batch=2 --set "train.max_steps=${STEPS:-10}" \
    --set "log.runs_dir=\"$OUT/$tag\"" $sets > "$OUT/run-$tag.out" 2>&1
  rc=$?
  python3 - "$OUT" "$tag" "$rc" <<'PY'
import glob, json, statistics, sys
out, tag, rc = sys.argv[1:]
files = sorted(glob.glob(f"{out}/{tag}/*/*/metrics.jsonl"))
recs = [json.loads(x) for x in open(files[-1])] if files else []
steps = [r for r in recs if r["event"] == "step"]
tps = [r["tokens_per_s"] for r in steps[3:]]
done = [r for r in recs if r["event"] == "done"]
peak = done[-1] if done else (steps[-1] if steps else {})
plan = [" ".join(x.split()) for x in open(f"{out}/plan-{tag}.txt") if x.startswith(("total", "  torch allocator"))]
print(f"== {tag}: rc={rc} steps={len(steps)} median tok/s={round(statistics.median(tps)) if tps else None}"
      f" peak reserved GiB={peak.get('gpu_reserved_gb', 0):.2f} alloc GiB={peak.get('gpu_alloc_gb', 0):.2f}")
print("   losses", [round(r["loss"], 4) for r in steps])
print("   plan:", "; ".join(plan))
PY
  [ "$rc" = 0 ] || tail -5 "$OUT/run-$tag.out"
done
