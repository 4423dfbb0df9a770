#!/usr/bin/env bash
# Did pre-training teach? Pre-trains on the CPU for fixed step budgets and evaluates k-NN and the
# linear probe (cls and mean features) at each budget against the same network at its initial
# weights, on (a) the built-in shapes set and (b) real photographs (make_corpus.py
# --label-by-source; skipped with a message when it or its photos are missing).
#
# Writes OUT/learning.json, OUT/learning.md (markdown table) and OUT/learning.png (accuracy vs
# pre-training steps with the random-init lines; needs python3 + matplotlib, else skipped with a
# message).
#
#   bash tools/learning-bench.sh                       # micro, budgets 1000 2000 4000 8000
#   STEPS="500 1000" bash tools/learning-bench.sh      # a reduced budget
#   PRESETS="micro tiny" TINY_STEPS="100 200" bash tools/learning-bench.sh
#
# Every budget is a checkpoint of ONE run whose schedule is the largest budget (warmup and cosine
# of that run), so the curve is one training run observed along the way. Environment: OUT
# (default docs/learning), DATA (default data), STEPS, PRESETS (default micro), TINY_STEPS
# (default 100 200), CORPUS_IMAGES (default 1000), MAKE_CORPUS (default
# ../shared/tools/make_corpus.py next to the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
out=${OUT:-docs/learning}
data=${DATA:-data}
steps=${STEPS:-"1000 2000 4000 8000"}
presets=${PRESETS:-micro}
tiny_steps=${TINY_STEPS:-"100 200"}
corpus_images=${CORPUS_IMAGES:-1000}
make_corpus=${MAKE_CORPUS:-$root/../shared/tools/make_corpus.py}
work=${WORK:-$data/learning-bench}
mkdir -p "$out" "$work/runs"

cargo build --release -q -p cae-trainer -p cae-sharder
bin=$root/target/release
trainer=$bin/trainer

# (a) the built-in shapes set (generated and sharded by the trainer on first use).
"$trainer" eval knn --random-init --data-dir "$data" --no-progress > /dev/null
sets=("shapes $data/shapes-shards $data/shapes-val-shards")

# (b) real photographs: one class per source photo; 80 % of each class to train, 20 % to val.
photos=$work/photos
if [ ! -f "$photos/val-shards/manifest.json" ]; then
    if [ -f "$make_corpus" ] && python3 "$make_corpus" "$photos/corpus" -n "$corpus_images" --label-by-source \
        --seed 0 --num-cmyk 0 --num-png 0 --num-truncated 0 > "$work/make_corpus.log" 2>&1; then
        rm -rf "$photos/train" "$photos/val"
        for d in "$photos"/corpus/train/*/; do
            c=$(basename "$d")
            mkdir -p "$photos/train/$c" "$photos/val/$c"
            mapfile -t files < <(ls "$d" | sort)
            nval=$(( (${#files[@]} + 4) / 5 ))
            for i in "${!files[@]}"; do
                if [ "$i" -lt "$nval" ]; then dst=val; else dst=train; fi
                cp "$d/${files[$i]}" "$photos/$dst/$c/"
            done
        done
        "$bin/sharder" build --input "$photos/train" --output "$photos/train-shards" --force > /dev/null
        "$bin/sharder" build --input "$photos/val" --output "$photos/val-shards" \
            --classes "$photos/train-shards/classes.txt" --force > /dev/null
    else
        echo "learning-bench: real photographs skipped: $make_corpus failed or is missing (see $work/make_corpus.log;" \
            "it needs pillow, numpy and the wallpaper packages its --help lists)" >&2
    fi
fi
[ -f "$photos/val-shards/manifest.json" ] && sets+=("photos $photos/train-shards $photos/val-shards")

json_rows=()
evaluate() { # set preset step encoder-args...
    local set=$1 preset=$2 step=$3 train=$4 val=$5
    shift 5
    local knn lc lm
    knn=$("$trainer" eval knn "$@" --train-shards "$train" --val-shards "$val" --no-progress --json | tail -1)
    lc=$("$trainer" eval linear "$@" --train-shards "$train" --val-shards "$val" --no-progress --json | tail -1)
    lm=$("$trainer" eval linear --feature mean "$@" --train-shards "$train" --val-shards "$val" --no-progress --json | tail -1)
    json_rows+=("$(python3 -c '
import json, sys
set_, preset, step, knn, lc, lm = sys.argv[1:]
k, c, m = json.loads(knn), json.loads(lc), json.loads(lm)
print(json.dumps({"set": set_, "preset": preset, "steps": int(step),
    "knn_cls": k["cls"]["top1"], "knn_mean": k["mean"]["top1"],
    "linear_cls": c["top1"], "linear_mean": m["top1"],
    "train_samples": c["train_samples"], "val_samples": c["val_samples"], "classes": c["classes"]}))
' "$set" "$preset" "$step" "$knn" "$lc" "$lm")")
    echo "  $set $preset step $step: ${json_rows[-1]}"
}

for entry in "${sets[@]}"; do
    read -r set train val <<< "$entry"
    for preset in $presets; do
        budgets=$steps
        config=configs/cae_micro.toml
        if [ "$preset" = tiny ]; then
            budgets=$tiny_steps
            config=configs/cae_tiny.toml
        fi
        max=0
        for s in $budgets; do [ "$s" -gt "$max" ] && max=$s; done
        run=$work/runs/$set-$preset
        rm -rf "$run"
        extra=()
        [ "$preset" = tiny ] && extra=(--set 'model.target="pixels"' --set data.batch_size=16)
        echo "== $set: $preset, $max steps (checkpoints at $budgets)"
        start=$(date +%s)
        every=$(python3 -c 'import math, sys; print(math.gcd(*map(int, sys.argv[1:])))' $budgets)
        "$trainer" run --config "$config" --shards "$train" --out "$run" --steps "$max" --metrics-addr off \
            --no-progress --checkpoint-every "$every" --set checkpoint.keep_last=1000 "${extra[@]}" > "$run.log" 2>&1
        echo "   trained in $(( $(date +%s) - start )) s: $(grep '^loss' "$run.log")"
        evaluate "$set" "$preset" 0 "$train" "$val" --checkpoint "$run" --random-init
        for s in $budgets; do
            evaluate "$set" "$preset" "$s" "$train" "$val" --checkpoint "$(printf '%s/checkpoints/step-%08d.ckpt' "$run" "$s")"
        done
    done
done

printf '%s\n' "${json_rows[@]}" | python3 -c '
import json, sys
rows = [json.loads(l) for l in sys.stdin if l.strip()]
json.dump({"rows": rows, "note": "top-1 on the validation split; steps 0 = the same network at its initial weights"},
          open(sys.argv[1], "w"), indent=1)
lines = ["| set | preset | pre-training steps | k-NN cls | k-NN mean | linear cls | linear mean |", "|---|---|---|---|---|---|---|"]
for r in rows:
    s = "random init" if r["steps"] == 0 else str(r["steps"])
    lines.append("| %s (%d train / %d val, %d classes) | %s | %s | %.1f | %.1f | %.1f | %.1f |" % (
        r["set"], r["train_samples"], r["val_samples"], r["classes"], r["preset"], s,
        100 * r["knn_cls"], 100 * r["knn_mean"], 100 * r["linear_cls"], 100 * r["linear_mean"]))
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
' "$out/learning.json" "$out/learning.md"

if python3 -c 'import matplotlib' 2> /dev/null; then
    python3 tools/py/plot_learning.py "$out/learning.json" "$out/learning.png"
else
    echo "learning-bench: no matplotlib for python3: $out/learning.png not drawn (pip install matplotlib)" >&2
fi
echo "wrote $out/learning.json $out/learning.md $([ -f "$out/learning.png" ] && echo "$out/learning.png")"
