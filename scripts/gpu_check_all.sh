#!/usr/bin/env bash
# `make gpu-check-all`: the one GPU check, in priority order, stopping cleanly as its time runs out:
#   1. BF16 full-size synthetic Qwen3.6-27B text model at 1k, 32k and 128k;  2. NF4 and AWQ (RTN-packed)
#   at 1k and 32k;  3. int8 at 1k;  4. the gpu-marked tests.  Details and the time budget:
#   scripts/gpu_check_all.py.  On an offline GPU box, bring the bundle (`make gpu-bundle`, folder .whl/).
#
#   bash scripts/gpu_check_all.sh [--budget-s 500] [--only bf16,nf4] [--output DIR]
# Records go to measurements/ (or --output); when $OUT is set they are also packed there after every step.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
exec "$PYTHON" scripts/gpu_check_all.py "$@"
