#!/usr/bin/env bash
# Installs moe_fast as a user does without scripts/install.sh, and runs the demo from elsewhere:
#   1. a fresh virtual environment with torch 2.13.0 (the CPU wheel: never a CUDA build) and the
#      build tools that `--no-build-isolation` expects (setuptools, wheel, ninja);
#   2. `pip install --no-build-isolation '.[demo]'`: a regular (not editable) install that compiles
#      the extension into the installed package and resolves the declared dependencies;
#   3. `moe-fast demo --quick` in an empty folder outside the tree, so that a missing dependency,
#      package file or compiled module shows here rather than on a user's machine.
# The environment and the build are thrown away afterwards. Usage: bash scripts/check_user_install.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
BASE_PY="${PYTHON:-python3}"
START=${SECONDS}
say() { echo "[check_user_install $((SECONDS - START))s] $*"; }

WORK="$(mktemp -d)"
trap 'rm -rf "${WORK}"' EXIT
VPY="${WORK}/venv/bin/python"
say "1/3 fresh venv in ${WORK}/venv with torch 2.13.0 and the build tools"
"${BASE_PY}" -m venv "${WORK}/venv"
PIP=("${VPY}" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "torch==2.13.0" "setuptools>=64" wheel ninja
# A copy of the tracked and untracked (not ignored) files: no build folder or in-place extension of
# this checkout can leak into the install.
mkdir "${WORK}/src"
(cd "${ROOT}" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "${WORK}/src")

say "2/3 pip install --no-build-isolation '.[demo]' (compiles the extension)"
(cd "${WORK}/src" && MOE_FAST_CUDA=0 "${PIP[@]}" --no-build-isolation ".[demo]")
torch_after="$("${VPY}" -c 'import torch; print(torch.__version__)')"
[[ "${torch_after}" == "2.13.0"* && "${torch_after}" != *cu* ]] || { echo "check_user_install: FAILED (torch became ${torch_after})"; exit 1; }

say "3/3 moe-fast demo --quick from an empty folder"
mkdir "${WORK}/elsewhere"
(cd "${WORK}/elsewhere" && "${WORK}/venv/bin/moe-fast" demo --quick --out quick_report --no-progress > demo.log 2>&1) \
  || { tail -20 "${WORK}/elsewhere/demo.log"; echo "check_user_install: FAILED (the demo)"; exit 1; }
for f in report.md report.json perplexity_vs_experts.png; do
  [[ -s "${WORK}/elsewhere/quick_report/${f}" ]] || { echo "check_user_install: FAILED (no ${f})"; exit 1; }
done
installed_at="$(cd "${WORK}/elsewhere" && "${VPY}" -c 'import moe_fast, os; print(os.path.dirname(moe_fast.__file__))')"
[[ "${installed_at}" == "${WORK}/venv/"* ]] || { echo "check_user_install: FAILED (moe_fast imported from ${installed_at})"; exit 1; }
say "passed: installed in ${installed_at}, demo --quick wrote its report"
