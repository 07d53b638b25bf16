#!/usr/bin/env bash
# Reruns the tests marked `numerics` under every CPU instruction level this machine supports, so
# that a test which holds only with this CPU's vector instructions fails here too.
#   bash scripts/numerics_reruns.sh [pytest args]      (PYTHON picks the interpreter)
# PyTorch picks its own CPU kernels by ATEN_CPU_CAPABILITY; oneDNN, which runs its bf16 matmuls,
# by ONEDNN_MAX_CPU_ISA (below AVX-512 PyTorch then leaves bf16 matmuls to its own kernels, as on
# a CPU without AVX-512). Levels, each only where /proc/cpuinfo has its instructions:
#   default: ATEN_CPU_CAPABILITY=default, ONEDNN_MAX_CPU_ISA=SSE41
#   avx2:    ATEN_CPU_CAPABILITY=avx2,    ONEDNN_MAX_CPU_ISA=AVX2
#   avx512:  ATEN_CPU_CAPABILITY=avx512,  ONEDNN_MAX_CPU_ISA=AVX512_CORE (AVX-512 without its bf16 extension)
# The main pytest run covers the machine's own full level. One summary line per level; the exit
# status is 1 if any level failed. No test marked `numerics` (pytest's exit 5) counts as a pass.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python}"

flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
has() { for f in "$@"; do [[ "${flags}" == *" $f "* ]] || return 1; done; }
levels=(default)
# The same tests ATen makes before it uses each level (aten/src/ATen/native/DispatchStub.cpp).
if has avx2 fma; then levels+=(avx2); fi
if has avx512f avx512vl avx512bw avx512dq fma; then levels+=(avx512); fi
declare -A ONEDNN_ISA=([default]=SSE41 [avx2]=AVX2 [avx512]=AVX512_CORE)

LOGDIR="$(mktemp -d)"
trap 'rm -rf "${LOGDIR}"' EXIT
failed=()
summary=()
for level in "${levels[@]}"; do
  t0=${SECONDS}
  log="${LOGDIR}/${level}.log"
  ATEN_CPU_CAPABILITY="${level}" ONEDNN_MAX_CPU_ISA="${ONEDNN_ISA[${level}]}" \
    "${PY}" -m pytest -q -ra -p no:cacheprovider -m numerics tests "$@" > "${log}" 2>&1
  rc=$?
  # What PyTorch actually used, read under the same environment (proves the variable took effect).
  used="$(ATEN_CPU_CAPABILITY="${level}" "${PY}" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())' 2>/dev/null || echo '?')"
  result="$(grep -E "(passed|failed|error|no tests ran|deselected)" "${log}" | tail -1 | sed -e 's/=//g' -e 's/^ *//;s/ *$//')"
  case ${rc} in
    0) status=OK ;;
    5) status=OK; result="no test is marked numerics (${result:-nothing collected})" ;;
    *) status=FAILED; failed+=("${level}") ;;
  esac
  line="numerics @ ${level}: ${status} (ATEN_CPU_CAPABILITY=${level} -> ${used}, ONEDNN_MAX_CPU_ISA=${ONEDNN_ISA[${level}]}) ${result} [$((SECONDS - t0))s]"
  summary+=("${line}")
  echo "${line}"
  if [[ "${status}" == FAILED ]]; then
    if grep -q "= FAILURES =" "${log}"; then sed -n '/= FAILURES =/,$p' "${log}" | tail -60; else tail -30 "${log}"; fi
  fi
done

echo "numerics reruns: ${#levels[@]} levels (${levels[*]}), $((${#levels[@]} - ${#failed[@]})) OK${failed:+, FAILED: ${failed[*]}}"
[[ ${#failed[@]} -eq 0 ]]
