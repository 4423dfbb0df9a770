#!/usr/bin/env bash
# The main job on built-in data (no download): generate the ImageNet-like sample set, shard it,
# verify the shards, stream batches through the CAE pipeline and write a preview grid.
# Outputs go to ./data (override with DATA=...).
set -euo pipefail
cd "$(dirname "$0")/.."
data=${DATA:-data}

cargo build --release -p cae-tools -p cae-sharder -p cae-pipeline
bin=target/release

echo "== 1. built-in sample set -> $data/builtin/train"
"$bin/make-fixtures" --out "$data/builtin" --classes 10 --per-class 40 --seed 0

echo "== 2. sharder build -> $data/shards"
"$bin/sharder" build --input "$data/builtin/train" --output "$data/shards" --shard-max-samples 100 --force

echo "== 3. sharder verify"
"$bin/sharder" verify "$data/shards" --decode

echo "== 4. pipeline bench (stream batches of two views + masks)"
"$bin/pipeline" bench --shards "$data/shards" --batch-size 32 --batches 10

echo "== 5. pipeline preview -> $data/preview.png"
"$bin/pipeline" preview --shards "$data/shards" --out "$data/preview.png" --n 8
