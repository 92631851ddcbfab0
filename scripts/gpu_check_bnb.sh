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

"$PYTHON" - "$OUT" "$START" <<'PY'
import sys
from quantlab.estimate.checks import scheme_for
from quantlab.estimate.estimator import weights_for
from quantlab.estimate.model import load_model
from quantlab.store import load_records

out, start = sys.argv[1], sys.argv[2]
records = [r for r in load_records(out)[0] if r.created_at[:19] >= start and r.method.name.startswith("bnb_")
           and r.model.name == "Qwen3.6-27B"]
qwen = load_model("qwen3.6-27b")
gb = lambda b: "n/a" if b is None else f"{b / 1e9:6.2f}"
print(f"\n{'method':<26} {'context':>7} {'after load':>10} {'est.':>7} {'prefill pk':>10} {'decode pk':>10} {'decode tok/s':>12}  hardware")
for r in records:
    scheme = scheme_for(r)
    est = weights_for(qwen, scheme).bytes() if scheme else None
    res = r.result
    if res.status != "ok":
        print(f"{r.method.label:<26} {r.point.context:>7} {gb(r.load_memory.allocated_end_bytes):>10} {gb(est):>7}  {res.error}")
        continue
    print(f"{r.method.label:<26} {r.point.context:>7} {gb(r.load_memory.allocated_end_bytes):>10} {gb(est):>7} "
          f"{gb(res.prefill_memory.allocated_peak_bytes):>10} {gb(res.decode_memory.allocated_peak_bytes):>10} "
          f"{res.decode_tokens_per_s.median:>12.1f}  {r.hardware.name}")
print("GB = 1e9 bytes; VRAM = torch allocated; 'est.' = quantlab's weight estimate for the text model")
PY

"$PYTHON" -m pytest -q -m gpu tests/test_bnb.py tests/test_build.py
"$PYTHON" -m quantlab report --output "$OUT"
