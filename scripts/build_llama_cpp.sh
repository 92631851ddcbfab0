#!/usr/bin/env bash
# llama.cpp at one pinned version, from the llama-cpp-python sdist (which carries the whole llama.cpp tree,
# converter included), built once into .llama.cpp/, checked on this CPU, and reused:
#   .llama.cpp/src/        the sdist, unpacked (vendor/llama.cpp: convert_hf_to_gguf.py, gguf-py, the C++ sources)
#   .llama.cpp/build/bin   libllama.so, libggml*.so, the CPU backends and llama-quantize, llama-imatrix,
#                          llama-perplexity, llama-bench, llama-fit-params, and llama-speculative-simple with
#                          llama-completion (decoding with the model's MTP head drafting, --spec-type draft-mtp, and
#                          without a draft)
#   .llama.cpp/build.json  how it was built (quantlab refuses a .llama.cpp/ without it, or from an older scheme)
#   the llama_cpp Python binding, installed into the venv without a second C++ build (quantlab points it at bin)
#
# LLAMA_CPU picks the CPU code:
#   portable (default)  llama.cpp's own release scheme: GGML_NATIVE=OFF, GGML_BACKEND_DL=ON, GGML_CPU_ALL_VARIANTS=ON,
#                       one CPU backend per x86-64 ISA level (x64 ... zen4), the best this CPU runs chosen at run time,
#                       so the build runs on any x86-64 CPU, whichever machine built it. The AMX variant
#                       (sapphirerapids) is left out: the pinned ggml asks the kernel for AMX tile permission on the
#                       main thread only, and its worker threads die with SIGILL (ggml-org/llama.cpp PR 26954).
#                       Sapphire Rapids and later CPUs get the zen4 variant (AVX-512 VBMI/VNNI/BF16).
#   native              -march=native, one backend for exactly this CPU (AMX included where the CPU has it); for
#                       benchmarks against the portable build, never for builds that travel.
# LLAMA_CPU_EXCLUDE="zen4 icelake" leaves more variants out (a variant that fails the self-check on some CPU).
# After building, quantlab.llamacpp.check runs Q8_0 and Q4_K_M GGUFs through llama-bench and through libllama as
# quantlab's runtime loads it; a crash fails the build with one line naming the CPU and the variant.
# Usage: scripts/build_llama_cpp.sh VENV_PYTHON    (GGML_CUDA=on builds the CUDA backend too; LLAMA_CPP_DIR=... elsewhere)
set -euo pipefail
VERSION=0.3.36
SCHEME=3   # bump when the build changes in a way that makes older builds stale (3: RUNPATH $ORIGIN, relocatable)
PY=${1:?usage: build_llama_cpp.sh VENV_PYTHON}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${LLAMA_CPP_DIR:-$ROOT/.llama.cpp}
CPU=${LLAMA_CPU:-portable}
CUDA=${GGML_CUDA:-off}
EXCLUDE=$(echo "${LLAMA_CPU_EXCLUDE:-}" | tr ',' ' ' | xargs -n1 2>/dev/null | sort -u | xargs)
JOBS=${JOBS:-$(nproc)}
STAMP=$DEST/.built-$CPU-cuda-$CUDA
TOOLS="llama-quantize llama-imatrix llama-perplexity llama-bench llama-fit-params llama-speculative-simple llama-completion"
case $CPU in portable|native) ;; *) echo "LLAMA_CPU=$CPU: give portable or native"; exit 2 ;; esac
case $CUDA in on|off) ;; *) echo "GGML_CUDA=$CUDA: give on or off"; exit 2 ;; esac
[ "$CPU" = native ] && [ -n "$EXCLUDE" ] && { echo "LLAMA_CPU_EXCLUDE only applies to LLAMA_CPU=portable"; exit 2; }
[ "$CPU" = portable ] && [ "$(uname -m)" != x86_64 ] && {
  echo "LLAMA_CPU=portable is written for x86-64; this is $(uname -m): build with LLAMA_CPU=native"; exit 2; }

WANT="{\"sdist\": \"$VERSION\", \"scheme\": $SCHEME, \"cpu\": \"$CPU\", \"cuda\": \"$CUDA\", \"exclude\": \"$EXCLUDE\"}"
install_binding() {
  echo "llama.cpp: installing the llama_cpp Python binding (no C++ build: quantlab loads $DEST/build/bin/libllama.so)"
  # --no-deps: its dependencies are in quantlab's gguf extra, so that the lock pins them
  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PY" -m pip install --quiet --no-deps --force-reinstall \
    "$DEST/download/llama_cpp_python-$VERSION.tar.gz"
}
binding_ok() { LLAMA_CPP_LIB_PATH="$DEST/build/bin" "$PY" -c "import llama_cpp" 2>/dev/null; }
same_build() {  # a build of this version, scheme and configuration, whatever tools it has
  [ -f "$DEST/build.json" ] && [ -f "$DEST/build/bin/libllama.so" ] || return 1
  [ -f "$DEST/download/llama_cpp_python-$VERSION.tar.gz" ] || return 1
  "$PY" - "$DEST/build.json" "$WANT" <<'EOF'
import json, sys
have, want = json.load(open(sys.argv[1])), json.loads(sys.argv[2])
sys.exit(0 if all(have.get(k) == v for k, v in want.items()) else 1)
EOF
}
tools_built() { for tool in $TOOLS; do [ -x "$DEST/build/bin/$tool" ] || return 1; done; }
configure() {
  # shellcheck disable=SC2086
  cmake -S "$LLAMA" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON -DGGML_CUDA="$CUDA" -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON $CPU_FLAGS \
    > "$DEST/cmake-configure.log" 2>&1 \
    || { tail -20 "$DEST/cmake-configure.log"; echo "llama.cpp configure failed: $DEST/cmake-configure.log"; exit 1; }
}
build_targets() {
  # shellcheck disable=SC2086
  cmake --build "$DEST/build" -j "$JOBS" --target llama $TOOLS > "$DEST/cmake-build.log" 2>&1 \
    || { tail -20 "$DEST/cmake-build.log"; echo "llama.cpp build failed: $DEST/cmake-build.log"; exit 1; }
}
self_check() {
  "$PY" -m quantlab.llamacpp.check --root "$DEST" || {
    echo "llama.cpp in $DEST was built but failed its self-check on this CPU (above); nothing of it will be used"
    rm -f "$STAMP"
    exit 1
  }
}
LLAMA=$DEST/src/vendor/llama.cpp
if [ "$CPU" = portable ]; then CPU_FLAGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON"
else CPU_FLAGS="-DGGML_NATIVE=ON"; fi
configured_here() { grep -qxF "CMAKE_CACHEFILE_DIR:INTERNAL=$DEST/build" "$DEST/build/CMakeCache.txt" 2>/dev/null; }
if same_build && ! tools_built && configured_here; then
  # a build by an earlier quantlab lacks a tool added since: build just those, on the same configuration
  echo "llama.cpp: adding the tools this build lacks (a few minutes)"
  configure
  build_targets
fi
if same_build && tools_built; then
  echo "llama.cpp $VERSION ($CPU CPU code, CUDA $CUDA) already built in $DEST"
  binding_ok || install_binding  # a new venv (the lock changed) has no binding yet
  self_check
  touch "$STAMP"
  exit 0
fi
if [ -d "$DEST/build" ]; then
  # a build of another scheme or configuration (or a broken one): its CPU backends must not linger in bin/
  echo "llama.cpp: replacing the older or different build in $DEST/build"
  rm -rf "$DEST/build" "$DEST/build.json" "$DEST"/.built-* "$DEST/checked"
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

if [ "$CPU" = portable ]; then
  # The variant list is llama.cpp's own (ggml/src/CMakeLists.txt); quantlab only removes lines from it.
  VARIANTS_FILE=$LLAMA/ggml/src/CMakeLists.txt
  grep -q 'ggml_add_cpu_backend_variant(sapphirerapids' "$VARIANTS_FILE" \
    || { echo "llama.cpp $VERSION: no sapphirerapids variant in $VARIANTS_FILE; re-read the AMX exclusion"; exit 1; }
  sed -i '/ggml_add_cpu_backend_variant(.*AMX_/d' "$VARIANTS_FILE"
  for name in $EXCLUDE; do
    grep -q "ggml_add_cpu_backend_variant($name " "$VARIANTS_FILE" \
      || { echo "LLAMA_CPU_EXCLUDE: $name is not one of llama.cpp's x86 CPU variants"; exit 2; }
    sed -i "/ggml_add_cpu_backend_variant($name /d" "$VARIANTS_FILE"
  done
  WHAT="one CPU backend per x86-64 level, AMX left out${EXCLUDE:+, and $EXCLUDE}; about 10 minutes on 2 cores"
else
  WHAT="-march=native for this CPU only; about 8 minutes on 2 cores"
fi

echo "llama.cpp: building libllama and its tools with $JOBS jobs ($WHAT)"
configure
build_targets
VARIANTS=native
[ "$CPU" = portable ] && VARIANTS=$(cd "$DEST/build/bin" && ls libggml-cpu-*.so | sed 's/^libggml-cpu-//; s/\.so$//' | xargs)

install_binding
"$PY" - "$DEST/build.json" "$WANT" "$VARIANTS" <<'EOF'
import json, sys
info = json.loads(sys.argv[2]) | {"cpu_backends": sys.argv[3].split()}
open(sys.argv[1], "w").write(json.dumps(info, indent=2) + "\n")
EOF
echo "llama.cpp $VERSION built in $(( $(date +%s) - start )) s; CPU backends: $VARIANTS"
self_check
rm -f "$DEST"/.built-*
touch "$STAMP"
