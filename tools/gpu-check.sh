#!/usr/bin/env bash
# The one prepared check for a GPU machine (NVIDIA driver + CUDA toolkit, no Rust toolchain).
#
# Build on a CPU machine:  cargo build --release -p cae-trainer --features cuda && strip target/release/trainer
# (63.5 MiB stripped; `gzip -9` it to target/release/trainer.gz where a transfer is size-limited.)
# Carry target/release/trainer (or trainer.gz) to the GPU machine (repo root), then:
#     OUT=/some/folder bash tools/gpu-check.sh [TRAINER_BIN]
#
# Prints (and writes to $OUT/gpu-check.json) one JSON summary:
#   device; f32 and bf16 one-step parity with the CPU on `base` (same weights and batch);
#   bf16 and f16 images/s and MFU for `base` at batch 64 and 128, with the DALL-E tokenizer
#   (random weights) and with pixels; peak GPU memory; a 200-step `micro` bf16 run whose loss
#   falls; data wait with the real pipeline on the built-in shards with 12 decode workers.
# Bounded to about 7 minutes (each step has its own timeout). Scratch data goes to /tmp; only the
# summary (and the raw logs, gpu-check-*.log) go to $OUT.
set -uo pipefail
bin=$(realpath "${1:-target/release/trainer}" 2>/dev/null || echo "${1:-target/release/trainer}")
out=${OUT:-/tmp/gpu-check-out}
mkdir -p "$out"
scratch=$(mktemp -d /tmp/cae-gpu-check.XXXXXX)
fail() { echo "gpu-check: $*" >&2; echo "{\"ok\": false, \"error\": \"$*\"}" > "$out/gpu-check.json"; exit 2; }

# --- what the CUDA runtime needs --------------------------------------------------------------
# A gzipped binary (transfers limited in size): unpack it to the scratch directory.
if [ ! -x "$bin" ] && [ -f "$bin.gz" ]; then
  gunzip -c "$bin.gz" > "$scratch/trainer" && chmod +x "$scratch/trainer" && bin="$scratch/trainer"
fi
[ -x "$bin" ] || fail "no trainer binary at $bin (cargo build --release -p cae-trainer --features cuda; carry target/release/trainer)"
command -v nvidia-smi >/dev/null || fail "nvidia-smi not found: no NVIDIA driver on this machine"
nvidia-smi -L >/dev/null 2>&1 || fail "nvidia-smi sees no GPU"
if [ -z "${CUDA_PATH:-}" ]; then
  for d in /usr/local/cuda /usr/local/cuda-13* /usr/local/cuda-12*; do
    [ -d "$d/include" ] && { export CUDA_PATH=$d; break; }
  done
fi
[ -n "${CUDA_PATH:-}" ] && [ -f "$CUDA_PATH/include/cuda.h" ] || fail "no CUDA toolkit headers (set CUDA_PATH; NVRTC compiles kernels at run time)"
nvrtc=$(ls "$CUDA_PATH"/lib64/libnvrtc.so* "$CUDA_PATH"/targets/*/lib/libnvrtc.so* 2>/dev/null | head -1)
[ -n "$nvrtc" ] || fail "libnvrtc.so not found under $CUDA_PATH"
export LD_LIBRARY_PATH="$(dirname "$nvrtc"):$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
# cubecl's kernel and autotune caches (cubecl.toml in the working directory): later commands
# of this script, and a rerun, reuse compiled and tuned kernels.
cd "$scratch" || fail "cannot enter $scratch"
# The base preset with a randomly initialised DALL-E tokenizer (same cost as the real weights).
cat > base.toml <<'EOF'
preset = "base"

[model]
target = "dalle"

[tokenizer]
random_init = true

[optimizer]
accumulation_steps = 1
EOF
cat > cubecl.toml <<'EOF'
[compilation]
cache = "local"

[autotune]
cache = "local"
EOF

device=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)
gpus=$(nvidia-smi -L | wc -l)
echo "== device: $device ($gpus GPU(s)), CUDA_PATH=$CUDA_PATH"
( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1; sleep 0.5; done ) \
  > "$scratch/gpu-mem.log" &
sampler=$!
trap 'kill $sampler 2>/dev/null' EXIT
status=0

# One JSON line from a command (its last line starting with '{'), or null; logs kept in $out.
json_of() { # name timeout command...
  local name=$1 t=$2; shift 2
  echo "== $name" >&2
  timeout "$t" "$@" > "$out/gpu-check-$name.log" 2>&1 || { echo "   failed (see gpu-check-$name.log)" >&2; status=1; }
  local j; j=$(grep '^{' "$out/gpu-check-$name.log" | tail -1)
  echo "${j:-null}"
}

# --- parity: same weights and batch on the CPU (f32 reference) and the GPU ------------------------
parity_f32=$(json_of parity-f32 120 "$bin" gpu-check --preset base --batch 16 --precision f32 --steps 3 --device cuda:0)
parity_bf16=$(json_of parity-bf16 120 "$bin" gpu-check --preset base --batch 16 --precision bf16 --steps 3 --device cuda:0)

# --- throughput and MFU: base, the whole step (tokenizer included for dalle) ----------------------
peak_bf16=${PEAK_TFLOPS:-989}   # H100/H200 SXM dense bf16/f16 tensor-core peak
benches=""
for dtype in bf16 f16; do
  for batch in 64 128; do
    for target in dalle pixels; do
      j=$(json_of "bench-$dtype-b$batch-$target" 75 "$bin" bench --config "$scratch/base.toml" \
        --device cuda:0 --synthetic-only --steps 8 --warmup 3 --peak-tflops "$peak_bf16" --json \
        --set "precision.dtype=\"$dtype\"" --set "data.batch_size=$batch" --set "model.target=\"$target\"")
      benches="${benches:+$benches, }$j"
    done
  done
done

# --- a 200-step micro bf16 run on the built-in data: the loss must fall ---------------------------
echo "== micro bf16, 200 steps" >&2
timeout 120 "$bin" run --device cuda:0 --steps 200 --set 'precision.dtype="bf16"' --metrics-addr off --no-progress \
  --out "$scratch/run-bf16" --data-dir "$scratch/data" > "$out/gpu-check-micro-bf16.log" 2>&1 || status=1
first=$(head -1 "$scratch/run-bf16/metrics.jsonl" 2>/dev/null); last=$(tail -1 "$scratch/run-bf16/metrics.jsonl" 2>/dev/null)
loss_of() { sed -n 's/.*"loss":\([-0-9.eE+]*\).*/\1/p' <<<"$1"; }
l0=$(loss_of "$first"); l1=$(loss_of "$last")
falls=false
if [ -n "$l0" ] && [ -n "$l1" ] && awk "BEGIN{exit !($l1 < 0.8 * $l0)}"; then falls=true; else status=1; fi

# --- data wait with the real pipeline: base bf16 batch 64, 12 decode workers, built-in shards -------
pipeline=$(json_of pipeline 120 "$bin" bench --config "$scratch/base.toml" --device cuda:0 \
  --steps 20 --warmup 3 --json --data-dir "$scratch/data" --peak-tflops "$peak_bf16" \
  --set 'precision.dtype="bf16"' --set data.batch_size=64 --set data.workers=12)

# --- two processes on two GPUs (data parallel), when the machine has them --------------------------
multi_gpu="\"skipped: $gpus GPU(s)\""

kill $sampler 2>/dev/null
peak=$(sort -n "$scratch/gpu-mem.log" | tail -1)
summary=$(cat <<EOF
{"ok": $([ $status = 0 ] && echo true || echo false), "device": "$device", "gpus": $gpus,
 "parity": {"f32": $parity_f32, "bf16": $parity_bf16},
 "bench": [$benches],
 "peak_gpu_memory_mib": ${peak:-null},
 "micro_bf16_200_steps": {"first_loss": ${l0:-null}, "last_loss": ${l1:-null}, "falls": $falls},
 "pipeline_base_bf16_b64_12_workers": $pipeline,
 "multi_gpu": $multi_gpu}
EOF
)
echo "$summary" | tee "$out/gpu-check.json"
rm -rf "$scratch"
exit $status
