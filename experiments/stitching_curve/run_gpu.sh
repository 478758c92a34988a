#!/usr/bin/env bash
# The stitching-curve study on one GPU, as run for its README.
#   OUT=out SEEDS=0,1,2 bash experiments/stitching_curve/run_gpu.sh STDLIB_JSONL
# STDLIB_JSONL: the stdlib source documents of the machine the results are read on (Python 3.11 here),
# as {"text": ...} lines, so that validation holds out exactly those files (a GPU machine's own stdlib
# is another Python's: files held out there may have been trained on in their 3.11 form).
# Wheels the GPU image lacks (hydra-core, omegaconf, antlr4, hydra-joblib-launcher, joblib) in .whl/.
# REF_SEEDS="1 2": first train the donors alike for these seeds (python -m splitllama.run.references), one
# process per seed beside the sweep of the seeds in SEEDS_FIRST, then sweep the rest (SEEDS); their cache
# ($SPLITLLAMA_CACHE/references, carried in .carry/references if there) comes back in $OUT/references.tar.gz.
# Writes $OUT/study.tar.gz (every job's results.json, overrides, metrics.csv) and logs; exits non-zero when
# a step fails or runs past the deadline (BUDGET_S).
set -uo pipefail
DOCS=$(realpath "$1")
OUT=${OUT:-study_out}; mkdir -p "$OUT"
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-550} ))
left() { echo $(( DEADLINE - $(date +%s) - ${1:-0} )); }
export PYTHONUNBUFFERED=1 SPLITLLAMA_CACHE=${SPLITLLAMA_CACHE:-/tmp/splitllama-cache}
mkdir -p "$SPLITLLAMA_CACHE/references"
[ -d .carry/references ] && cp .carry/references/tuned-*.json "$SPLITLLAMA_CACHE/references/" 2>/dev/null
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl || exit 2
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
DATA="data=files data.files=[$DOCS] data.seq_len=128 data.batch_size=8 data.max_val_blocks=128 parallel.accelerator=gpu"
SWEEP="-m experiment=stitching_curve hydra/launcher=joblib hydra.launcher.n_jobs=${N_JOBS:-12} parallel.cpu_threads=1"
FAILED=()
REFS=()
for s in ${REF_SEEDS:-}; do
  # shellcheck disable=SC2086
  SPLITLLAMA_CACHE=/tmp/refcache_$s timeout "$(left 30)" python3 -m splitllama.run.references $DATA seed=$s parallel.cpu_threads=1 \
    > "$OUT/references_seed$s.log" 2>&1 &
  REFS+=($!)
done
if [ -n "${SEEDS_FIRST:-}" ]; then
  # shellcheck disable=SC2086
  timeout "$(left 20)" python3 run.py $SWEEP $DATA seed=$SEEDS_FIRST hydra.sweep.dir=/tmp/study/first_$(date +%s) > "$OUT/study_first.log" 2>&1
  rc=$?; echo "sweep seed=$SEEDS_FIRST rc=$rc"; [ $rc = 0 ] || FAILED+=("sweep-first($rc)")
fi
for p in "${REFS[@]}"; do wait "$p"; rc=$?; echo "references pid $p rc=$rc"; [ $rc = 0 ] || FAILED+=("references($rc)"); done
for s in ${REF_SEEDS:-}; do cp /tmp/refcache_$s/references/tuned-*.json "$SPLITLLAMA_CACHE/references/" 2>/dev/null; done
if [ -n "${SEEDS:-}" ]; then
  # shellcheck disable=SC2086
  timeout "$(left 20)" python3 run.py $SWEEP $DATA seed=$SEEDS hydra.sweep.dir=/tmp/study/rest_$(date +%s) > "$OUT/study_rest.log" 2>&1
  rc=$?; echo "sweep seed=$SEEDS rc=$rc"; [ $rc = 0 ] || FAILED+=("sweep($rc)")
fi
echo "runs with results: $(ls /tmp/study/*/*/results.json 2>/dev/null | wc -l)"
[ -d /tmp/study ] && tar --exclude='*.ckpt' --exclude='checkpoints' --exclude='*.safetensors' -czf "$OUT/study.tar.gz" -C /tmp study
tar --exclude='references/work' --exclude='*.lock' -czf "$OUT/references.tar.gz" -C "$SPLITLLAMA_CACHE" references
python3 - <<'PYEOF'
import json, pathlib
for f in sorted(pathlib.Path("/tmp/study").glob("*/*/results.json")):
    r = json.loads(f.read_text()); m = r.get("metrics", {}); ref = r.get("references", {})
    ov = (f.parent / ".hydra" / "overrides.yaml").read_text().replace("\n", " ") if (f.parent / ".hydra").exists() else ""
    print(f.parent.name, r.get("status"), "val", m.get("val_loss"), "gap", m.get("gap_closed"), "gap_tuned", m.get("gap_closed_tuned"),
          "small_tuned", (ref.get("small_tuned") or {}).get("val_loss"), (ref.get("small_tuned") or {}).get("cached"), ov[-120:])
PYEOF
[ ${#FAILED[@]} = 0 ] || { echo "FAILED: ${FAILED[*]}"; exit 1; }
