#!/usr/bin/env bash
# One-shot GPU check (H200 class machine, no network, < 8 minutes): build the CUDA extension,
# run the CUDA and op tests, then benchmarks/bench_gpu.py. Writes logs and the table to $OUT when set.
# Usage (repo root): bash benchmarks/gpu_check.sh [--quick]
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUTDIR="${OUT:-$(mktemp -d)}"
mkdir -p "${OUTDIR}"
QUICK="${1:-}"
status=0
step() {  # step NAME TIMEOUT_S CMD...: runs CMD with a time limit, logs to $OUTDIR/NAME.log
  local name="$1" limit="$2"
  shift 2
  local t0=$SECONDS
  echo "== ${name} (limit ${limit}s)"
  timeout --kill-after=10 "${limit}" "$@" > >(tee "${OUTDIR}/${name}.log") 2>&1
  local rc=$?
  echo "== ${name}: rc=${rc} in $((SECONDS - t0))s" | tee -a "${OUTDIR}/summary.txt"
  [[ ${rc} -eq 0 ]] || status=1
  return ${rc}
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "${OUTDIR}/gpu.txt" 2>&1 || true
python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())" | tee -a "${OUTDIR}/gpu.txt"

# Build: only the local architecture, all cores, no dependency resolution (no network).
export MOE_FAST_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(python -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
if ! step build 200 pip install --no-build-isolation --no-deps -e .; then
  echo "gpu_check: build failed; see ${OUTDIR}/build.log"
  exit 1
fi
python -c "import moe_fast; assert moe_fast._extension.HAS_CUDA_KERNELS, 'no CUDA kernels registered'" || exit 1

step tests 140 python -m pytest -x -q -rs tests/test_cuda_ops.py tests/test_route.py tests/test_subset_loss.py
step bench 140 python benchmarks/bench_gpu.py ${QUICK}

echo "gpu_check: $([[ ${status} -eq 0 ]] && echo OK || echo FAILED); outputs in ${OUTDIR}"
cat "${OUTDIR}/summary.txt"
exit ${status}
