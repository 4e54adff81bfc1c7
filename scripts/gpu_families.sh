#!/usr/bin/env bash
# Model families on a GPU host: tiny checkpoints of every family (tests/families.py), the CPU family matrix of
# tests/test_families.py under this host's torch/transformers (if pytest is installed), then the GPU parity
# runs of scripts/gpu_parity.sh for the families named in FAMILIES.
# Usage (repo root): [FAMILIES="gemma3_text phi3"] [PARITY_ONLY="lr0 ref32 fsdp32"] bash scripts/gpu_families.sh OUTDIR
set -uo pipefail
OUT=${1:-/tmp/gpu-families}
mkdir -p "$OUT/models"
python3 -c "
import sys; sys.path.insert(0, '.')
from pathlib import Path
from tests.families import FAMILIES, make_checkpoint
for f in FAMILIES: make_checkpoint(f, Path('$OUT/models') / f)
" > "$OUT/models.log" 2>&1 || { echo "building the checkpoints failed"; tail -5 "$OUT/models.log"; exit 1; }
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
if python3 -m pytest --version > /dev/null 2>&1; then
  python3 -m pytest -q -p no:cacheprovider tests/test_families.py -k "not zero3 and not merged and not resumes" > "$OUT/pytest.log" 2>&1
  echo "family matrix (CPU, this host's versions): rc=$? $(tail -1 "$OUT/pytest.log")"
else
  echo "family matrix skipped: no pytest on this host"
fi
for f in ${FAMILIES:-gemma3_text phi3}; do
  extra=""
  [ "$f" = gemma2 ] && extra="--set model.attn_implementation=\"eager\""
  echo "== $f"
  MODEL="$OUT/models/$f" EXTRA="$extra" GPUS=${GPUS:-1} bash scripts/gpu_parity.sh "$OUT/$f" 2>&1 | tail -16
done
