# Sourced by the GPU check scripts: the Python to use, and wheels carried to an offline GPU box.
# Uses $PYTHON (default: .venv/bin/python if present, else python3). Wheels in .whl/ (pydantic,
# pydantic-core, annotated-types, typing-inspection, bitsandbytes, ...) are installed first.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/quantlab-site .whl/*.whl
  export PYTHONPATH="/tmp/quantlab-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
