#!/usr/bin/env bash
# GPU check for a machine with the CUDA driver and toolkit but no Rust toolchain.
#
# Build on a CPU machine first:   cargo build --release -p cae-trainer --features cuda
# Carry target/release/trainer to the GPU machine, then:   bash tools/gpu-check.sh [TRAINER_BIN]
#
# For the base preset at batch 64, in f32 and in f16: the same weights and batch run on the CPU
# (burn-flex, the reference) and on the GPU (burn-cuda); the losses must agree; then forward +
# backward steps are timed. Prints one JSON line per precision and the peak GPU memory seen by
# nvidia-smi. Then a short f16 training run (micro, built-in data, dynamic loss scaling) shows the
# loss going down and any skipped steps. Everything is bounded to finish within 8 minutes.
set -uo pipefail
bin=${1:-target/release/trainer}
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null; sleep 0.5; done ) \
  > "$out/gpu-mem.log" &
sampler=$!
status=0
for precision in f32 f16; do
  echo "== base, batch 64, $precision"
  timeout 220 "$bin" gpu-check --preset base --batch 64 --precision "$precision" --steps 5 --device cuda:0 \
    | tee -a "$out/gpu-check.jsonl" || status=1
done
echo "== trainer run: micro on built-in data, f16 with dynamic loss scaling, 60 steps"
timeout 100 "$bin" run --device cuda:0 --steps 60 --set precision.dtype=\"f16\" --metrics-addr off --no-progress \
  --out "$out/run-f16" --data-dir "$out/data" | tail -8 || status=1
kill "$sampler" 2>/dev/null
echo "peak GPU memory: $(sort -n "$out/gpu-mem.log" | tail -1) MiB"
exit $status
