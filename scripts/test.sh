#!/usr/bin/env bash
# Runs every test: the C++ kernel tests (ctest), the CUDA compile check (when nvcc is present),
# then the Python suite. Assumes scripts/install.sh has run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python}"

cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build/cmake
ctest --test-dir build/cmake --output-on-failure

bash scripts/compile_cuda.sh

"${PY}" -m pytest -q -ra tests "$@"
