#!/usr/bin/env bash
# `make gpu-rehearse`: scripts/gpu_check_all.sh, the same script and code path, on this CPU, with the bundled
# model's config in place of the 27B, in a fresh virtual environment built like the GPU box (Python 3.12,
# torch 2.11, transformers 5.17, accelerate 1.15, ..., no pydantic, bitsandbytes or gptqmodel) plus the
# bundle (.whl/, `make gpu-bundle`), and with no network: the check runs in a network namespace of its own
# (unshare -n), so anything that would try to download fails here as it would there.
#
# The box's packages are downloaded once into .gpu-rehearse/box-wheels (~2.7 GB: torch 2.11's CUDA build,
# which runs on a CPU too); every rehearsal then builds its venv from them offline.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_PYTHON=$(python3 scripts/gpu_bundle.py --print-python) || exit 2  # a Python 3.12, as on the GPU box
[ -f .whl/core.txt ] || { echo "gpu-rehearse: no bundle: run make gpu-bundle first" >&2; exit 2; }
BOX_PACKAGES="torch==2.11.0 transformers==5.17.0 accelerate==1.15.0 safetensors==0.8.0 huggingface_hub==1.33.0
  tokenizers==0.23.2 numpy==2.5.2 triton==3.6.0 pyyaml tqdm psutil nvidia-ml-py matplotlib pytest pyarrow protobuf
  pillow ninja threadpoolctl requests jinja2 packaging filelock einops"
BOX_ABSENT="pydantic pydantic_core annotated_types typing_inspection"  # pulled in by typer here; not on the box
WHEELS=.gpu-rehearse/box-wheels VENV=.gpu-rehearse/venv

if [ ! -f "$WHEELS/.complete" ]; then
  echo "== downloading the GPU box's packages once into $WHEELS"
  mkdir -p "$WHEELS"
  "$GPU_PYTHON" -m pip download -q --disable-pip-version-check --only-binary=:all: -d "$WHEELS" $BOX_PACKAGES
  touch "$WHEELS/.complete"
fi
echo "== a fresh venv like the GPU box ($GPU_PYTHON, from $WHEELS, offline)"
rm -rf "$VENV"
"$GPU_PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-index --find-links "$WHEELS" $BOX_PACKAGES
"$VENV/bin/python" -m pip uninstall -q -y $BOX_ABSENT

echo "== the GPU check, rehearsed on the CPU without network"
export PYTHON="$VENV/bin/python" QUANTLAB_SITE="$PWD/.gpu-rehearse/site"
if unshare -n true 2>/dev/null; then
  exec unshare -n bash scripts/gpu_check_all.sh --rehearse "$@"
fi
echo "gpu-rehearse: cannot make a network namespace here (unshare -n needs root): the network stays reachable" >&2
exec bash scripts/gpu_check_all.sh --rehearse "$@"
