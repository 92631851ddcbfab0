# Sourced by the GPU check: the Python to use, and the bundle's wheels for an offline GPU box.
#
# $PYTHON: default .venv/bin/python if present, else python3 (the GPU box's own, which holds torch).
# The bundle (.whl/, made by `make gpu-bundle`) holds what that machine lacks. Where this Python lacks
# quantlab's own needs, the core wheels (.whl/core.txt) are installed into a private folder put first on
# PYTHONPATH (a `make setup` venv has them already and is left alone); pip picks the wheel that
# fits this Python (--find-links), installs nothing else (--no-deps) and never reaches a network
# (--no-index). flash-linear-attention (.whl/gpu.txt) is added only where a GPU is visible: on a
# CPU-only machine it breaks transformers' qwen3_5 forward.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
QUANTLAB_SITE=${QUANTLAB_SITE:-${TMPDIR:-/tmp}/quantlab-site}

install_wheels() {  # install_wheels LIST DEST
  rm -rf "$2" && mkdir -p "$2" &&
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
      --find-links .whl --target "$2" -r "$1"
}

lacks() {  # lacks MODULE...: true when this Python cannot import one of them
  ! "$PYTHON" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))" "$@"
}

if [ -f .whl/core.txt ] && lacks pydantic bitsandbytes gptqmodel; then
  install_wheels .whl/core.txt "$QUANTLAB_SITE/core" || { echo "gpu_env: installing the bundle's core wheels failed" >&2; exit 3; }
  export PYTHONPATH="$QUANTLAB_SITE/core:$PYTHONPATH"
fi
if [ -f .whl/gpu.txt ] && nvidia-smi -L >/dev/null 2>&1 && lacks fla; then
  if install_wheels .whl/gpu.txt "$QUANTLAB_SITE/gpu"; then
    export QUANTLAB_FLA_SITE="$QUANTLAB_SITE/gpu" PYTHONPATH="$QUANTLAB_SITE/gpu:$PYTHONPATH"
  else
    echo "gpu_env: installing flash-linear-attention failed: DeltaNet runs on transformers' torch fallback" >&2
  fi
fi
