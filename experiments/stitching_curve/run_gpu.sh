#!/usr/bin/env bash
# The stitching-curve study (and a few variants of the default run) on one GPU, as run for the README.
#   OUT=out bash experiments/stitching_curve/run_gpu.sh STDLIB_JSONL
# STDLIB_JSONL: the stdlib source documents of the machine the results are read on (Python 3.11 here),
# as {"text": ...} lines, so that validation holds out exactly those files (a GPU machine's own stdlib
# is another Python's: files held out there may have been trained on in their 3.11 form).
# Wheels the GPU image lacks (hydra-core, omegaconf, antlr4, hydra-joblib-launcher, joblib) in .whl/.
# Writes $OUT/study.tar.gz (every job's results.json, overrides, metrics.csv), $OUT/probe.tar.gz, logs.
set -uo pipefail
DOCS=$1
OUT=${OUT:-study_out}; mkdir -p "$OUT"
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-550} ))
left() { echo $(( DEADLINE - $(date +%s) - ${1:-0} )); }
export PYTHONUNBUFFERED=1 SPLITLLAMA_CACHE=${SPLITLLAMA_CACHE:-/tmp/splitllama-cache}
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl || exit 2
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
DATA="data=files data.files=[$(realpath "$DOCS")] data.seq_len=128 data.max_val_blocks=128"
COMMON="logger=csv eval.harness.tasks=[] task.export=false trainer.enable_progress_bar=false parallel.cpu_threads=1"
i=0
while read -r variant; do
  [ -n "$variant" ] || continue
  i=$((i+1))
  # shellcheck disable=SC2086
  timeout "$(left 20)" python3 run.py $COMMON $DATA hydra.run.dir="/tmp/probe/$i" $variant > "/tmp/probe_$i.log" 2>&1 &
done <<< "${PROBE_VARIANTS:-}"
rc=0
if [ "${STUDY:-1}" = 1 ]; then  # STUDY=0: only the probes
  # shellcheck disable=SC2086
  timeout "$(left 20)" python3 run.py -m experiment=stitching_curve hydra/launcher=joblib hydra.launcher.n_jobs=${N_JOBS:-10} \
    $DATA parallel.cpu_threads=1 hydra.sweep.dir=/tmp/study > "$OUT/study.log" 2>&1
  rc=$?
fi
wait
echo "study rc=$rc; runs with results: $(ls /tmp/study/*/results.json 2>/dev/null | wc -l)"
[ -d /tmp/study ] && tar --exclude='*.ckpt' --exclude='checkpoints' -czf "$OUT/study.tar.gz" -C /tmp study
[ -d /tmp/probe ] && tar --exclude='*.ckpt' --exclude='checkpoints' -czf "$OUT/probe.tar.gz" -C /tmp probe $(cd /tmp && ls probe_*.log)
python3 - <<'PYEOF'
import json, pathlib
for d in sorted(pathlib.Path("/tmp/probe").glob("*")) if pathlib.Path("/tmp/probe").exists() else []:
    try:
        r = json.loads((d / "results.json").read_text()); m = r["metrics"]; ref = r.get("references", {})
        ov = (d / ".hydra" / "overrides.yaml").read_text().replace("\n", " ")
        print(d.name, r["status"], "small", round(ref["small"]["val_loss"], 4), "large", round(ref["large"]["val_loss"], 4),
              "before", round(m["val_loss_before"], 4), "after", round(m["val_loss"], 4), "gap", round(m["gap_closed"], 3), "fit_s", r["timings"].get("fit_s"), ov[-160:])
    except Exception as exc:
        print(d.name, "no result", exc)
PYEOF
exit $rc
