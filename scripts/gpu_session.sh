#!/usr/bin/env bash
# The GPU measurements of bench/RESULTS.md, on a 4-GPU host, in two parts that each fit one device call.
#   bash scripts/gpu_session.sh 1 OUT   # 8B checkpoint + NF4 copy; GPUs 0,1: peers and qlaunch at the peers'
#                                       # settings; GPUs 2,3: tiny-model parity, then qlaunch's own settings
#   bash scripts/gpu_session.sh 2 OUT   # GPUs 0,1: peers and qlaunch at batch 2 again, the FSDP2 peer at 8,
#                                       # accelerate launch; GPUs 2,3: parity again, then the 1-GPU rows
#   bash scripts/gpu_session.sh 3 OUT   # 4-GPU 8B; 70B rehearsal on 4 GPUs with a checkpoint and a resume
#   bash scripts/gpu_session.sh 4 OUT   # profiles of the peer and qlaunch at batch 2; train.compile rows
#   bash scripts/gpu_session.sh 5 OUT   # part 4 again after a change; GPU parity (with train.compile) beside it
#   bash scripts/gpu_session.sh 6 OUT   # 70B rehearsal on 4 GPUs with train.compile, then GPU parity with compile
#   bash scripts/gpu_session.sh 7 OUT   # the FSDP2 peer and qlaunch + train.compile at batch 2 alone; 1 GPU
#   bash scripts/gpu_session.sh 8 OUT   # scaling alone (4 GPUs, then 1 GPU, batch 2 + compile); 70B on 4 GPUs
#   bash scripts/gpu_session.sh 9 OUT   # GPUs 0,1: ZeRO-3 peer and qlaunch ZeRO-3 rows; GPUs 2,3: 70B on 2 GPUs
#                                       # capped at 24 GiB with CPU offload, then GPU parity (ZeRO-3 + compile)
#   bash scripts/gpu_session.sh 10 OUT  # part 9's 70B-offload run and ZeRO-3 parity again, side by side
#   bash scripts/gpu_session.sh 11 OUT  # profiles of the scaling rows (4 GPUs, with and without resharding
#                                       # after forward; 1 GPU); 70B on 4 GPUs with the allocator history
#   bash scripts/gpu_session.sh 12 OUT  # after the vocabulary-split loss: scaling (1 GPU first, then 4 GPUs
#                                       # resharding and keeping layers gathered); 70B on 4 GPUs, 6 steps
#   bash scripts/gpu_session.sh 13 OUT  # 70B on 4 GPUs, eager, with the allocator history; then GPU parity
# Two 2-GPU streams run at the same time on disjoint GPU pairs (parts 1, 2, 4, 5, 9), so compare rows of the
# same stream.
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
rehearse70() {  # rehearse70 NAME STEPS TIMEOUT [--set ...]: the 70B recipe on 4 GPUs, random tokens
  local name=$1 steps=$2 limit=$3
  shift 3
  python3 -c "import sys; sys.path.insert(0, 'scripts'); import bench; from pathlib import Path; bench.write_random_tokens(Path('$B/tokens70.jsonl'), 256, 512)"
  local args=(--set "log.runs_dir=\"$B/$name\"" --set "data.datasets=[{path=\"$B/tokens70.jsonl\"}]" --set 'data.format="tokenized"'
              --set data.packing=false --set 'train.schedule="constant"' --set train.warmup_steps=0 --set "train.max_steps=$steps"
              --set checkpoint.every_steps=0 --set checkpoint.save_final_adapter=false "$@")
  timeout "$limit" python3 -m launcher.cli run recipes/llama70b-qlora.toml --gpus 4 "${args[@]}" > "$OUT/$name.txt" 2>&1
  echo "70B $name rc=$?"
  for f in "$B/$name"/llama70b-qlora/*/; do
    cp "$f/metrics.jsonl" "$OUT/$name.metrics.jsonl"; cp "$f"/profile/memory-rank*.txt "$OUT/" 2>/dev/null
  done
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
elif [ "$PART" = 4 ]; then
  # Profiles (--profile: 2 extra steps per row under the torch profiler) of the peer and qlaunch at batch 2,
  # and train.compile at batch 2 and at the planner's settings.
  [ -e "$B/model-bf16" ] || CUDA_VISIBLE_DEVICES=0 python3 scripts/bench.py "$B" --prepare-only > "$OUT/prepare.txt" 2>&1
  ( stream s4b 2,3 qlaunch-fsdp2-auto-compile,qlaunch-fsdp2-auto --port 29911 --profile ) &
  stream s4a 0,1 peer-fsdp2-mb2,qlaunch-fsdp2-mb2,qlaunch-fsdp2-mb2-compile --profile
  wait
  cp "$B"/s4?/*.profile.txt "$OUT/" 2>/dev/null
elif [ "$PART" = 5 ]; then
  # After QLinear4bit (no Params4bit rebuilt per call; one compiled graph per layer): the same rows again,
  # and the tiny-model parity (now with a train.compile run) on the other pair.
  [ -e "$B/model-bf16" ] || CUDA_VISIBLE_DEVICES=0 python3 scripts/bench.py "$B" --prepare-only > "$OUT/prepare.txt" 2>&1
  ( CUDA_VISIBLE_DEVICES=2,3 timeout 300 bash scripts/gpu_parity.sh /tmp/parity > "$OUT/parity.txt" 2>&1
    stream s5b 2,3 qlaunch-fsdp2-auto-compile --port 29911 --profile ) &
  stream s5a 0,1 peer-fsdp2-mb2,qlaunch-fsdp2-mb2,qlaunch-fsdp2-mb2-compile --profile
  wait
  cp "$B"/s5?/*.profile.txt "$OUT/" 2>/dev/null
elif [ "$PART" = 6 ]; then
  # 70B rehearsal on 4 GPUs with train.compile (8 steps, the last 2 profiled), then GPU parity with compile.
  python3 -c "import sys; sys.path.insert(0, 'scripts'); import bench; from pathlib import Path; bench.write_random_tokens(Path('$B/tokens70.jsonl'), 256, 512)"
  R70=(--set "log.runs_dir=\"$B/r70c\"" --set "data.datasets=[{path=\"$B/tokens70.jsonl\"}]" --set 'data.format="tokenized"'
       --set data.packing=false --set 'train.schedule="constant"' --set train.warmup_steps=0 --set train.compile=true
       --set train.max_steps=8 --set "log.profile_steps=[7,8]")
  timeout 250 python3 -m launcher.cli run recipes/llama70b-qlora.toml --gpus 4 "${R70[@]}" > "$OUT/r70c.txt" 2>&1
  echo "70B compile rc=$?"
  for f in "$B"/r70c/llama70b-qlora/*/; do cp "$f/metrics.jsonl" "$OUT/r70c.metrics.jsonl"; cp "$f/profile/rank0.txt" "$OUT/r70c.profile.txt"; done
  CUDA_VISIBLE_DEVICES=0,1 PARITY_ONLY="lr0 lr0_compile ref16 fsdp16 fsdp16_compile" timeout 230 bash scripts/gpu_parity.sh /tmp/parity > "$OUT/parity.txt" 2>&1
elif [ "$PART" = 7 ]; then
  # A clean same-settings comparison on 2 GPUs (nothing else running): the FSDP2 peer, then qlaunch with
  # train.compile; then qlaunch with train.compile on 1 GPU. No pre-quantized copy is written.
  CUDA_VISIBLE_DEVICES=0,1 timeout 230 python3 scripts/bench.py "$B/s7" --rows peer-fsdp2-mb2,qlaunch-fsdp2-mb2-compile > "$OUT/s7a.txt" 2>&1
  CUDA_VISIBLE_DEVICES=0 timeout 100 python3 scripts/bench.py "$B/s7" --rows qlaunch-fsdp2-mb2-compile --gpus 1 --port 29811 > "$OUT/s7b.txt" 2>&1
  cp "$B/s7/results.jsonl" "$OUT/s7.results.jsonl" 2>/dev/null
elif [ "$PART" = 8 ]; then
  # Per-GPU scaling at the same per-GPU batch, nothing else running: 4 GPUs, then 1 GPU. Then the 70B
  # rehearsal on 4 GPUs (lm_head gathered only for the loss), 6 steps.
  CUDA_VISIBLE_DEVICES=0,1,2,3 timeout 200 python3 scripts/bench.py "$B/s8" --rows qlaunch-fsdp2-mb2-compile --gpus 4 > "$OUT/s8a.txt" 2>&1
  CUDA_VISIBLE_DEVICES=0 timeout 110 python3 scripts/bench.py "$B/s8" --rows qlaunch-fsdp2-mb2-compile --gpus 1 --port 29811 > "$OUT/s8b.txt" 2>&1
  cp "$B/s8/results.jsonl" "$OUT/s8.results.jsonl" 2>/dev/null
  rehearse70 r70h 6 200
elif [ "$PART" = 9 ]; then
  # GPUs 0,1: the ZeRO-3 peer, then qlaunch ZeRO-3 (each layer one ZeRO-3 unit) eager and compiled at batch 2,
  # and compiled at batch 4 without checkpointing. GPUs 2,3: 70B on 2 GPUs, each capped at 24 GiB, FSDP2 with
  # CPU offload, 3 steps; then GPU parity of ZeRO-3 + compile.
  python3 -c "import sys; sys.path.insert(0, 'scripts'); import bench; from pathlib import Path; bench.write_random_tokens(Path('$B/tokens70.jsonl'), 256, 512)"
  R70=(--set "log.runs_dir=\"$B/r70o\"" --set "data.datasets=[{path=\"$B/tokens70.jsonl\"}]" --set 'data.format="tokenized"'
       --set data.packing=false --set 'train.schedule="constant"' --set train.warmup_steps=0 --set train.max_steps=3
       --set checkpoint.every_steps=0 --set checkpoint.save_final_adapter=false --set launch.master_port=29931
       --set parallel.fsdp.cpu_offload=true --set launch.gpu_memory_gb=24)
  ( CUDA_VISIBLE_DEVICES=2,3 timeout 330 python3 -m launcher.cli run recipes/llama70b-qlora.toml --gpus 2 "${R70[@]}" > "$OUT/r70o.txt" 2>&1
    echo "70B offload rc=$?"
    for f in "$B"/r70o/llama70b-qlora/*/; do cp "$f/metrics.jsonl" "$OUT/r70o.metrics.jsonl"; done
    CUDA_VISIBLE_DEVICES=2,3 PARITY_ONLY="ref16 ref32 zero3_16_compile zero3_32_compile" timeout 200 bash scripts/gpu_parity.sh /tmp/parity > "$OUT/parity.txt" 2>&1 ) &
  CUDA_VISIBLE_DEVICES=0,1 timeout 540 python3 scripts/bench.py "$B/s9" --rows qlaunch-zero3-mb2-compile,qlaunch-zero3-mb4-nockpt-compile,qlaunch-zero3-mb2,peer-zero3-mb2 > "$OUT/s9.txt" 2>&1
  cp "$B/s9/results.jsonl" "$OUT/s9.results.jsonl" 2>/dev/null
  wait
elif [ "$PART" = 10 ]; then
  # Part 9's two GPU-pair jobs again after its fixes, alone: 70B on 2 GPUs capped at 24 GiB with CPU offload
  # (GPUs 0,1; 3 steps), and the ZeRO-3 + compile parity with its summary (GPUs 2,3, or PARITY_GPUS).
  python3 -c "import sys; sys.path.insert(0, 'scripts'); import bench; from pathlib import Path; bench.write_random_tokens(Path('$B/tokens70.jsonl'), 256, 512)"
  R70=(--set "log.runs_dir=\"$B/r70o\"" --set "data.datasets=[{path=\"$B/tokens70.jsonl\"}]" --set 'data.format="tokenized"'
       --set data.packing=false --set 'train.schedule="constant"' --set train.warmup_steps=0 --set train.max_steps=3
       --set checkpoint.every_steps=0 --set checkpoint.save_final_adapter=false
       --set parallel.fsdp.cpu_offload=true --set launch.gpu_memory_gb=24)
  ( CUDA_VISIBLE_DEVICES=${PARITY_GPUS:-2,3} PARITY_ONLY="ref16 ref32 zero3_16_compile zero3_32_compile" timeout 330 bash scripts/gpu_parity.sh /tmp/parity > "$OUT/parity.txt" 2>&1 ) &
  CUDA_VISIBLE_DEVICES=0,1 timeout 420 python3 -m launcher.cli run recipes/llama70b-qlora.toml --gpus 2 "${R70[@]}" > "$OUT/r70o.txt" 2>&1
  echo "70B offload rc=$?"
  for f in "$B"/r70o/llama70b-qlora/*/; do cp "$f/metrics.jsonl" "$OUT/r70o.metrics.jsonl"; tail -40 "$f/logs/rank0.log" > "$OUT/r70o.rank0.log"; done
  wait
elif [ "$PART" = 11 ]; then
  # Where the 4-GPU time goes against 1 GPU (profiles of 2 extra steps per row), and what is live at the 70B
  # peak (log.memory_steps over steps 2-3 of 4).
  CUDA_VISIBLE_DEVICES=0,1,2,3 timeout 290 python3 scripts/bench.py "$B/s11" --rows qlaunch-fsdp2-mb2-compile,qlaunch-fsdp2-mb2-compile-keep --gpus 4 --profile > "$OUT/s11a.txt" 2>&1
  for f in "$B"/s11/*.profile.txt; do cp "$f" "$OUT/g4-$(basename "$f")"; done
  CUDA_VISIBLE_DEVICES=0 timeout 110 python3 scripts/bench.py "$B/s11" --rows qlaunch-fsdp2-mb2-compile --gpus 1 --port 29811 --profile > "$OUT/s11b.txt" 2>&1
  cp "$B/s11/qlaunch-fsdp2-mb2-compile.profile.txt" "$OUT/g1-qlaunch-fsdp2-mb2-compile.profile.txt" 2>/dev/null
  cp "$B/s11/results.jsonl" "$OUT/s11.results.jsonl" 2>/dev/null
  rehearse70 r70m 4 150 --set "log.memory_steps=[2,3]"
elif [ "$PART" = 12 ]; then
  CUDA_VISIBLE_DEVICES=0 timeout 150 python3 scripts/bench.py "$B/s12" --rows qlaunch-fsdp2-mb2-compile --gpus 1 --port 29811 > "$OUT/s12a.txt" 2>&1
  CUDA_VISIBLE_DEVICES=0,1,2,3 timeout 230 python3 scripts/bench.py "$B/s12" --rows qlaunch-fsdp2-mb2-compile-keep,qlaunch-fsdp2-mb2-compile --gpus 4 > "$OUT/s12b.txt" 2>&1
  cp "$B/s12/results.jsonl" "$OUT/s12.results.jsonl" 2>/dev/null
  rehearse70 r70v 6 170
elif [ "$PART" = 13 ]; then
  rehearse70 r70m 4 200 --set "log.memory_steps=[2,3]"
  # Each parity run takes about a minute on a fresh machine: 300 s (as in call 3 of the fifth session) ran
  # out after 5 runs. Their outputs go under OUT.
  CUDA_VISIBLE_DEVICES=0,1 PARITY_ONLY="lr0 ref32 fsdp32 fsdp32_reshard ref16 fsdp16 fsdp16_compile" timeout 450 bash scripts/gpu_parity.sh "$OUT/parity" > "$OUT/parity.txt" 2>&1
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
