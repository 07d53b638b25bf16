#!/usr/bin/env bash
# Installs what moe_fast needs and builds its C++ extension against the installed torch.
#   bash scripts/install.sh            (PYTHON=python3.11 to pick an interpreter)
# torch is installed only when missing, pinned to 2.13.0: on our machines that is a local CPU
# wheel; an unpinned `pip install torch` would fetch a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python}"
PIP=("${PY}" -m pip install --quiet --disable-pip-version-check)

if ! "${PY}" -c "import torch" 2>/dev/null; then
  "${PIP[@]}" "torch==2.13.0"
fi
"${PIP[@]}" "transformers>=5.7" numpy safetensors tqdm matplotlib pytest ninja pybind11 "setuptools>=64" wheel
# --no-build-isolation: compile against the torch above, not a freshly fetched one.
"${PIP[@]}" --no-build-isolation --no-deps -e .
"${PY}" -c "import moe_fast, torch; print(f'moe_fast {moe_fast.__version__} built against torch {torch.__version__}')"
