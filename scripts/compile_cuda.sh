#!/usr/bin/env bash
# Compile-only check of every CUDA kernel (csrc/cuda/*.cu) with nvcc, for sm_80 and sm_90.
# Needs no GPU and no CUDA build of torch: the kernels include no torch header.
# Usage: bash scripts/compile_cuda.sh   (NVCC=/path/to/nvcc to pick a compiler; EXTRA_NVCC_FLAGS=...)
# Exit status: 0 when every file compiles (or nvcc is absent: skipped with a message), 1 otherwise.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "${NVCC}" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "${NVCC}" ]]; then
  echo "compile_cuda: SKIPPED (nvcc not found; set NVCC or add it to PATH)"
  exit 0
fi

shopt -s nullglob
SOURCES=("${ROOT}"/csrc/cuda/*.cu)
if [[ ${#SOURCES[@]} -eq 0 ]]; then
  echo "compile_cuda: FAILED (no csrc/cuda/*.cu found)"
  exit 1
fi

OBJDIR="$(mktemp -d)"
trap 'rm -rf "${OBJDIR}"' EXIT
FLAGS=(-c -std=c++17 -O3 --expt-relaxed-constexpr -Werror all-warnings -Xcompiler -Wall
       -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
       -I "${ROOT}/csrc/include")
# shellcheck disable=SC2206
EXTRA=(${EXTRA_NVCC_FLAGS:-})

failed=()
for src in "${SOURCES[@]}"; do
  name="$(basename "${src}" .cu)"
  if ! "${NVCC}" "${FLAGS[@]}" "${EXTRA[@]}" -o "${OBJDIR}/${name}.o" "${src}"; then
    failed+=("${name}.cu")
  fi
done

version="$("${NVCC}" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "compile_cuda: FAILED ${#failed[@]}/${#SOURCES[@]} (${failed[*]}) with nvcc ${version} for sm_80,sm_90"
  exit 1
fi
echo "compile_cuda: OK ${#SOURCES[@]}/${#SOURCES[@]} files compiled with nvcc ${version} for sm_80,sm_90"
