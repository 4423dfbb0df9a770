#!/usr/bin/env bash
# Did pre-training teach? Pre-trains on the CPU for fixed step budgets and evaluates k-NN and the
# linear probe (cls and mean features) at each budget against the same network at its initial
# weights, on (a) the built-in shapes set, (b) real photographs (make_corpus.py
# --label-by-source; skipped with a message when it or its photos are missing) and (c) the
# object-centric scenes set (`make-fixtures --scenes`: 1-3 small copies of the class's shape per
# image, with clutter; 120 train / 30 val images per class).
#
# Writes OUT/learning.json, OUT/learning.md (markdown table) and OUT/learning.png (accuracy vs
# pre-training steps with the random-init lines; needs python3 + matplotlib, else skipped with a
# message).
#
#   bash tools/learning-bench.sh                       # micro, budgets 1000 2000 4000 8000
#   STEPS="500 1000" bash tools/learning-bench.sh      # a reduced budget
#   PRESETS="micro tiny" TINY_STEPS="100 200" bash tools/learning-bench.sh
#   PRESETS="micro cpu" SETS=scenes bash tools/learning-bench.sh   # configs/cae_cpu.toml too
#
# Every budget is a checkpoint of ONE run whose schedule is the largest budget (warmup and cosine
# of that run), so the curve is one training run observed along the way. Environment: OUT
# (default docs/learning), DATA (default data), SETS (default "shapes photos scenes"), STEPS,
# PRESETS (default micro; `cpu` = configs/cae_cpu.toml, budgets CPU_STEPS, default its full
# schedule only), TINY_STEPS (default 100 200), CORPUS_IMAGES (default 1000), MAKE_CORPUS
# (default ../shared/tools/make_corpus.py next to the repository), BUILD (0: no cargo build, use
# target/release as it is).
#
# Sweep mode (resumable; one pre-training run per configuration, on the scenes set):
#
#   bash tools/learning-bench.sh sweep [CONFIGS]       # CONFIGS: docs/learning/scenes-sweep.txt
#
# CONFIGS has one configuration a line, `name | config file | steps | key=value ...` (steps
# `full`: the config's own schedule; `8000@2000`: 8000 steps, and the curve evaluated at every
# 2000th; the key=value pairs go to `trainer run --set`; # comments). Each configuration
# pre-trains once, then `trainer eval knn` and `trainer eval linear --feature mean` run on it and
# on its random init; one JSON line per configuration is appended to RESULTS (default
# docs/learning/scenes-sweep.jsonl): name, config, overrides, steps, wall seconds of the
# pre-training, first/last loss, top-1 of each evaluation (and `curve`: the same at the
# intermediate checkpoints). A name already in RESULTS is skipped, so an interrupted sweep
# continues where it stopped (a run cut off mid-way starts over).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
out=${OUT:-docs/learning}
data=${DATA:-data}
steps=${STEPS:-"1000 2000 4000 8000"}
presets=${PRESETS:-micro}
want_sets=${SETS:-"shapes photos scenes"}
cpu_steps=${CPU_STEPS:-full}
tiny_steps=${TINY_STEPS:-"100 200"}
corpus_images=${CORPUS_IMAGES:-1000}
make_corpus=${MAKE_CORPUS:-$root/../shared/tools/make_corpus.py}
work=${WORK:-$data/learning-bench}
mkdir -p "$out" "$work/runs"

# BUILD=0: use the binaries already in target/release (another build is running, or the sources
# are being edited).
[ "${BUILD:-1}" = 0 ] || cargo build --release -q -p cae-trainer -p cae-sharder -p cae-tools
bin=$root/target/release
trainer=$bin/trainer
has_set() { [[ " $want_sets " == *" $1 "* ]]; }

# (c) the object-centric scenes set: generated once, train and val sharded (val with the train
# shards' class order).
scenes=$data/scenes
scenes_shards() {
    if [ ! -f "$scenes-val-shards/manifest.json" ]; then
        "$bin/make-fixtures" --scenes --out "$scenes" > /dev/null
        "$bin/sharder" build --input "$scenes/train" --output "$scenes-shards" --shard-max-samples 200 \
            --force > /dev/null
        "$bin/sharder" build --input "$scenes/val" --output "$scenes-val-shards" --prefix val \
            --classes "$scenes-shards/classes.txt" --force > /dev/null
    fi
}

if [ "${1:-}" = sweep ]; then
    configs=${2:-docs/learning/scenes-sweep.txt}
    results=${RESULTS:-docs/learning/scenes-sweep.jsonl}
    scenes_shards
    mkdir -p "$work/sweep" "$(dirname "$results")"
    touch "$results"
    # The table of every result, between the <!-- sweep-table --> markers of TABLE (default
    # docs/learning/scenes-sweep.md; left alone without them).
    sweep_table() {
        python3 -c '
import json, sys
results, table = sys.argv[1:]
try:
    doc = open(table).read()
except OSError:
    sys.exit(0)
start, end = "<!-- sweep-table -->", "<!-- /sweep-table -->"
if start not in doc or end not in doc:
    sys.exit(0)
rows = [json.loads(l) for l in open(results) if l.strip()]
pct = lambda x: "%.1f" % (100 * x)
lines = ["| name | config + overrides | steps | wall s | loss first -> last | linear mean (random) | k-NN mean (random) | k-NN cls (random) |",
         "|---|---|---|---|---|---|---|---|"]
for r in rows:
    cfg = " ".join(["`%s`" % r["config"].split("/")[-1]] + ["`%s`" % o for o in r["overrides"]])
    lines.append("| %s | %s | %d | %d | %.3f -> %.3f | **%s** (%s) | **%s** (%s) | %s (%s) |" % (
        r["name"], cfg, r["steps"], r["wall_s"], r["loss_first"] or 0, r["loss_last"] or 0,
        pct(r["linear_mean"]), pct(r["linear_mean_random"]), pct(r["knn_mean"]), pct(r["knn_mean_random"]),
        pct(r["knn_cls"]), pct(r["knn_cls_random"])))
curves = [r for r in rows if r.get("curve")]
if curves:
    lines += ["", "Curves (checkpoints along the same run; step: linear mean / k-NN mean, top-1 %):", "",
              "| name | curve |", "|---|---|"]
    for r in curves:
        lines.append("| %s | %s |" % (r["name"], ", ".join(
            "%d: %s / %s" % (c["step"], pct(c["linear_mean"]), pct(c["knn_mean"])) for c in r["curve"])))
a, b = doc.index(start) + len(start), doc.index(end)
open(table, "w").write(doc[:a] + "\n" + "\n".join(lines) + "\n" + doc[b:])
' "$results" "${TABLE:-docs/learning/scenes-sweep.md}"
    }
    ev() { # eval-kind args... -> the JSON line
        "$trainer" eval "$@" --train-shards "$scenes-shards" --val-shards "$scenes-val-shards" --no-progress --json | tail -1
    }
    while IFS='|' read -r name config budget overrides; do
        name=$(echo "$name" | xargs)
        [ -z "$name" ] || [[ "$name" == \#* ]] && continue
        config=$(echo "$config" | xargs)
        budget=$(echo "$budget" | xargs)
        if grep -q "\"name\": \"$name\"" "$results"; then
            echo "== $name: done, skipped"
            continue
        fi
        sets=()
        for kv in $overrides; do sets+=(--set "$kv"); done
        stepflag=(--checkpoint-every 0)
        every=0
        if [[ "$budget" == *@* ]]; then
            every=${budget#*@}
            budget=${budget%@*}
            stepflag=(--checkpoint-every "$every" --set checkpoint.keep_last=1000)
        fi
        [ "$budget" != full ] && stepflag+=(--steps "$budget")
        run=$work/sweep/$name
        rm -rf "$run"
        echo "== $name: $config, steps $budget, ${overrides:-no overrides}"
        start=$(date +%s)
        "$trainer" run --config "$config" --shards "$scenes-shards" --out "$run" "${stepflag[@]}" --metrics-addr off \
            --no-progress "${sets[@]}" < /dev/null > "$run.log" 2>&1
        wall=$(( $(date +%s) - start ))
        curve=()
        if [ "$every" != 0 ]; then
            for ck in "$run"/checkpoints/step-*.ckpt; do
                curve+=("$(basename "$ck" .ckpt | sed 's/^step-0*//') $(ev knn --checkpoint "$ck" < /dev/null | python3 -c 'import json, sys; print(json.load(sys.stdin)["mean"]["top1"])') $(ev linear --feature mean --checkpoint "$ck" < /dev/null | python3 -c 'import json, sys; print(json.load(sys.stdin)["top1"])')")
            done
        fi
        knn=$(ev knn --checkpoint "$run" < /dev/null)
        knn0=$(ev knn --checkpoint "$run" --random-init < /dev/null)
        lin=$(ev linear --feature mean --checkpoint "$run" < /dev/null)
        lin0=$(ev linear --feature mean --checkpoint "$run" --random-init < /dev/null)
        python3 -c '
import json, re, sys
name, config, overrides, log, wall, knn, knn0, lin, lin0, curve = sys.argv[1:]
text = open(log).read()
steps = [int(m) for m in re.findall(r"^step\s+(\d+)/", text, re.M)]
losses = [float(m) for m in re.findall(r"^step\s+\d+/\d+\s+loss ([0-9.eE+-]+)", text, re.M)]
k, k0, l, l0 = (json.loads(x) for x in (knn, knn0, lin, lin0))
row = {"name": name, "config": config, "overrides": overrides.split(), "steps": max(steps, default=0),
       "wall_s": int(wall), "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
       "linear_mean": l["top1"], "linear_mean_random": l0["top1"],
       "knn_mean": k["mean"]["top1"], "knn_mean_random": k0["mean"]["top1"],
       "knn_cls": k["cls"]["top1"], "knn_cls_random": k0["cls"]["top1"]}
if curve.strip():
    row["curve"] = [{"step": int(s), "knn_mean": float(a), "linear_mean": float(b)}
                    for s, a, b in (line.split() for line in curve.strip().splitlines())]
print(json.dumps(row))
' "$name" "$config" "$overrides" "$run.log" "$wall" "$knn" "$knn0" "$lin" "$lin0" "$(printf '%s\n' "${curve[@]}")" \
            | tee -a "$results"
        sweep_table
    done < "$configs"
    sweep_table
    exit 0
fi

sets=()
# (a) the built-in shapes set (generated and sharded by the trainer on first use).
if has_set shapes; then
    "$trainer" eval knn --random-init --data-dir "$data" --no-progress > /dev/null
    sets+=("shapes $data/shapes-shards $data/shapes-val-shards")
fi

# (b) real photographs: one class per source photo; 80 % of each class to train, 20 % to val.
photos=$work/photos
if has_set photos && [ ! -f "$photos/val-shards/manifest.json" ]; then
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
has_set photos && [ -f "$photos/val-shards/manifest.json" ] && sets+=("photos $photos/train-shards $photos/val-shards")
if has_set scenes; then
    scenes_shards
    sets+=("scenes $scenes-shards $scenes-val-shards")
fi

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
        elif [ "$preset" = cpu ]; then
            budgets=$cpu_steps
            config=configs/cae_cpu.toml
        fi
        max=0
        stepflag=()
        if [ "$budgets" = full ]; then
            # the config's own schedule: one checkpoint at its end
            max=full
            every=0
        else
            for s in $budgets; do [ "$s" -gt "$max" ] && max=$s; done
            stepflag=(--steps "$max")
            every=$(python3 -c 'import math, sys; print(math.gcd(*map(int, sys.argv[1:])))' $budgets)
        fi
        run=$work/runs/$set-$preset
        rm -rf "$run"
        extra=()
        [ "$preset" = tiny ] && extra=(--set 'model.target="pixels"' --set data.batch_size=16)
        echo "== $set: $preset, $max steps (checkpoints at $budgets)"
        start=$(date +%s)
        "$trainer" run --config "$config" --shards "$train" --out "$run" "${stepflag[@]}" --metrics-addr off \
            --no-progress --checkpoint-every "$every" --set checkpoint.keep_last=1000 "${extra[@]}" > "$run.log" 2>&1
        echo "   trained in $(( $(date +%s) - start )) s: $(grep '^loss' "$run.log")"
        evaluate "$set" "$preset" 0 "$train" "$val" --checkpoint "$run" --random-init
        if [ "$budgets" = full ]; then
            last=$(ls "$run"/checkpoints/step-*.ckpt | sort | tail -1)
            evaluate "$set" "$preset" "$(basename "$last" .ckpt | sed 's/^step-0*//')" "$train" "$val" --checkpoint "$last"
        else
            for s in $budgets; do
                evaluate "$set" "$preset" "$s" "$train" "$val" --checkpoint "$(printf '%s/checkpoints/step-%08d.ckpt' "$run" "$s")"
            done
        fi
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
