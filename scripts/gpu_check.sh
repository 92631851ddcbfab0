#!/usr/bin/env bash
# GPU check for the quantlab core: the GPU-only tests, then the full-size synthetic
# Qwen3.6-27B text model at BF16, contexts 1k and 32k, batch 1. Records go to measurements/.
#
# Needs a CUDA GPU with > 60 GB (H100 80 GB, H200). Uses $PYTHON (default: .venv/bin/python
# if present, else python3). On a machine without network, carry the missing wheels in .whl/
# (pydantic, pydantic-core, annotated-types, typing-inspection, ...): they are installed first.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/quantlab-site .whl/*.whl
  export PYTHONPATH="/tmp/quantlab-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'; print(torch.cuda.get_device_name(0))"
"$PYTHON" -m pytest -q -m gpu tests/
"$PYTHON" -m quantlab run recipes/qwen3.6-27b-synthetic-bf16.yaml --no-progress
