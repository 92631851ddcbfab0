#!/usr/bin/env bash
# GPU check for the quantlab core: the GPU-only tests, then the full-size synthetic
# Qwen3.6-27B text model at BF16, contexts 1k and 32k, batch 1. Records go to measurements/.
#
# Needs a CUDA GPU with > 60 GB (H100 80 GB, H200). Uses $PYTHON (default: .venv/bin/python
# if present, else python3). On a machine without network, carry the missing wheels in .whl/
# (pydantic, pydantic-core, annotated-types, typing-inspection, ...): they are installed first.
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'; print(torch.cuda.get_device_name(0))"
"$PYTHON" -m pytest -q -m gpu tests/
"$PYTHON" -m quantlab run recipes/qwen3.6-27b-synthetic-bf16.yaml --no-progress
