#!/usr/bin/env bash
# Builds moe_fast._C in place (moe_fast/_C*.so), recompiling only what changed, and prints one
# line per compiled file instead of the compiler command lines.
#   bash scripts/build_extension.sh [--strict] [--log FILE]     (run from any folder)
# PYTHON picks the interpreter (its torch is the one compiled against); MOE_FAST_CUDA,
# TORCH_CUDA_ARCH_LIST and MAX_JOBS are passed on to setup.py.
# --strict: also fail on any compiler warning located in this project's own files (csrc/),
# while warnings inside torch's or CUDA's headers are only counted.
# The whole compiler output goes to --log (default build/build_ext.log).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
PY="${PYTHON:-python}"
STRICT=0
LOG="${ROOT}/build/build_ext.log"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --strict) STRICT=1 ;;
    --log) LOG="$2"; shift ;;
    *) echo "build_extension: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$(dirname "${LOG}")"
cd "${ROOT}"

# Progress: "[3/7] c++ ... -c .../csrc/cpu/route.cpp -o ..." becomes "  [3/7] csrc/cpu/route.cpp".
progress() {
  awk -v root="${ROOT}/" '
    /^\[[0-9]+\/[0-9]+\] / {
      src = ""
      for (i = 2; i <= NF; i++) if ($i ~ /\.(cpp|cu)$/ && $(i - 1) == "-c") src = $i
      sub(root, "", src)
      if (src != "") { print "  " $1 " " src; n++ }
      fflush()
    }
    /^(g|c)\+\+ .*-shared / { print "  linking moe_fast/_C"; n++; fflush() }
    END { if (n == 0) print "  up to date: nothing recompiled or relinked" }
  '
}

t0=${SECONDS}
if ! "${PY}" setup.py build_ext --inplace 2>&1 | tee "${LOG}" | progress; then
  echo "build_extension: FAILED; the last lines of ${LOG}:" >&2
  grep -E "error|Error" "${LOG}" | head -20 >&2 || true
  tail -20 "${LOG}" >&2
  exit 1
fi

# Warnings: gcc prints "FILE:LINE:COL: warning:", nvcc "FILE(LINE): warning #N-D:" and
# "nvcc warning : ..." for its own options (ours).
warnings="$(grep -E "^[^ ].*([:(][0-9]+[):]).* warning|^nvcc warning" "${LOG}" | sort -u || true)"
own="$(grep -E "^(${ROOT}/)?csrc/|^nvcc warning" <<< "${warnings}" || true)"
n_all=$(grep -c . <<< "${warnings}" || true)
n_own=$(grep -c . <<< "${own}" || true)
echo "build_extension: done in $((SECONDS - t0))s; compiler warnings: ${n_own} in csrc/, $((n_all - n_own)) in torch's or CUDA's headers (log: ${LOG})"
if [[ ${n_own} -gt 0 ]]; then
  echo "${own}"
  if [[ ${STRICT} -eq 1 ]]; then
    echo "build_extension: FAILED (--strict): warnings in this project's files" >&2
    exit 1
  fi
fi
