#!/usr/bin/env bash
# One-shot GPU check, sized for a 15-minute GPU lease that includes the machine's start (a minute
# or two) and the transfers: the whole script stays inside GPU_CHECK_BUDGET_S (default 480 s).
#   1. build the CUDA extension in place for this GPU's architecture only, on all cores
#      (no pip, no network: the machine has torch, setuptools and ninja but no internet);
#   2. the tests that run on CUDA (tests/kernels/test_cuda_ops.py and the op tests' cuda cases);
#   3. benchmarks/bench_gpu.py, the GPU table, in whatever time is left;
#   4. benchmarks/bench_vllm.py (skipping inside vLLM) when vllm imports, else one line.
# Each step has its own time limit, cut to what is left of the budget, and a log in $OUT (or a
# temporary folder): summary.txt (the machine, the versions, one line per step), build.log,
# tests.log, bench.log, and bench_gpu.py's gpu_table.md / gpu_results.json.
# Usage (repo root): bash benchmarks/gpu_check.sh [--quick]      (PYTHON=python3 by default)
# Give the device call a limit of at least GPU_CHECK_BUDGET_S + 60 s (540 s by default).
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd -P)"
OUTDIR="${OUT:-$(mktemp -d)}"
mkdir -p "${OUTDIR}"
QUICK="${1:-}"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
START=${SECONDS}
status=0

step() {  # step NAME LIMIT_S CMD...: runs CMD with min(LIMIT_S, what is left), logs to $OUTDIR/NAME.log
  local name="$1" limit="$2"
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if [[ ${left} -lt 20 ]]; then
    echo "== ${name}: SKIPPED, only ${left}s of the ${BUDGET}s budget left" | tee -a "${OUTDIR}/summary.txt"
    status=1
    return 1
  fi
  if [[ ${left} -lt ${limit} ]]; then limit=${left}; fi
  local t0=${SECONDS}
  echo "== ${name} (limit ${limit}s, $((SECONDS - START))s into the check)"
  timeout --kill-after=10 "${limit}" "$@" > >(tee "${OUTDIR}/${name}.log") 2>&1
  local rc=$?
  local note=""
  if [[ ${rc} -eq 124 || ${rc} -eq 137 ]]; then note=" (time limit)"; fi
  echo "== ${name}: rc=${rc}${note} in $((SECONDS - t0))s" | tee -a "${OUTDIR}/summary.txt"
  [[ ${rc} -eq 0 ]] || status=1
  return ${rc}
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
  "${PY}" -c "import torch, transformers; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available(), '| transformers', transformers.__version__)"
  nvcc --version 2>/dev/null | tail -1 || echo "nvcc not on PATH"
} 2>&1 | tee "${OUTDIR}/summary.txt"
if ! "${PY}" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: FAILED (torch sees no GPU)" | tee -a "${OUTDIR}/summary.txt"
  exit 1
fi

# 1. Build: the local architecture only (one code object per .cu instead of two), all cores.
export MOE_FAST_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" PYTHON="${PY}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$("${PY}" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then export CUDA_HOME=/usr/local/cuda; fi
export PYTHONPATH="${ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
if ! step build 240 bash scripts/build_extension.sh; then
  echo "gpu_check: build failed; see ${OUTDIR}/build.log"
  exit 1
fi
if ! "${PY}" -c "import moe_fast; assert moe_fast.kernels.extension.HAS_CUDA_KERNELS, 'no CUDA kernels registered'"; then
  echo "gpu_check: FAILED (the extension has no CUDA kernels)" | tee -a "${OUTDIR}/summary.txt"
  exit 1
fi

# 2. The tests that run on the GPU (the `device` fixture adds cuda cases when a GPU is present).
step tests 150 "${PY}" -m pytest -q -rs -p no:cacheprovider --maxfail=10 \
  tests/kernels/test_cuda_ops.py tests/kernels/test_route.py tests/kernels/test_subset_loss.py tests/kernels/test_subset_loss_spec.py

# 3. The table, in the time that is left (minus a margin for writing the summary).
BUDGET=$((BUDGET - 10)) step bench 400 "${PY}" benchmarks/bench_gpu.py ${QUICK}

# 4. Skipping inside vLLM (benchmarks/bench_vllm.py), only where vLLM is importable: nothing is installed here.
if "${PY}" -c "import vllm" >/dev/null 2>&1; then
  step bench_vllm 300 "${PY}" benchmarks/bench_vllm.py ${QUICK} --json "${OUTDIR}/bench_vllm.json"
else
  echo "== bench_vllm: skipped, vllm is not importable here (nothing installed)" | tee -a "${OUTDIR}/summary.txt"
fi

echo "gpu_check: $([[ ${status} -eq 0 ]] && echo OK || echo FAILED) in $((SECONDS - START))s; outputs in ${OUTDIR}" | tee -a "${OUTDIR}/summary.txt"
cat "${OUTDIR}/summary.txt"
exit ${status}
