#!/usr/bin/env bash
# The full CUDA build, checked without a GPU: compiles the CUDA kernels *and* their torch bindings
# (csrc/bindings/cuda_bindings.cpp) and links them against libtorch_cuda, with the GPU machine's
# versions, then runs the CPU test suite with that build.
#   bash scripts/check_cuda_build.sh [pytest args]
# Steps:
#   1. a separate virtual environment with torch ${TORCH_VERSION} (the CUDA 13.0 build from
#      PyPI: about 2.8 GB with its nvidia-* wheels) and transformers ${TRANSFORMERS_VERSION},
#      created once and reused (~/.cache/moe_fast/cuda-check-venv/<versions>; MOE_FAST_CUDA_VENV
#      overrides). This machine's pip configuration (a local CPU wheel, a version cap) is bypassed
#      for that environment only.
#   2. a copy of the source tree (tracked and untracked, not ignored, files) in a temporary folder,
#      so that the CPU build here is left alone, built with MOE_FAST_CUDA=1 for sm_80 and sm_90
#      with the installed nvcc; any compiler warning in the project's own files fails the check;
#   3. import, and check that every moe_fast op has CPU, CUDA and Meta kernels;
#   4. the CPU test suite in that environment (the CUDA tests skip without a GPU).
# Needs nvcc (CUDA 13.x, matching that torch); without it the check is SKIPPED (exit 0) unless
# MOE_FAST_REQUIRE_CUDA_CHECK=1. CHECK_CUDA_TESTS=0 stops after step 3.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
TORCH_VERSION="${TORCH_VERSION:-2.11.0}"
TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-5.17.0}"
ARCHS="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
BASE_PY="${PYTHON:-python3}"
START=${SECONDS}
say() { echo "[check_cuda_build $((SECONDS - START))s] $*"; }

# nvcc: PATH, then /usr/local/cuda. CUDA_HOME must be the toolkit's folder (its include/ holds
# cuda_runtime.h); a wrapper script on PATH would make torch guess it wrong.
NVCC="$(command -v nvcc || true)"
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then export CUDA_HOME=/usr/local/cuda; fi
if [[ -n "${CUDA_HOME:-}" ]]; then NVCC="${CUDA_HOME}/bin/nvcc"; fi
if [[ -z "${NVCC}" || ! -x "${NVCC}" ]]; then
  if [[ "${MOE_FAST_REQUIRE_CUDA_CHECK:-0}" == "1" ]]; then
    echo "check_cuda_build: FAILED (nvcc not found; set CUDA_HOME or add nvcc to PATH)"; exit 1
  fi
  echo "check_cuda_build: SKIPPED (nvcc not found; set CUDA_HOME or add nvcc to PATH)"; exit 0
fi
NVCC_VERSION="$("${NVCC}" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"

# 1. The environment, keyed by every version that goes into it.
PYVER="$("${BASE_PY}" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
REQS=("torch==${TORCH_VERSION}" "transformers==${TRANSFORMERS_VERSION}" numpy safetensors tqdm matplotlib
      pytest ninja pybind11 "setuptools>=77,<82" wheel)  # torch 2.11 needs setuptools < 82
VENV="${MOE_FAST_CUDA_VENV:-${HOME}/.cache/moe_fast/cuda-check-venv/py${PYVER}-torch${TORCH_VERSION}-transformers${TRANSFORMERS_VERSION}}"
VPY="${VENV}/bin/python"
if [[ -x "${VPY}" && -f "${VENV}/.complete" && "$(cat "${VENV}/.complete")" == "${REQS[*]}" ]]; then
  say "1/4 reusing ${VENV}"
else
  say "1/4 creating ${VENV} with torch ${TORCH_VERSION} (CUDA build, ~2.8 GB download) and transformers ${TRANSFORMERS_VERSION}"
  rm -rf "${VENV}"
  mkdir -p "$(dirname "${VENV}")"
  "${BASE_PY}" -m venv "${VENV}"
  # PIP_CONFIG_FILE=/dev/null makes pip read no configuration file; the PIP_* variables that
  # point it at local wheels, other indexes or version caps are dropped too, for this call only.
  env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT -u PIP_NO_INDEX \
    PIP_CONFIG_FILE=/dev/null "${VPY}" -m pip install --quiet --disable-pip-version-check --progress-bar off \
    "${REQS[@]}"
  echo "${REQS[*]}" > "${VENV}/.complete"
fi
read -r TORCH_SEEN TORCH_CUDA <<< "$("${VPY}" -c 'import torch; print(torch.__version__, torch.version.cuda)')"
say "    torch ${TORCH_SEEN} (CUDA ${TORCH_CUDA}), nvcc ${NVCC_VERSION} at ${NVCC}"
if [[ "${TORCH_SEEN}" != "${TORCH_VERSION}"* || "${TORCH_CUDA}" == "None" ]]; then
  echo "check_cuda_build: FAILED (expected a CUDA build of torch ${TORCH_VERSION}, found ${TORCH_SEEN} with CUDA ${TORCH_CUDA}; delete ${VENV} to recreate it)"
  exit 1
fi
if [[ "${TORCH_CUDA%%.*}" != "${NVCC_VERSION%%.*}" ]]; then
  echo "check_cuda_build: FAILED (torch is built for CUDA ${TORCH_CUDA} but nvcc is ${NVCC_VERSION}: the major versions must match)"
  exit 1
fi

# 2. Build in a copy of the tree.
WORK="$(mktemp -d "${TMPDIR:-/tmp}/moe_fast_cuda_check.XXXXXX")"
trap 'rm -rf "${WORK}"' EXIT
if git -C "${ROOT}" rev-parse --git-dir > /dev/null 2>&1; then
  (cd "${ROOT}" && git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} find {} -maxdepth 0 -type f -print0 \
    | tar --null -cf - -T -) | tar -xf - -C "${WORK}"
else
  (cd "${ROOT}" && tar --exclude=./build --exclude='./moe_fast/*.so' -cf - .) | tar -xf - -C "${WORK}"
fi
say "2/4 building the extension with the CUDA kernels (sm ${ARCHS}) in ${WORK}"
# -Wall -Wextra on top of the build's own flags, for the host compiler under nvcc too.
CFLAGS="${CFLAGS:-} -Wextra" NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} -Xcompiler -Wall,-Wextra" MOE_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST="${ARCHS}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" PYTHON="${VPY}" \
  bash "${WORK}/scripts/build_extension.sh" --strict --log "${WORK}/build/build_ext.log" \
  || { echo "check_cuda_build: FAILED (build; see the lines above)"; exit 1; }
for arch in ${ARCHS//;/ }; do
  sm="${arch//./}"
  grep -q "code=sm_${sm}" "${WORK}/build/build_ext.log" \
    || { echo "check_cuda_build: FAILED (no code for sm_${sm} was compiled)"; exit 1; }
done

# 3. Import and kernel registrations.
say "3/4 importing, and checking that every op has CPU, CUDA and Meta kernels"
(cd "${WORK}" && PYTHONPATH="${WORK}" "${VPY}" - << 'EOF'
import sys

import torch

import moe_fast  # noqa: F401  (loads the kernels and the fake/Meta registrations)
import moe_fast.ops  # noqa: F401

ops = sorted({s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith("moe_fast::")})
if not ops:
    sys.exit("check_cuda_build: FAILED (no moe_fast op is registered)")
missing = [
    f"{op} has no {key} kernel"
    for op in ops
    for key in ("CPU", "CUDA", "Meta")
    # ops written in torch (experts.py's grouped_matmul) have one kernel for every device
    if not any(torch._C._dispatch_has_kernel_for_dispatch_key(op, k)
               for k in (key, "CompositeExplicitAutograd", "CompositeImplicitAutograd"))
]
if missing:
    sys.exit("check_cuda_build: FAILED (" + "; ".join(missing) + ")")
print(f"    {len(ops)} ops, each with CPU, CUDA and Meta kernels: {', '.join(ops)}")
EOF
) || exit 1

# 4. The CPU test suite with this torch and transformers.
if [[ "${CHECK_CUDA_TESTS:-1}" == "0" ]]; then
  say "4/4 tests skipped (CHECK_CUDA_TESTS=0)"
else
  # One test file per worker on every core, as scripts/test.sh runs it. pytest-xdist is added to
  # an environment made before it was needed (outside REQS: the environment is not remade for it).
  "${VPY}" -c "import xdist" 2> /dev/null \
    || env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT -u PIP_NO_INDEX \
      PIP_CONFIG_FILE=/dev/null "${VPY}" -m pip install --quiet --disable-pip-version-check pytest-xdist
  workers="${PYTEST_WORKERS:-$(nproc)}"
  parallel=()
  if [[ "${workers}" != "0" && "${workers}" != "1" ]]; then parallel=(-n "${workers}" --dist loadfile); fi
  say "4/4 the test suite with torch ${TORCH_SEEN} and transformers ${TRANSFORMERS_VERSION} (CUDA tests skip: no GPU)"
  (cd "${WORK}" && PYTHONPATH="${WORK}" "${VPY}" -m pytest -q -ra -p no:cacheprovider "${parallel[@]}" tests "$@") \
    || { echo "check_cuda_build: FAILED (tests with torch ${TORCH_SEEN})"; exit 1; }
fi
say "OK: CUDA build (sm ${ARCHS}, nvcc ${NVCC_VERSION}, torch ${TORCH_SEEN}) compiled, linked and registered every op; tests passed"
