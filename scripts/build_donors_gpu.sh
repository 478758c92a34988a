#!/usr/bin/env bash
# Build the shipped embedded donors on one GPU, with a learning-rate grid beside the build.
#
#   python -m splitllama.embedded corpus --out .carry/corpus.json.xz       # here: this install's corpus
#   OUT=out bash scripts/build_donors_gpu.sh .carry/corpus.json.xz          # on the GPU machine
#
# 1. `python -m splitllama.embedded build --ship --documents PACK`: tokenizer, both donors (bf16), held-out
#    blocks and manifest into splitllama/donors/embedded/ (the recipe is conf/donors/tiny.yaml = EmbeddedRecipe()).
#    It refuses a checkout with uncommitted changes to tracked files (the manifest names the build's commit):
#    commit first, or `git stash` on the GPU machine's copy what the build does not need.
# 2. Once the build has packed its token blocks, benchmarks/donor_grid.py trains the same two shapes at
#    GRID_LRS (default 1.5e-3 and 6e-3, the recipe's 3e-3 being the build itself) on those blocks, side by side.
# 3. Optional PROBE=1: run.py's default split on the new donors, with a few variants (steps, lr, n70), on the GPU.
# Results in $OUT: the donors as tar parts (15 MB each), manifest.json, grid.jsonl, probe.tsv, logs.tar.gz.
# Exits non-zero when a stage fails or runs past its limit.
set -uo pipefail
PACK=$1
OUT=${OUT:-donor_build}; mkdir -p "$OUT/logs"
GRID_LRS=${GRID_LRS-"1.5e-3 6e-3"}   # GRID_LRS="" builds without the grid
export PYTHONUNBUFFERED=1 SPLITLLAMA_CACHE=${SPLITLLAMA_CACHE:-/tmp/splitllama-cache}
PY=${PY:-python3}
FAILED=()
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-560} ))   # every stage ends by then (the device call's limit is 600 s)
left() { echo $(( DEADLINE - $(date +%s) - ${1:-0} )); }
note() { echo "== $(date -u +%T) $*" | tee -a "$OUT/logs/steps.log"; }
note "$(nvidia-smi --query-gpu=name --format=csv,noheader) $($PY -c 'import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)')"

timeout "$(left 15)" $PY -m splitllama.embedded build --ship --documents "$PACK" > "$OUT/logs/build.log" 2>&1 &
BUILD=$!
while ! compgen -G "$SPLITLLAMA_CACHE/blocks/*.pt" > /dev/null; do sleep 3; kill -0 $BUILD 2>/dev/null || break; done
note "blocks packed"
GRID=""
if compgen -G "$SPLITLLAMA_CACHE/blocks/*.pt" > /dev/null && [ -n "$GRID_LRS" ]; then
  # shellcheck disable=SC2086
  timeout "$(left 15)" $PY benchmarks/donor_grid.py --blocks "$(compgen -G "$SPLITLLAMA_CACHE/blocks/*.pt" | head -1)" \
    --shapes s128x4 l256x10 --lrs $GRID_LRS --steps 4000 --batch 64 --eval-every 500 --eval-blocks 1024 \
    --procs 4 --out "$OUT/grid.jsonl" > "$OUT/logs/grid.log" 2>&1 &
  GRID=$!
fi
wait $BUILD; rc=$?; note "build rc=$rc"; [ $rc = 0 ] || FAILED+=("build(rc=$rc)")
tail -2 "$OUT/logs/build.log"

if [ "${PROBE:-0}" = 1 ] && [ $rc = 0 ]; then
  WHEELS=${WHEELS:-.whl}
  SITE=$(mktemp -d)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl > "$OUT/logs/wheels.log" 2>&1 || FAILED+=("wheels")
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  COMMON="logger=csv eval.harness.tasks=[] task.export=false trainer.enable_progress_bar=false"
  i=0
  while read -r variant; do
    i=$((i+1))
    # shellcheck disable=SC2086
    timeout "$(left 10)" $PY run.py $COMMON hydra.run.dir="$OUT/probe/$i" $variant > "$OUT/logs/probe_$i.log" 2>&1 &
  done <<< "${PROBE_VARIANTS:-}"
  wait $(jobs -p | grep -v "^${GRID:-x}$") 2>/dev/null
  $PY - "$OUT/probe" <<'PYEOF' > "$OUT/probe.tsv"
import json, sys, pathlib
print("run\toverrides\tstatus\tsmall\tsplit_before\tsplit\tlarge\tgap_closed\ttrain_s")
for d in sorted(pathlib.Path(sys.argv[1]).iterdir(), key=lambda p: int(p.name)):
    try:
        r = json.loads((d / "results.json").read_text())
    except Exception as exc:
        print(f"{d.name}\t-\tno results ({exc})"); continue
    m, ref = r.get("metrics", {}), r.get("references", {})
    ov_file = d / ".hydra" / "overrides.yaml"
    ov = " ".join(l.strip("- ").strip() for l in ov_file.read_text().splitlines() if "hydra.run" not in l and l.strip()) if ov_file.is_file() else "-"
    print(f"{d.name}\t{ov}\t{r.get('status')}\t{ref.get('small', {}).get('val_loss')}\t{m.get('val_loss_before')}\t{m.get('val_loss')}\t"
          f"{ref.get('large', {}).get('val_loss')}\t{m.get('gap_closed')}\t{r.get('timings', {}).get('fit')}")
PYEOF
  cat "$OUT/probe.tsv"
fi
if [ -n "$GRID" ]; then wait $GRID; rc=$?; note "grid rc=$rc"; [ $rc = 0 ] || FAILED+=("grid(rc=$rc)"); fi
cat "$OUT/grid.jsonl" 2>/dev/null | $PY -c 'import json,sys; [print(r["shape"], r["lr"], round(r["val"],4), r["s"]) for r in map(json.loads, sys.stdin)]'
if [ -f splitllama/donors/embedded/manifest.json ]; then
  cp splitllama/donors/embedded/manifest.json "$OUT/"
  tar -C splitllama/donors -cf - embedded | split -b 15m - "$OUT/donors.tar.part-"
fi
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs $( [ -d "$OUT/probe" ] && echo probe ) && rm -rf "$OUT/logs" "$OUT/probe"
[ ${#FAILED[@]} = 0 ] || { echo "FAILED: ${FAILED[*]}"; exit 1; }
