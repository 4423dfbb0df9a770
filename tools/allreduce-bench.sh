#!/usr/bin/env bash
# The cost of data parallel's one all-reduce per optimizer step, as a fraction of the step: for
# each preset, a short 2-rank `trainer run` under mpirun on the CPU backend (one compute thread
# per rank), then the medians of `step_seconds` and `allreduce_seconds` from rank 0's
# metrics.jsonl (the first steps skipped). A benchmark, not a test: numbers go to
# docs/benchmarks.md#data-parallel.
#
#   cargo build --release --workspace --features mpi
#   PRESETS="tiny base" STEPS=8 bash tools/allreduce-bench.sh [out.jsonl]
#
# Shards: $SHARDS, default the built-in shapes set (made by a one-step run if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${TRAINER:-target/release/trainer}
[ -x "$bin" ] || { echo "no $bin: cargo build --release --workspace --features mpi" >&2; exit 2; }
PRESETS=${PRESETS:-"tiny base"}
STEPS=${STEPS:-8}
BATCH=${BATCH:-4}
SHARDS=${SHARDS:-data/shapes-shards}
out=${1:-allreduce-bench.jsonl}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ ! -e "$SHARDS/manifest.json" ]; then
  "$bin" run --steps 1 --out "$work/make-data" --metrics-addr off --no-progress >/dev/null
fi
: >"$out"
for preset in $PRESETS; do
  run="$work/$preset"
  mpirun --allow-run-as-root --oversubscribe -n 2 -x RAYON_NUM_THREADS=1 "$bin" run --shards "$SHARDS" \
    --out "$run" --metrics-addr off --no-progress --steps "$STEPS" --set "preset=\"$preset\"" \
    --set 'model.target="pixels"' --set "data.batch_size=$BATCH" --set optimizer.accumulation_steps=2 \
    --set data.workers=1 --set log_every=1 >"$work/$preset.log" 2>&1 || { cat "$work/$preset.log" >&2; exit 1; }
  python3 - "$run/metrics.jsonl" "$preset" "$BATCH" >>"$out" <<'EOF'
import json, statistics as st, sys
rows = [json.loads(l) for l in open(sys.argv[1])][2:]
step = st.median(r["step_seconds"] for r in rows)
red = st.median(r["allreduce_seconds"] for r in rows)
print(json.dumps({"preset": sys.argv[2], "ranks": 2, "batch_per_rank": int(sys.argv[3]), "steps": len(rows),
                  "step_seconds": step, "allreduce_seconds": red, "fraction": red / step}))
EOF
  tail -1 "$out" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("%-5s step %.3f s, all-reduce %.4f s (%.1f %% of the step)" % (r["preset"], r["step_seconds"], r["allreduce_seconds"], 100*r["fraction"]))'
done
