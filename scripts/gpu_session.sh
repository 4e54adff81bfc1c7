#!/usr/bin/env bash
# The GPU measurements of bench/RESULTS.md, on a 4-GPU host, in two parts that each fit one device call.
#   bash scripts/gpu_session.sh 1 OUT   # 8B checkpoint + NF4 copy; GPUs 0,1: peers and qlaunch at the peers'
#                                       # settings; GPUs 2,3: tiny-model parity, then qlaunch's own settings
#   bash scripts/gpu_session.sh 2 OUT   # GPUs 0,1: peers and qlaunch at batch 2 again, the FSDP2 peer at 8,
#                                       # accelerate launch; GPUs 2,3: parity again, then the 1-GPU rows
#   bash scripts/gpu_session.sh 3 OUT   # 4-GPU 8B; 70B rehearsal on 4 GPUs with a checkpoint and a resume
# Two 2-GPU streams run at the same time on disjoint GPU pairs (part 1), so compare rows of the same stream.
set -uo pipefail
PART=$1
OUT=${2:-/tmp/gpu-out}
B=/tmp/bench
mkdir -p "$OUT" "$B"
nvidia-smi --query-gpu=index,name,memory.total --format=csv > "$OUT/gpus.csv"
stream() {  # stream NAME GPUS ROWS [args...]: one bench.py invocation with its own results dir
  local name=$1 gpus=$2 rows=$3
  shift 3
  mkdir -p "$B/$name"
  for f in model-bf16 model-nf4 tokens.jsonl; do ln -sfn "$B/$f" "$B/$name/$f"; done
  CUDA_VISIBLE_DEVICES=$gpus python3 scripts/bench.py "$B/$name" --rows "$rows" "$@" > "$OUT/$name.txt" 2>&1
  cp "$B/$name/results.jsonl" "$OUT/$name.results.jsonl" 2>/dev/null
}
t0=$(date +%s)
if [ "$PART" = 1 ]; then
  CUDA_VISIBLE_DEVICES=0 python3 scripts/bench.py "$B" --prepare-only > "$OUT/prepare.txt" 2>&1
  echo "prepare rc=$? after $(( $(date +%s) - t0 ))s"; cat "$OUT/prepare.txt"
  ( CUDA_VISIBLE_DEVICES=2,3 timeout 200 bash scripts/gpu_parity.sh /tmp/parity > "$OUT/parity.txt" 2>&1
    stream s1b 2,3 qlaunch-fsdp2-mb8,qlaunch-fsdp2-auto,qlaunch-zero3-mb2,accelerate-fsdp2-mb2 --port 29711 ) &
  stream s1a 0,1 qlaunch-fsdp2-mb2,qlaunch-fsdp2-mb2-prequant,peer-fsdp2-mb2,peer-fsdp1-mb2,peer-zero3-mb2
  wait
elif [ "$PART" = 2 ]; then
  [ -e "$B/model-bf16" ] || CUDA_VISIBLE_DEVICES=0 python3 scripts/bench.py "$B" --prepare-only > "$OUT/prepare.txt" 2>&1
  ( CUDA_VISIBLE_DEVICES=2,3 timeout 330 bash scripts/gpu_parity.sh /tmp/parity > "$OUT/parity.txt" 2>&1
    stream s2b 2 qlaunch-fsdp2-mb2,qlaunch-fsdp2-mb2-nockpt,qlaunch-fsdp2-mb8 --gpus 1 --port 29811 ) &
  stream s2a 0,1 peer-fsdp2-mb2,qlaunch-fsdp2-mb2,peer-fsdp1-mb2,peer-fsdp2-mb8,accelerate-fsdp2-mb2
  wait
else
  [ -e "$B/model-bf16" ] || CUDA_VISIBLE_DEVICES=0 python3 scripts/bench.py "$B" --prepare-only > "$OUT/prepare.txt" 2>&1
  stream s3a 0,1,2,3 qlaunch-fsdp2-mb2 --gpus 4 --port 29611
  # 70B rehearsal (Llama-3-70B shapes, random weights) on 4 GPUs, random-token rows: 8 steps with a
  # checkpoint every 4, then a resume that runs 2 more.
  R70=(--set "log.runs_dir=\"$B/r70\"" --set "data.datasets=[{path=\"$B/tokens.jsonl\"}]" --set 'data.format="tokenized"'
       --set data.packing=false --set checkpoint.every_steps=4 --set 'train.schedule="constant"' --set train.warmup_steps=0)
  timeout 240 python3 -m launcher.cli run recipes/llama70b-qlora.toml --gpus 4 "${R70[@]}" --set train.max_steps=8 > "$OUT/r70.txt" 2>&1
  echo "70B rc=$?"
  timeout 150 python3 -m launcher.cli run recipes/llama70b-qlora.toml --gpus 4 "${R70[@]}" --set train.max_steps=10 --resume auto > "$OUT/r70-resume.txt" 2>&1
  echo "70B resume rc=$?"
  i=0; for f in $(ls -d "$B"/r70/llama70b-qlora/*/ 2>/dev/null); do i=$((i+1)); cp "$f/metrics.jsonl" "$OUT/r70-$i.metrics.jsonl"; cp "$f/plan.json" "$OUT/r70-$i.plan.json"; done
  python3 -m launcher.cli plan recipes/llama70b-qlora.toml --gpus 4 > "$OUT/r70-plan.txt" 2>&1
fi
echo "part $PART done after $(( $(date +%s) - t0 ))s"
for f in "$OUT"/*.txt; do echo "=== $f"; tail -25 "$f"; done
