#!/usr/bin/env bash
# llama.cpp at one pinned version, from the llama-cpp-python sdist (which carries the whole llama.cpp tree,
# converter included), built once into .llama.cpp/ and reused:
#   .llama.cpp/src/      the sdist, unpacked (vendor/llama.cpp: convert_hf_to_gguf.py, gguf-py, the C++ sources)
#   .llama.cpp/build/bin libllama.so + llama-quantize, llama-imatrix, llama-perplexity, llama-bench, llama-fit-params
#   the llama_cpp Python binding, installed into the venv without a second C++ build (LLAMA_CPP_LIB_PATH points at bin)
# Usage: scripts/build_llama_cpp.sh VENV_PYTHON    (GGML_CUDA=on in the environment builds the CUDA backend)
set -euo pipefail
VERSION=0.3.36
PY=${1:?usage: build_llama_cpp.sh VENV_PYTHON}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=$ROOT/.llama.cpp
STAMP=$DEST/.built-$VERSION-cuda-${GGML_CUDA:-off}
JOBS=${JOBS:-$(nproc)}

TOOLS="llama-quantize llama-imatrix llama-perplexity llama-bench llama-fit-params"
built() {
  [ -f "$STAMP" ] && [ -f "$DEST/build/bin/libllama.so" ] || return 1
  for tool in $TOOLS; do [ -x "$DEST/build/bin/$tool" ] || return 1; done
  LLAMA_CPP_LIB_PATH="$DEST/build/bin" "$PY" -c "import llama_cpp" 2>/dev/null
}
if built; then
  echo "llama.cpp $VERSION already built in $DEST"
  touch "$STAMP"
  exit 0
fi
mkdir -p "$DEST/download"
start=$(date +%s)
echo "llama.cpp: fetching the llama-cpp-python $VERSION sdist (73 MiB; the pip cache keeps it)"
"$PY" -m pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$DEST/download"
rm -rf "$DEST/src.partial"
mkdir -p "$DEST/src.partial"
tar xzf "$DEST/download/llama_cpp_python-$VERSION.tar.gz" -C "$DEST/src.partial" --strip-components=1
rm -rf "$DEST/src"
mv "$DEST/src.partial" "$DEST/src"

echo "llama.cpp: building libllama and its tools with $JOBS jobs (about 6 minutes on 2 cores, CPU backend)"
cmake -S "$DEST/src/vendor/llama.cpp" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON -DGGML_CUDA="${GGML_CUDA:-off}" > "$DEST/cmake-configure.log" 2>&1 \
  || { tail -20 "$DEST/cmake-configure.log"; echo "llama.cpp configure failed: $DEST/cmake-configure.log"; exit 1; }
# shellcheck disable=SC2086
cmake --build "$DEST/build" -j "$JOBS" --target llama $TOOLS > "$DEST/cmake-build.log" 2>&1 \
  || { tail -20 "$DEST/cmake-build.log"; echo "llama.cpp build failed: $DEST/cmake-build.log"; exit 1; }

echo "llama.cpp: installing the llama_cpp Python binding (no C++ build: it loads .llama.cpp/build/bin/libllama.so)"
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PY" -m pip install --quiet \
  "$DEST/download/llama_cpp_python-$VERSION.tar.gz"
rm -f "$DEST"/.built-*
touch "$STAMP"
echo "llama.cpp $VERSION built in $(( $(date +%s) - start )) s"
