#!/bin/bash
# The GPU test suite under megatron-core 0.16.1 and 0.19.2, one command, on the GPU machine (from the project root):
#   bash scripts/gpu_suite_both_mcore.sh .gpu-bundle .gpu-bundle-mcore0.19.2      # both, one after the other
#   GPU_SUITE_ONLY=0161 bash scripts/gpu_suite_both_mcore.sh .gpu-bundle .gpu-bundle-mcore0.19.2   # one per call
#   GPU_SUITE_ONLY=0192 bash scripts/gpu_suite_both_mcore.sh .gpu-bundle .gpu-bundle-mcore0.19.2
# BUNDLE_0161: the main bundle (../shared/gpu/make_bundle.sh: TE 2.20.2 + megatron-core 0.16.1; its setup.sh reads
# $(pwd)/.gpu-bundle, so it must be .gpu-bundle at the project root). BUNDLE_0192: scripts/make_mcore_bundle.sh 0.19.2
# (the megatron-core 0.19.2 wheel; its setup.sh swaps it into /tmp/site and sets FP8FLOW_ALLOW_PORTED_MCORE=1).
# Knobs: GPU_SUITE_PYTEST_ARGS (default "-m gpu tests -q"), GPU_SUITE_TIMEOUT_S (pytest's limit per version, default
# 500, so that setup + suite fit one 600 s GPU call).
# Logs: $OUT/gpu_suite_<0161|0192>.log (OUT defaults to /tmp/gpu_suite); a summary table is printed last.
set -u -o pipefail
B0161=${1:?usage: gpu_suite_both_mcore.sh BUNDLE_0161 BUNDLE_0192}
B0192=${2:?usage: gpu_suite_both_mcore.sh BUNDLE_0161 BUNDLE_0192}
ROOT=$(pwd)
[[ -f "$ROOT/setup.py" && -d "$ROOT/fp8flow_megatron" ]] || { echo "run me from the project root"; exit 2; }
[[ "$(cd "$B0161" 2>/dev/null && pwd -P)" == "$(cd "$ROOT/.gpu-bundle" 2>/dev/null && pwd -P)" ]] \
  || { echo "BUNDLE_0161 must be $ROOT/.gpu-bundle (its setup.sh reads \$(pwd)/.gpu-bundle)"; exit 2; }
[[ -f "$B0161/setup.sh" && -f "$B0192/setup.sh" ]] || { echo "each bundle needs a setup.sh"; exit 2; }
ONLY=${GPU_SUITE_ONLY:-0161,0192}
ARGS=${GPU_SUITE_PYTEST_ARGS:--m gpu tests -q}
LIMIT=${GPU_SUITE_TIMEOUT_S:-500}
OUT=${OUT:-/tmp/gpu_suite}
mkdir -p "$OUT"
declare -A RC SUMMARY WANT=([0161]=0.16.1 [0192]=0.19.2)

run_suite() {  # 0161 | 0192
  local tag=$1 log=$OUT/gpu_suite_$1.log
  (
    rm -rf /tmp/site/megatron /tmp/site/megatron_core-*.dist-info   # the other megatron-core of an earlier run
    source "$B0161/setup.sh"
    [[ $tag == 0192 ]] && source "$B0192/setup.sh"
    got=$(python3 -c 'import megatron.core; print(megatron.core.__version__.split("+")[0])' 2>/dev/null | tail -1)
    echo "== megatron-core $got (want ${WANT[$tag]}), FP8FLOW_ALLOW_PORTED_MCORE=${FP8FLOW_ALLOW_PORTED_MCORE:-}"
    [[ "$got" == "${WANT[$tag]}" ]] || { echo "FATAL: megatron-core $got is installed, not ${WANT[$tag]}"; exit 3; }
    # shellcheck disable=SC2086
    timeout -k 15 "$LIMIT" python3 -m pytest $ARGS -p no:cacheprovider
  ) >"$log" 2>&1
  RC[$tag]=$?
  SUMMARY[$tag]=$(grep -E '(passed|failed|error|skipped|no tests ran)' "$log" | tail -1)
  [[ ${RC[$tag]} == 124 || ${RC[$tag]} == 137 ]] && SUMMARY[$tag]="TIMEOUT after ${LIMIT}s; ${SUMMARY[$tag]}"
  tail -25 "$log"
}

for tag in 0161 0192; do
  [[ ",$ONLY," == *,$tag,* ]] && run_suite "$tag"
done
echo
echo "== GPU suite (pytest $ARGS) per megatron-core"
status=0
for tag in 0161 0192; do
  [[ ",$ONLY," == *,$tag,* ]] || continue
  printf '%-8s exit %-4s %s\n' "${WANT[$tag]}" "${RC[$tag]}" "${SUMMARY[$tag]:-}"
  [[ ${RC[$tag]} == 0 ]] || status=1
done
exit $status
