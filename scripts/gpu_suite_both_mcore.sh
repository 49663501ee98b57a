#!/bin/bash
# The GPU test suite under megatron-core 0.16.1 and 0.19.2, one command, on the GPU machine (from the project root):
#   bash scripts/gpu_suite_both_mcore.sh .gpu-bundle .gpu-bundle-mcore0.19.2      # both, one after the other
#   GPU_SUITE_PARALLEL=1 bash scripts/gpu_suite_both_mcore.sh .gpu-bundle .gpu-bundle-mcore0.19.2   # side by side
#   GPU_SUITE_ONLY=0161 bash scripts/gpu_suite_both_mcore.sh .gpu-bundle .gpu-bundle-mcore0.19.2   # one per call
# BUNDLE_0161: the main bundle (../shared/gpu/make_bundle.sh: TE 2.20.2 + megatron-core 0.16.1; its setup.sh reads
# $(pwd)/.gpu-bundle, so it must be .gpu-bundle at the project root). BUNDLE_0192: scripts/make_mcore_bundle.sh 0.19.2
# (the megatron-core 0.19.2 wheel; its setup.sh swaps it into $MCORE_SITE, default /tmp/site, and sets
# FP8FLOW_ALLOW_PORTED_MCORE=1).
# Knobs: GPU_SUITE_PYTEST_ARGS (default "-m gpu -q"), GPU_SUITE_SHARDS (';'-separated pytest path sets, one pytest
# process each; default "tests"), GPU_SUITE_TIMEOUT_S (each pytest's limit, default 500, so that setup + suite fit
# one 600 s GPU call), GPU_SUITE_PARALLEL=1 (every shard of every version at once: 0.19.2 gets its own copy of
# /tmp/site, /tmp/site0192; the Triton cache and the CUDA extension are shared; the tests assert no timings, so
# sharing the GPU changes only how long they take).
# Logs: $OUT/gpu_suite_<0161|0192>[_<shard>].log (OUT defaults to /tmp/gpu_suite); a summary table is printed last.
set -u -o pipefail
B0161=${1:?usage: gpu_suite_both_mcore.sh BUNDLE_0161 BUNDLE_0192}
B0192=${2:?usage: gpu_suite_both_mcore.sh BUNDLE_0161 BUNDLE_0192}
ROOT=$(pwd)
[[ -f "$ROOT/setup.py" && -d "$ROOT/fp8flow_megatron" ]] || { echo "run me from the project root"; exit 2; }
[[ "$(cd "$B0161" 2>/dev/null && pwd -P)" == "$(cd "$ROOT/.gpu-bundle" 2>/dev/null && pwd -P)" ]] \
  || { echo "BUNDLE_0161 must be $ROOT/.gpu-bundle (its setup.sh reads \$(pwd)/.gpu-bundle)"; exit 2; }
[[ -f "$B0161/setup.sh" && -f "$B0192/setup.sh" ]] || { echo "each bundle needs a setup.sh"; exit 2; }
ONLY=${GPU_SUITE_ONLY:-0161,0192}
ARGS=${GPU_SUITE_PYTEST_ARGS:--m gpu -q}
LIMIT=${GPU_SUITE_TIMEOUT_S:-500}
PARALLEL=${GPU_SUITE_PARALLEL:-0}
IFS=';' read -r -a SHARDS <<<"${GPU_SUITE_SHARDS:-tests}"
OUT=${OUT:-/tmp/gpu_suite}
mkdir -p "$OUT"
declare -A RC SUMMARY WANT=([0161]=0.16.1 [0192]=0.19.2)
SITE0192=/tmp/site0192
T0=$(date +%s)

# environment of one version, in the calling (sub)shell
enter_version() {  # 0161 | 0192
  if [[ $PARALLEL == 1 ]]; then
    # the shared install was done once (below); 0.19.2 reads its own copy of the site
    export PYTHONPATH=/tmp/site:$ROOT${BASE_PYTHONPATH:+:$BASE_PYTHONPATH}
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    if [[ $1 == 0192 ]]; then
      export PYTHONPATH=$SITE0192:$ROOT${BASE_PYTHONPATH:+:$BASE_PYTHONPATH} FP8FLOW_ALLOW_PORTED_MCORE=1
    fi
  else
    rm -rf /tmp/site/megatron /tmp/site/megatron_core-*.dist-info   # the other megatron-core of an earlier run
    source "$B0161/setup.sh"
    [[ $1 == 0192 ]] && source "$B0192/setup.sh"
  fi
}

run_shard() {  # tag shard-index
  local tag=$1 i=$2 shard=${SHARDS[$2]} log
  log=$OUT/gpu_suite_$tag.log
  ((${#SHARDS[@]} > 1)) && log=$OUT/gpu_suite_${tag}_$i.log
  (
    enter_version "$tag"
    got=$(python3 -c 'import megatron.core; print(megatron.core.__version__.split("+")[0])' 2>/dev/null | tail -1)
    echo "== megatron-core $got (want ${WANT[$tag]}), FP8FLOW_ALLOW_PORTED_MCORE=${FP8FLOW_ALLOW_PORTED_MCORE:-}, shard: $shard"
    [[ "$got" == "${WANT[$tag]}" ]] || { echo "FATAL: megatron-core $got is installed, not ${WANT[$tag]}"; exit 3; }
    # shellcheck disable=SC2086
    timeout -k 15 "$LIMIT" python3 -m pytest $ARGS $shard -p no:cacheprovider
  ) >"$log" 2>&1
  echo $? >"$log.rc"
}

if [[ $PARALLEL == 1 ]]; then
  BASE_PYTHONPATH=${PYTHONPATH:-}
  rm -rf /tmp/site/megatron /tmp/site/megatron_core-*.dist-info
  source "$B0161/setup.sh"
  if [[ ",$ONLY," == *,0192,* ]]; then
    rm -rf "$SITE0192" && cp -a /tmp/site "$SITE0192"
    PYTHONPATH=$SITE0192:$ROOT MCORE_SITE=$SITE0192 source "$B0192/setup.sh"
  fi
  # the plugin's CUDA extension, built once before the shards race for it
  python3 -c 'from fp8flow_megatron.kernels._extension import cuda_extension as c; print("fp8flow CUDA extension:", c().__file__)' 2>&1 | tail -1
  echo "== setup done after $(($(date +%s) - T0)) s; ${#SHARDS[@]} shard(s) per version, side by side"
fi

for tag in 0161 0192; do
  [[ ",$ONLY," == *,$tag,* ]] || continue
  for i in "${!SHARDS[@]}"; do
    if [[ $PARALLEL == 1 ]]; then run_shard "$tag" "$i" & else run_shard "$tag" "$i"; fi
  done
done
wait

echo
echo "== GPU suite (pytest $ARGS) per megatron-core, $(($(date +%s) - T0)) s in all"
status=0
for tag in 0161 0192; do
  [[ ",$ONLY," == *,$tag,* ]] || continue
  for i in "${!SHARDS[@]}"; do
    log=$OUT/gpu_suite_$tag.log
    ((${#SHARDS[@]} > 1)) && log=$OUT/gpu_suite_${tag}_$i.log
    rc=$(cat "$log.rc" 2>/dev/null || echo '?')
    summary=$(grep -E '(passed|failed|error|skipped|no tests ran)' "$log" | tail -1)
    [[ $rc == 124 || $rc == 137 ]] && summary="TIMEOUT after ${LIMIT}s; $summary"
    printf '%-8s exit %-4s %-40s %s\n' "${WANT[$tag]}" "$rc" "${SHARDS[$i]:0:40}" "$summary"
    [[ $rc == 0 ]] || { status=1; grep -E '^(FAILED|ERROR) ' "$log" | head -20 | sed 's/^/    /'; }
  done
done
exit $status
