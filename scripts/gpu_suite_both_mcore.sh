#!/bin/bash
# The GPU test suite under megatron-core 0.16.1 and 0.19.2, one command, on the GPU machine (from the project root):
#   bash scripts/gpu_suite_both_mcore.sh .gpu-bundle .gpu-bundle-mcore0.19.2      # both, one after the other
#   GPU_SUITE_ONLY=0161 bash scripts/gpu_suite_both_mcore.sh .gpu-bundle .gpu-bundle-mcore0.19.2   # one per call
# BUNDLE_0161: the main bundle (../shared/gpu/make_bundle.sh: TE 2.20.2 + megatron-core 0.16.1; its setup.sh reads
# $(pwd)/.gpu-bundle, so it must be .gpu-bundle at the project root). BUNDLE_0192: scripts/make_mcore_bundle.sh 0.19.2
# (the megatron-core 0.19.2 wheel; its setup.sh swaps it into /tmp/site).
# Knobs: GPU_SUITE_PYTEST_ARGS (default "-m gpu -q"), GPU_SUITE_SHARDS (';'-separated pytest path sets, one pytest
# process each, one after the other; default "tests"), GPU_SUITE_TIMEOUT_S (each pytest's limit, default 500, so that
# setup + one shard fit one 600 s GPU call). A whole suite takes longer than one call: pick a version with
# GPU_SUITE_ONLY and a shard set per call. (Running the shards of both versions at once on one H200 was slower than
# one after the other: six pytest processes, the kernel shard ran past 470 s.)
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
IFS=';' read -r -a SHARDS <<<"${GPU_SUITE_SHARDS:-tests}"
OUT=${OUT:-/tmp/gpu_suite}
mkdir -p "$OUT"
declare -A WANT=([0161]=0.16.1 [0192]=0.19.2)
T0=$(date +%s)

shard_log() { ((${#SHARDS[@]} > 1)) && echo "$OUT/gpu_suite_$1_$2.log" || echo "$OUT/gpu_suite_$1.log"; }

run_version() {  # 0161 | 0192: install once (in a subshell, so the versions do not mix), then every shard
  local tag=$1 i log
  (
    rm -rf /tmp/site/megatron /tmp/site/megatron_core-*.dist-info   # the other megatron-core of an earlier run
    source "$B0161/setup.sh"
    [[ $tag == 0192 ]] && source "$B0192/setup.sh"
    got=$(python3 -c 'import megatron.core; print(megatron.core.__version__.split("+")[0])' 2>/dev/null | tail -1)
    for i in "${!SHARDS[@]}"; do
      log=$(shard_log "$tag" "$i")
      {
        echo "== megatron-core $got (want ${WANT[$tag]}), shard: ${SHARDS[$i]}"
        if [[ "$got" != "${WANT[$tag]}" ]]; then
          echo "FATAL: megatron-core $got is installed, not ${WANT[$tag]}"
          false
        else
          # shellcheck disable=SC2086
          timeout -k 15 "$LIMIT" python3 -m pytest $ARGS ${SHARDS[$i]} -p no:cacheprovider
        fi
      } >"$log" 2>&1
      echo $? >"$log.rc"
    done
  )
}

for tag in 0161 0192; do
  [[ ",$ONLY," == *,$tag,* ]] && run_version "$tag"
done

echo
echo "== GPU suite (pytest $ARGS) per megatron-core, $(($(date +%s) - T0)) s in all"
status=0
for tag in 0161 0192; do
  [[ ",$ONLY," == *,$tag,* ]] || continue
  for i in "${!SHARDS[@]}"; do
    log=$(shard_log "$tag" "$i")
    rc=$(cat "$log.rc" 2>/dev/null || echo '?')
    summary=$(grep -E '(passed|failed|error|skipped|no tests ran|FATAL)' "$log" | tail -1)
    [[ $rc == 124 || $rc == 137 ]] && summary="TIMEOUT after ${LIMIT}s; $summary"
    printf '%-8s exit %-4s %-40s %s\n' "${WANT[$tag]}" "$rc" "${SHARDS[$i]:0:40}" "$summary"
    [[ $rc == 0 ]] || { status=1; grep -E '^(FAILED|ERROR) ' "$log" | head -20 | sed 's/^/    /'; }
  done
done
exit $status
