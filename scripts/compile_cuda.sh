#!/usr/bin/env bash
# Compile-only check of every CUDA kernel (csrc/cuda/*.cu) with nvcc, for sm_80 and sm_90.
# Needs no GPU and no CUDA build of torch: the kernels include no torch header.
# Usage: bash scripts/compile_cuda.sh   (NVCC=/path/to/nvcc to pick a compiler; EXTRA_NVCC_FLAGS=...)
# A file that compiled before is skipped while it, the headers in csrc/include, the flags and nvcc
# are unchanged (stamps, named by a hash of all of these, in ~/.cache/moe_fast/compile_cuda, so that
# a fresh clone of the same sources reuses them; COMPILE_CUDA_FORCE=1 compiles everything).
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

version="$("${NVCC}" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
STAMPS="${MOE_FAST_CACHE:-${XDG_CACHE_HOME:-${HOME}/.cache}/moe_fast}/compile_cuda"
mkdir -p "${STAMPS}"
# What a file's result depends on, apart from its own text: nvcc, the flags and every header.
common="$( { "${NVCC}" --version; echo "${FLAGS[*]} ${EXTRA[*]}"; cat "${ROOT}"/csrc/include/moe_fast/* "${ROOT}"/csrc/cuda/*.cuh; } | sha256sum | cut -d' ' -f1)"

failed=()
unchanged=0
for src in "${SOURCES[@]}"; do
  name="$(basename "${src}" .cu)"
  key="$( { echo "${common}"; cat "${src}"; } | sha256sum | cut -d' ' -f1)"
  if [[ "${COMPILE_CUDA_FORCE:-0}" != "1" && -f "${STAMPS}/${key}.ok" ]]; then
    unchanged=$((unchanged + 1))
    continue
  fi
  echo "compile_cuda: ${name}.cu"
  if "${NVCC}" "${FLAGS[@]}" "${EXTRA[@]}" -o "${OBJDIR}/${name}.o" "${src}"; then
    echo "${name}.cu" > "${STAMPS}/${key}.ok"
  else
    failed+=("${name}.cu")
  fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "compile_cuda: FAILED ${#failed[@]}/${#SOURCES[@]} (${failed[*]}) with nvcc ${version} for sm_80,sm_90"
  exit 1
fi
echo "compile_cuda: OK ${#SOURCES[@]}/${#SOURCES[@]} files compile with nvcc ${version} for sm_80,sm_90 (${unchanged} unchanged since their last check)"
