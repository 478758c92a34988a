#!/usr/bin/env bash
# The megatron backend on a 2-GPU machine (device tool: kind nvidia-h200-x2, carry .whl; see README).
#   bash scripts/gpu_megatron.sh [tests|bench|all]      (default: all)
# tests: the megatron tests on megatron-core 0.19 / Python 3.12 (the CPU ones with the GPUs hidden,
#        then the `gpu` ones: schedule vs HF at TP=2 / TP=2+SP / PP=2, packed bf16, and run.py
#        through Lightning with parallel=tp2 / tp2_sp / pp2 against one GPU);
# (SKIP_CPU_TESTS=1: only the gpu ones)
# bench: benchmarks/train_step.py (single-GPU rows with profiler tables, then TP=2 and TP=2+SP).
# .whl holds Python 3.12 wheels of what the image lacks (megatron-core, hydra-core, omegaconf,
# antlr4-python3-runtime; lightning/pytest where missing). Logs and JSON go to $OUT (default ./gpu_out).
set -uo pipefail
STAGE=${1:-all}
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # keep NVLink multicast off
PY=${PY:-python3}
LOG="$OUT/gpu_megatron.log"
{
  echo "== $(date -u) stage=$STAGE $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tr '\n' ';')"
  $PY -c 'import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__, torch.cuda.device_count(), "GPUs")'
  SITE=$(mktemp -d)
  for whl in .whl/*.whl; do
    mod=$(basename "$whl" | cut -d- -f1)
    case "$mod" in megatron_core|hydra_core|omegaconf|antlr4_python3_runtime) ;;
      *) if $PY -c "import $mod" 2>/dev/null; then continue; fi ;;
    esac
    $PY -m pip install --no-deps --quiet --target "$SITE" "$whl" 2>/dev/null || { echo "pip failed for $whl: unzipping"; $PY -m zipfile -e "$whl" "$SITE"; }
    echo "installed $(basename "$whl")"
  done
  echo "SITE=$SITE"
} >> "$LOG" 2>&1
SITE=$(grep '^SITE=' "$LOG" | tail -1 | cut -d= -f2)
export PYTHONPATH=".:$SITE${PYTHONPATH:+:$PYTHONPATH}"
$PY -c 'import megatron.core, lightning, hydra; print("megatron-core", megatron.core.__version__, "lightning", lightning.__version__, "hydra", hydra.__version__)' >> "$LOG" 2>&1

if { [ "$STAGE" = tests ] || [ "$STAGE" = all ]; } && [ -z "${SKIP_CPU_TESTS:-}" ]; then
  start=$(date +%s)
  CUDA_VISIBLE_DEVICES= $PY -m pytest tests/test_megatron.py -m "megatron and not gpu" -k "not run_py" -p no:cacheprovider -q \
    > "$OUT/tests.log" 2>&1
  echo "== CPU tests rc=$? in $(( $(date +%s) - start )) s" >> "$LOG"
fi
if [ "$STAGE" = tests ] || [ "$STAGE" = all ]; then
  start=$(date +%s)
  $PY -m pytest tests/test_megatron.py -m gpu -p no:cacheprovider -q -rA --durations=0 >> "$OUT/tests.log" 2>&1
  echo "== GPU tests rc=$? in $(( $(date +%s) - start )) s" >> "$LOG"
fi

if [ "$STAGE" = bench ] || [ "$STAGE" = all ]; then
  start=$(date +%s)
  timeout 300 $PY benchmarks/train_step.py --out "$OUT/train_step.json" --profile "$OUT/profile" >> "$OUT/bench.log" 2>&1
  echo "== benchmark (1 GPU rows) rc=$? in $(( $(date +%s) - start )) s" >> "$LOG"
  for sp in "" "--sp"; do
    start=$(date +%s)
    # CUDA_DEVICE_MAX_CONNECTIONS=1: megatron's TP linears overlap their gradient all-reduce with the
    # weight-gradient GEMM only when kernels launch in order (megatron's own launchers set it too)
    CUDA_DEVICE_MAX_CONNECTIONS=1 timeout 200 $PY -m torch.distributed.run --standalone --nproc_per_node 2 \
      benchmarks/train_step.py --only megatron --tp 2 $sp --out "$OUT/train_step.json" --profile "$OUT/profile" >> "$OUT/bench.log" 2>&1
    echo "== benchmark (TP=2 $sp) rc=$? in $(( $(date +%s) - start )) s" >> "$LOG"
  done
  grep -v "Warning\|warnings.warn" "$OUT/bench.log" | tail -30
fi
[ -f "$OUT/tests.log" ] && tail -60 "$OUT/tests.log"
cat "$LOG"
