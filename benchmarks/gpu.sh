#!/usr/bin/env bash
# The GPU benchmark of the scale path, one command (a few minutes on one H100):
#   bash benchmarks/gpu.sh [OUT_DIR]
# DiT-B/2 on 32x32x4 latents (256x256 images through the SD VAE), 150 classes, bf16 autocast,
# batch 256 and 64, eager and torch.compile: KIND vs dense training step time, peak memory and achieved TFLOP/s against
# the card's bf16 peak; the gated layer vs nn.Linear; merged-class inference vs dense.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-gpu}
mkdir -p "$out"
py=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
for compile in "" "--compile"; do
  for batch in 256 64; do
    name="dit-b2-bf16-b$batch${compile:+-compiled}"
    "$py" benchmarks/bench_speed.py --device cuda --precision bf16 --size DiT-B/2 \
      --image-size 32 --channels 4 --classes 150 --batch-size "$batch" --repeats 20 --warmup 5 \
      $compile --json "$out/$name.json" | tee "$out/$name.md"
  done
done
