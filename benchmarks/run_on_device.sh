#!/usr/bin/env bash
# On a GPU machine (carry .whl): install the missing packages, check the GPU path on the tiny
# models, then time every trainer at full size. Results land in $OUT (or benchmarks/results/).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python3 benchmarks/benchmark_trainers.py --size full --trainers "${TRAINERS:-srpo,direct_align,refl,draft_lv}" \
  --modes "${MODES:-lora,full}" --resolutions "${RESOLUTIONS:-720,1024}" --compile_modes "${COMPILE_MODES:-eager,compiled}" \
  --steps "${STEPS:-3}" --output "$out/benchmark.md" 2>&1 | tee "$out/benchmark.log"
