#!/usr/bin/env bash
# GPU parity check: tiny model, real NCCL ranks. lr=0 invariance and fp32/bf16 trajectories, ref vs FSDP2.
# Usage (on a GPU host, repo root): [GPUS=1] [MODEL=DIR] [EXTRA="--set k=v ..."] bash scripts/gpu_parity.sh OUTDIR
#   GPUS: ranks of the distributed runs (default 2); MODEL: another model directory than the tiny Llama
#   (e.g. a tests/families.py checkpoint); EXTRA: settings added to every run (e.g. eager attention).
set -uo pipefail
OUT=${1:-/tmp/gpu-parity}
mkdir -p "$OUT"
Q="python3 -m launcher.cli"
R=recipes/tiny-cpu.toml
FP32=(--set 'model.dtype="float32"' --set 'quant.compute_dtype="float32"' --set 'quant.storage_dtype="float32"')
COMMON=(--set train.max_steps=6 --set train.warmup_steps=0 --set train.lr=2e-3 --set train.global_batch=8 --set train.eval_every=0)
# PARITY_ONLY="lr0 ref16 ...": run only those tags.
run() {
  local tag=$1; shift
  [ -n "${PARITY_ONLY:-}" ] && [[ " $PARITY_ONLY " != *" $tag "* ]] && return
  local model=()
  [ -n "${MODEL:-}" ] && model=(--set "model.path=\"$MODEL\"")
  # shellcheck disable=SC2086  # EXTRA is a list of flags
  $Q run $R --set "log.runs_dir=\"$OUT/$tag\"" "${model[@]}" ${EXTRA:-} "$@" > "$OUT/$tag.out" 2>&1; echo "$tag rc=$?"
}
# Two long text documents, one sample each after truncation: every global batch of 2 is the same.
python3 -c "
import json; src=[json.loads(x)['output'] for x in open('assets/tiny-data/train.jsonl')]
open('$OUT/two.jsonl','w').write(''.join(json.dumps({'text': ' '.join(src[i:i+40])})+'\n' for i in (0, 40)))"
run lr0 --gpus ${GPUS:-2} --set train.lr=0.0 --set train.max_steps=4 --set train.eval_every=1 --set train.global_batch=2 \
  --set train.micro_batch=1 --set "data.datasets=[{path=\"$OUT/two.jsonl\"}]" --set 'data.format="text"' \
  --set "data.val_path=\"$OUT/two.jsonl\""
run lr0_compile --gpus ${GPUS:-2} --set train.lr=0.0 --set train.max_steps=4 --set train.eval_every=1 --set train.global_batch=2 \
  --set train.micro_batch=1 --set "data.datasets=[{path=\"$OUT/two.jsonl\"}]" --set 'data.format="text"' \
  --set "data.val_path=\"$OUT/two.jsonl\"" --set train.compile=true
run ref32 --gpus 1 "${FP32[@]}" "${COMMON[@]}" --set 'parallel.backend="none"' --set train.micro_batch=8
run fsdp32 --gpus ${GPUS:-2} "${FP32[@]}" "${COMMON[@]}" --set train.micro_batch=2
run fsdp32_reshard --gpus ${GPUS:-2} "${FP32[@]}" "${COMMON[@]}" --set train.micro_batch=2 --set parallel.fsdp.reshard_after_forward=true
run ref16 --gpus 1 "${COMMON[@]}" --set 'parallel.backend="none"' --set train.micro_batch=8
run fsdp16 --gpus ${GPUS:-2} "${COMMON[@]}" --set train.micro_batch=2
run zero3_16 --gpus ${GPUS:-2} "${COMMON[@]}" --set train.micro_batch=2 --set 'parallel.backend="deepspeed"' --set parallel.deepspeed.stage=3
run fsdp16_compile --gpus ${GPUS:-2} "${COMMON[@]}" --set train.micro_batch=2 --set train.compile=true
run zero3_16_compile --gpus ${GPUS:-2} "${COMMON[@]}" --set train.micro_batch=2 --set 'parallel.backend="deepspeed"' --set parallel.deepspeed.stage=3 --set train.compile=true
run zero3_32_compile --gpus ${GPUS:-2} "${FP32[@]}" "${COMMON[@]}" --set train.micro_batch=2 --set 'parallel.backend="deepspeed"' --set parallel.deepspeed.stage=3 --set train.compile=true --set train.gradient_checkpointing=false
python3 - "$OUT" <<'PY'
import json, sys, glob
out = sys.argv[1]
def losses(tag, ev="step", key="loss"):
    f = sorted(glob.glob(f"{out}/{tag}/*/*/metrics.jsonl"))
    if not f: return []
    return [r[key] for r in map(json.loads, open(f[-1])) if r["event"] == ev]
for tag in ["lr0", "lr0_compile", "ref32", "fsdp32", "fsdp32_reshard", "ref16", "fsdp16", "zero3_16", "fsdp16_compile", "zero3_16_compile", "zero3_32_compile"]:
    print(tag, [round(x, 6) for x in losses(tag)])
print("lr0 eval", losses("lr0", "eval", "eval_loss"))
print("lr0_compile eval", losses("lr0_compile", "eval", "eval_loss"))
for a, b in [("fsdp32", "ref32"), ("fsdp32_reshard", "ref32"), ("fsdp16", "ref16"), ("zero3_16", "ref16"), ("fsdp16_compile", "ref16"),
             ("zero3_16_compile", "ref16"), ("zero3_32_compile", "ref32")]:
    x, y = losses(a), losses(b)
    if x and len(x) == len(y):
        print(f"max rel diff {a} vs {b}: {max(abs(p - q) / abs(q) for p, q in zip(x, y)):.2e}")
PY
