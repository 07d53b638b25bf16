#!/usr/bin/env bash
# Installs what moe_fast needs and builds its C++ extension against the installed torch.
#   bash scripts/install.sh            (PYTHON=python3.11 to pick an interpreter)
# torch is installed only when missing, pinned to 2.13.0: on our machines that is a local CPU
# wheel; an unpinned `pip install torch` would fetch a CUDA build of several GB.
# Run it again after pulling: it only recompiles what changed (objects are kept under build/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python}"
PIP=("${PY}" -m pip install --quiet --disable-pip-version-check)
START=${SECONDS}
say() { echo "[install $((SECONDS - START))s] $*"; }

if "${PY}" -c "import torch" 2>/dev/null; then
  say "torch $("${PY}" -c 'import torch; print(torch.__version__)') is installed; keeping it"
else
  say "installing torch 2.13.0 (not found in ${PY})"
  "${PIP[@]}" "torch==2.13.0"
fi

# pytest-xdist: scripts/test.sh runs the suite on every core.
# lm-eval and accelerate: `moe-fast eval --tasks` and its tests (the extra moe_fast[eval]); neither pulls another torch.
DEPS=("transformers>=5.7" numpy safetensors tqdm matplotlib pytest pytest-xdist ninja pybind11 "setuptools>=64" wheel
      "lm-eval==0.4.13" accelerate)
# pip's own requirement parser (vendored with pip): are all of DEPS installed at suitable versions?
if "${PY}" - "${DEPS[@]}" << 'EOF' 2>/dev/null; then
import importlib.metadata as md, sys
from pip._vendor.packaging.requirements import Requirement
for spec in sys.argv[1:]:
    req = Requirement(spec)
    if not req.specifier.contains(md.version(req.name), prereleases=True):
        sys.exit(1)
EOF
  say "the Python dependencies are installed (${DEPS[*]})"
else
  say "installing the Python dependencies (${DEPS[*]})"
  "${PIP[@]}" "${DEPS[@]}"
fi

# The extension is compiled in place (moe_fast/_C*.so) with its objects kept under build/, so a
# rerun recompiles only changed sources. The first build takes one to a few minutes.
say "building the C++ extension against torch (only what changed; CUDA kernels: ${MOE_FAST_CUDA:-auto})"
PYTHON="${PY}" bash scripts/build_extension.sh

# Register the package (and the moe-fast command) editable, pointing at this tree. Skipped when
# it already does; --no-build-isolation: compile against the torch above, not a freshly fetched one.
here="$(pwd -P)"
registered="$(cd / && "${PY}" -c "import importlib.metadata as m, json; print(json.loads(m.distribution('moe_fast').read_text('direct_url.json'))['url'])" 2>/dev/null || true)"
if [[ "${registered}" == "file://${here}" ]]; then
  say "moe_fast is already installed in editable mode from ${here}"
else
  say "installing moe_fast in editable mode from ${here} (reuses the build above)"
  "${PIP[@]}" --no-build-isolation --no-deps -e .
fi
"${PY}" -c "import moe_fast, torch; print(f'[install] moe_fast {moe_fast.__version__} built against torch {torch.__version__}, CUDA kernels: {moe_fast.kernels.extension.HAS_CUDA_KERNELS}')"
say "done"
