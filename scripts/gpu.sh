#!/usr/bin/env bash
# Every GPU test and the training-step benchmark, on a machine with 2 (or 4) CUDA GPUs.
#   bash scripts/gpu.sh [tests|megatron|hf|bench|all]      (default: all; tests = megatron + hf)
# megatron: tests/test_megatron.py -m gpu (schedule vs HF at TP=2 / TP=2+SP / PP=2, packed bf16, and
#           run.py backend=megatron parallel=tp2 / tp2_sp / pp2 against one GPU, resumed, export reloaded);
# hf:       tests/test_gpu_hf.py -m gpu (run.py backend=hf parallel=ddp / fsdp against one GPU, bf16 FSDP2);
# bench:    benchmarks/train_step.py: 1-GPU rows, then Megatron TP=2, TP=2+SP, PP=2 and the HF backend
#           sharded with FSDP2 (bf16 parameters; float32 master weights with bf16 compute).
# Python 3.12 wheels of what the GPU image lacks go in .wheels-dir (default .whl: megatron-core, hydra-core,
# omegaconf, antlr4-python3-runtime); logs and JSON go to $OUT (default ./gpu_out).
# Exits non-zero when any stage fails or runs past its time limit (each stage is bounded by `timeout`).
set -uo pipefail
STAGE=${1:-all}
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
WHEELS=${WHEELS:-.whl}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # keep NVLink multicast off
export PYTHONUNBUFFERED=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=3
PY=${PY:-python3}
LOG="$OUT/gpu.log"
FAILED=()

note() { echo "== $*" | tee -a "$LOG"; }
run_bounded() {  # NAME LIMIT_S COMMAND...: SIGABRT (every process dumps its stacks) past the limit, then SIGKILL
  local name=$1 limit=$2; shift 2
  local start rc
  start=$(date +%s)
  timeout --signal=ABRT --kill-after=30 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$rc" > "$OUT/$name.rc"
  note "$name rc=$rc in $(( $(date +%s) - start )) s (limit $limit s)"
}
stage() { run_bounded "$@"; check "$1"; }
check() { local rc; rc=$(cat "$OUT/$1.rc" 2>/dev/null || echo missing); [ "$rc" = 0 ] || FAILED+=("$1(rc=$rc)"); }

note "$(date -u) stage=$STAGE $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tr '\n' ';')"
$PY -c 'import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__, torch.cuda.device_count(), "GPUs")' | tee -a "$LOG"
SITE=$(mktemp -d)
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl >> "$LOG" 2>&1 \
    || { note "wheel install failed"; exit 2; }
fi
export PYTHONPATH=".:$SITE${PYTHONPATH:+:$PYTHONPATH}"
$PY -c 'import megatron.core, lightning, hydra; print("megatron-core", megatron.core.__version__, "lightning", lightning.__version__, "hydra", hydra.__version__)' 2>&1 | tail -1 | tee -a "$LOG"
PYTEST=($PY -m pytest -p no:cacheprovider -q -rA --durations=0 -o timeout=600)

# every gpu test at once over pytest-xdist workers (small models: the GPUs have room, the host has the
# cores), so the slowest test, not their sum, sets the time; PYTEST_K selects (-k)
TESTS=()
{ [ "$STAGE" = tests ] || [ "$STAGE" = megatron ] || [ "$STAGE" = all ]; } && TESTS+=(tests/test_megatron.py)
{ [ "$STAGE" = tests ] || [ "$STAGE" = hf ] || [ "$STAGE" = all ]; } && TESTS+=(tests/test_gpu_hf.py)
if [ ${#TESTS[@]} -gt 0 ]; then
  stage gpu_tests "${TEST_LIMIT_S:-540}" "${PYTEST[@]}" -n "${XDIST_WORKERS:-9}" "${TESTS[@]}" -m gpu ${PYTEST_K:+-k "$PYTEST_K"}
fi
if [ "$STAGE" = bench ] || [ "$STAGE" = all ]; then
  BENCH=(benchmarks/train_step.py --out "$OUT/train_step.json" ${BENCH_ARGS:-})  # BENCH_ARGS="--profile DIR" etc.
  RUN2=($PY -m torch.distributed.run --standalone --nproc_per_node 2)
  ROWS=${BENCH_ROWS:-1gpu tp2 tp2_sp pp2 fsdp2 fsdp2_mp}  # a subset: BENCH_ROWS="tp2 fsdp2"
  for row in $ROWS; do
    case $row in
      1gpu) stage bench_1gpu 300 $PY "${BENCH[@]}" ;;
      tp1) stage bench_tp1 200 $PY "${BENCH[@]}" --only megatron ;;  # the megatron row of 1gpu alone
      # CUDA_DEVICE_MAX_CONNECTIONS=1: megatron's TP linears overlap their gradient all-reduce with the
      # weight-gradient GEMM only when kernels launch in order (megatron's own launchers set it too)
      tp2) CUDA_DEVICE_MAX_CONNECTIONS=1 stage bench_tp2 200 "${RUN2[@]}" "${BENCH[@]}" --only megatron --tp 2 ;;
      tp2_sp) CUDA_DEVICE_MAX_CONNECTIONS=1 stage bench_tp2_sp 200 "${RUN2[@]}" "${BENCH[@]}" --only megatron --tp 2 --sp ;;
      tp2_b2) CUDA_DEVICE_MAX_CONNECTIONS=1 stage bench_tp2_b2 200 "${RUN2[@]}" "${BENCH[@]}" --only megatron --tp 2 --batch 2 ;;
      pp2) stage bench_pp2 200 "${RUN2[@]}" "${BENCH[@]}" --only megatron --pp 2 --micro-batches 8 ;;
      fsdp2) stage bench_fsdp2 200 "${RUN2[@]}" "${BENCH[@]}" --only fsdp ;;
      fsdp2_mp) stage bench_fsdp2_mp 200 "${RUN2[@]}" "${BENCH[@]}" --only fsdp --fsdp-mp ;;
      *) note "unknown benchmark row $row"; FAILED+=("bench_$row") ;;
    esac
  done
  grep -v "Warning\|warnings.warn" "$OUT"/bench_*.log | grep -E "row|split_|part|matmul|predicted|^profile" | tail -40
fi
[ -f "$OUT/gpu_tests.log" ] && { echo "---- gpu_tests"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed" "$OUT/gpu_tests.log" | tail -25; }
cat "$LOG"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "FAILED stages: ${FAILED[*]}"
  exit 1
fi
echo "all stages passed"
