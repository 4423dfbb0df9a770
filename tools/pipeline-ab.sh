#!/usr/bin/env bash
# A/B throughput of two `pipeline` binaries on the same shards, alternating runs so that the
# machine's drift hits both alike; prints per worker count the medians and the paired ratio
# new/old (each round's new run over the same round's old run).
#
#   OLD=/tmp/pipeline-old NEW=target/release/pipeline SHARDS=/tmp/cshards \
#     ROUNDS=8 WORKERS="1 2" bash tools/pipeline-ab.sh [out.jsonl]
#
# Build the old binary from another commit in a worktree with its own target dir, e.g.
#   git worktree add /tmp/old <commit> && (cd /tmp/old && CARGO_TARGET_DIR=/tmp/old-target \
#     cargo build --release -p cae-pipeline) && cp /tmp/old-target/release/pipeline /tmp/pipeline-old
# Run it on a quiet machine (no build beside it): concurrent work skews one side.
set -euo pipefail
: "${OLD:?path of the old pipeline binary}" "${NEW:?path of the new pipeline binary}" "${SHARDS:?shard directory}"
ROUNDS=${ROUNDS:-8}
WORKERS=${WORKERS:-"1 2"}
BATCHES=${BATCHES:-8}
out=${1:-pipeline-ab.jsonl}
: >"$out"
for round in $(seq 1 "$ROUNDS"); do
  for w in $WORKERS; do
    for v in old new; do
      bin=$OLD; [ "$v" = new ] && bin=$NEW
      j=$("$bin" bench --shards "$SHARDS" --batch-size 256 --batches "$BATCHES" --workers "$w" --json 2>/dev/null)
      echo "{\"v\":\"$v\",\"workers\":$w,\"round\":$round,\"bench\":$j}" >>"$out"
      echo "round $round/$ROUNDS, $w worker(s), $v: $(echo "$j" | python3 -c 'import json,sys; print("%.0f images/s" % json.load(sys.stdin)["images_per_second"])')" >&2
    done
  done
done
python3 - "$out" <<'EOF'
import json, statistics as st, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for w in sorted({r["workers"] for r in rows}):
    get = lambda v, k: [r["bench"][k] for r in sorted(rows, key=lambda r: r["round"]) if r["workers"] == w and r["v"] == v]
    o, n = get("old", "images_per_second"), get("new", "images_per_second")
    paired = [b / a for a, b in zip(o, n)]
    print(f"{w} worker(s): old median {st.median(o):.0f} images/s, new median {st.median(n):.0f}; "
          f"new/old paired median {st.median(paired):.3f}, mean {st.mean(n) / st.mean(o):.3f} ({len(paired)} rounds)")
EOF
