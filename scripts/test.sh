#!/usr/bin/env bash
# Runs every test, rebuilding only what changed since the last run:
#   1. the extension (moe_fast/_C, objects kept under build/temp-*),
#   2. the C++ kernel tests (ctest; cmake build kept in build/cmake),
#   3. the CUDA compile check (when nvcc is present; files unchanged since their last check are skipped),
#   4. the Python suite (pytest; extra arguments go to it), one test file per worker on every core
#      (pytest-xdist; PYTEST_WORKERS=N picks the count, 0 runs it in one process),
#   5. the numerics-sensitive tests (marker `numerics`) again under every CPU instruction level
#      this machine has (ATEN_CPU_CAPABILITY default/avx2/avx512 with the matching
#      ONEDNN_MAX_CPU_ISA), so that a result that holds only with this CPU's instructions fails
#      here rather than on someone else's machine. NUMERICS_RERUNS=0 skips this step.
# Assumes scripts/install.sh has run once.  Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python}"
START=${SECONDS}
say() { echo "[test $((SECONDS - START))s] $*"; }

say "1/5 building the extension (only what changed)"
PYTHON="${PY}" bash scripts/build_extension.sh

say "2/5 C++ kernel tests: cmake build in build/cmake, then ctest"
if [[ ! -f build/cmake/CMakeCache.txt ]]; then
  cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release > /dev/null
fi
cmake --build build/cmake | { grep -v -e "^ninja: no work to do" -e "^\[[0-9]*/[0-9]*\]" || true; }
ctest --test-dir build/cmake --output-on-failure

say "3/5 CUDA compile check of csrc/cuda/*.cu"
bash scripts/compile_cuda.sh

workers="${PYTEST_WORKERS:-$(nproc)}"
parallel=()
if [[ "${workers}" != "0" && "${workers}" != "1" ]]; then
  if "${PY}" -c "import xdist" 2> /dev/null; then
    parallel=(-n "${workers}" --dist loadfile)  # a file stays on one worker: its module fixtures are built once
  else
    echo "  pytest-xdist is not installed (scripts/install.sh installs it): the suite runs in one process"
  fi
fi
say "4/5 Python tests (pytest${parallel:+, ${workers} workers})"
"${PY}" -m pytest -q -ra "${parallel[@]}" tests "$@"

if [[ "${NUMERICS_RERUNS:-1}" == "0" ]]; then
  say "5/5 numerics reruns skipped (NUMERICS_RERUNS=0)"
else
  say "5/5 numerics-sensitive tests (-m numerics) under each CPU instruction level this machine has"
  PYTHON="${PY}" bash scripts/numerics_reruns.sh "$@"
fi
say "all tests passed"
