#!/usr/bin/env bash
# llama.cpp's CUDA backend for the GPU box, built HERE (on the CPU machine) so that it can travel: the box is
# offline and comes for 15 minutes, too short to compile ggml-cuda. Same pinned source as scripts/build_llama_cpp.sh.
#   - sm_90 only (H100/H200): one architecture keeps the library small enough to carry;
#   - GGML_CUDA_NO_VMM=ON: this machine has nvcc but no libcuda.so (not even the stub) to link the driver API
#     against; llama.cpp then uses its legacy CUDA memory pool instead of virtual memory (records say so);
#   - cuBLAS and the CUDA runtime headers and libraries come from the nvidia-*-cu13 wheels (as torch brings them
#     to the GPU box, which loads them from there at run time).
# Usage: scripts/build_llama_cpp_cuda.sh CUDA_WHEELS_DIR   (a site-packages/nvidia/cu13 folder; output .llama-cuda/bin)
set -euo pipefail
WHEELS=${1:?usage: build_llama_cpp_cuda.sh SITE_PACKAGES/nvidia/cu13}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SRC=$ROOT/.llama.cpp/src/vendor/llama.cpp
NVCC=${NVCC:-/usr/local/cuda-13.0/bin/nvcc}
[ -d "$SRC" ] || { echo "no llama.cpp source: run make llama-cpp first"; exit 1; }
TOOLKIT=$ROOT/.llama-cuda/toolkit
mkdir -p "$TOOLKIT/lib64"
ln -sfn "$(dirname "$NVCC")" "$TOOLKIT/bin"
ln -sfn "$(dirname "$(dirname "$NVCC")")/nvvm" "$TOOLKIT/nvvm"
ln -sfn "$WHEELS/include" "$TOOLKIT/include"
for lib in "$WHEELS"/lib/*.so.*; do
  name=$(basename "$lib"); ln -sfn "$lib" "$TOOLKIT/lib64/$name"; ln -sfn "$lib" "$TOOLKIT/lib64/${name%%.so*}.so"
done
cp -n "$(dirname "$(dirname "$NVCC")")"/lib64/*.a "$TOOLKIT/lib64/" 2>/dev/null || true
start=$(date +%s)
cmake -S "$SRC" -B "$ROOT/.llama-cuda/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON \
  -DGGML_CUDA=ON -DGGML_CUDA_NO_VMM=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF \
  -DCUDAToolkit_ROOT="$TOOLKIT" -DCMAKE_CUDA_COMPILER="$NVCC" > "$ROOT/.llama-cuda/configure.log" 2>&1
cmake --build "$ROOT/.llama-cuda/build" -j "$(nproc)" --target llama llama-bench llama-fit-params \
  > "$ROOT/.llama-cuda/build.log" 2>&1 || { tail -20 "$ROOT/.llama-cuda/build.log"; exit 1; }
rm -rf "$ROOT/.llama-cuda/bin"; cp -a "$ROOT/.llama-cuda/build/bin" "$ROOT/.llama-cuda/bin"
echo "llama.cpp CUDA (sm_90) built in $(( $(date +%s) - start )) s: $(du -sh "$ROOT/.llama-cuda/bin" | cut -f1) in .llama-cuda/bin"
