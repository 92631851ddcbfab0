#!/usr/bin/env bash
# GPU check for the bitsandbytes methods: the full-size synthetic Qwen3.6-27B text model at
# LLM.int8 and NF4, contexts 1k and 32k, batch 1 (recipes/qwen3.6-27b-synthetic-{int8,nf4}.yaml).
# Prints, per method: VRAM after load, peak VRAM at 32k (prefill and decode), decode tok/s, and the
# estimator's figure beside each. Records go to measurements/ (or $QUANTLAB_OUTPUT).
#
# Then the GPU tests of the bnb and build modules (a bundled-model build and verify on CUDA).
# Needs a CUDA GPU with > 60 GB: the synthetic BF16 weights (~54 GB) are created on the GPU before
# they are quantized in place. Uses $PYTHON (default: .venv/bin/python if present, else python3).
# On a machine without network, carry the missing wheels in .whl/: they are installed first.
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh"
OUT=${QUANTLAB_OUTPUT:-measurements}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PYTHON" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA GPU visible to torch"
import bitsandbytes as bnb
print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| bitsandbytes", bnb.__version__)
PY

START=$(date -u +%Y-%m-%dT%H:%M:%S)
for method in int8 nf4; do
  echo "== Qwen3.6-27B synthetic, bitsandbytes $method"
  "$PYTHON" -m quantlab measure "recipes/qwen3.6-27b-synthetic-$method.yaml" --output "$OUT" --no-progress
done

"$PYTHON" scripts/gpu_summary.py "$OUT" "$START" bnb_

"$PYTHON" -m pytest -q -m gpu tests/test_bnb.py tests/test_build.py
"$PYTHON" -m quantlab report --output "$OUT"
