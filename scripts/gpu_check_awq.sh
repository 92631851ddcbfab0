#!/usr/bin/env bash
# GPU check for AWQ: the full-size synthetic Qwen3.6-27B text model in the AWQ W4A16 g128 format,
# contexts 1k and 32k, batch 1 (recipes/qwen3.6-27b-synthetic-awq.yaml). Random weights have nothing
# to calibrate on, so the engine packs round-to-nearest weights in the same GEMM layout; transformers
# loads that with the same kernels as a calibrated build: same memory and speed (the records say so).
# Prints VRAM after load, peak VRAM at 32k (prefill and decode), decode tok/s and the estimator's figure,
# plus what writing the checkpoint cost. Records go to measurements/ (or $QUANTLAB_OUTPUT).
#
# Then the GPU tests of the AWQ module. Needs a CUDA GPU (~20 GB for the packed model and a 32k
# context), gptqmodel (the AWQ kernels transformers uses) and ~20 GB of free disk for the checkpoint.
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh"
OUT=${QUANTLAB_OUTPUT:-measurements}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PYTHON" - <<'PY'
import importlib.metadata as md
import torch
assert torch.cuda.is_available(), "no CUDA GPU visible to torch"
print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| gptqmodel", md.version("gptqmodel"))
PY

START=$(date -u +%Y-%m-%dT%H:%M:%S)
echo "== Qwen3.6-27B synthetic, AWQ W4A16 g128 (RTN-packed)"
"$PYTHON" -m quantlab measure recipes/qwen3.6-27b-synthetic-awq.yaml --output "$OUT" --no-progress

"$PYTHON" scripts/gpu_summary.py "$OUT" "$START" awq

"$PYTHON" -m pytest -q -m gpu tests/test_awq.py
"$PYTHON" -m quantlab report --output "$OUT"
