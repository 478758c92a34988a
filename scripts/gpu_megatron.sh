#!/usr/bin/env bash
# The megatron backend on a 2-GPU machine (device tool: kind nvidia-h200-x2, carry .whl):
# installs the carried megatron-core wheel, runs the megatron tests (CPU ones too, on megatron-core
# 0.19 / Python 3.12; the run.py ones need hydra and are deselected), then benchmarks/train_step.py
# (single GPU rows, then TP=2 over both GPUs). Logs and JSON go to $OUT (default ./gpu_out).
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # keep NVLink multicast off
PY=${PY:-python3}
LOG="$OUT/gpu_megatron.log"
{
  echo "== $(date -u) $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tr '\n' ';')"
  $PY -c 'import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__, torch.cuda.device_count(), "GPUs")'
  SITE=$(mktemp -d)
  # megatron-core always; lightning / pytest (and its deps) only where the image lacks them
  for whl in .whl/*.whl; do
    mod=$(basename "$whl" | cut -d- -f1)
    if [ "$mod" != megatron_core ] && $PY -c "import $mod" 2>/dev/null; then continue; fi
    $PY -m pip install --no-deps --quiet "$whl" 2>/dev/null || { echo "pip failed for $whl: unzipping"; $PY -m zipfile -e "$whl" "$SITE"; }
    echo "installed $(basename "$whl")"
  done
  export PYTHONPATH=".:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  $PY -c 'import megatron.core, lightning; print("megatron-core", megatron.core.__version__, "lightning", lightning.__version__)'
} > "$LOG" 2>&1

start=$(date +%s)
# the CPU tests (inputs on the CPU) with the GPUs hidden: megatron-core 0.19 / Python 3.12 on CPU
CUDA_VISIBLE_DEVICES= $PY -m pytest tests/test_megatron.py -m "megatron and not gpu" -k "not run_py" -p no:cacheprovider -q \
  > "$OUT/tests.log" 2>&1
echo "== CPU tests rc=$? in $(( $(date +%s) - start )) s" >> "$LOG"
start=$(date +%s)
$PY -m pytest tests/test_megatron.py -m gpu -p no:cacheprovider -q -rA >> "$OUT/tests.log" 2>&1
echo "== GPU tests rc=$? in $(( $(date +%s) - start )) s" >> "$LOG"

mkdir -p benchmarks/results
start=$(date +%s)
timeout 300 $PY benchmarks/train_step.py --out "$OUT/train_step.json" >> "$OUT/bench.log" 2>&1
echo "== benchmark (1 GPU rows) rc=$? in $(( $(date +%s) - start )) s" >> "$LOG"
start=$(date +%s)
timeout 200 $PY -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/train_step.py --only megatron --tp 2 \
  --out "$OUT/train_step.json" >> "$OUT/bench.log" 2>&1
echo "== benchmark (TP=2) rc=$? in $(( $(date +%s) - start )) s" >> "$LOG"
grep -v "Warning\|warnings.warn" "$OUT/bench.log" | tail -30
tail -40 "$OUT/tests.log"
cat "$LOG"
