#!/bin/bash
# Issue 16 item 4 in one GPU call (about 400 s on one H200, cold): the memory-related GPU tests, the MoE layer's
# memory at the peak per allocation site, and the Megatron-LM DeepSeek-V2-Lite proxy (max allocated) for BF16,
# FP8-Flow and FP8-Flow with --disable-parameter-transpose-cache. From the project root on the GPU machine:
#   source .gpu-bundle/setup.sh && bash scripts/gpu_memory_check.sh
# needs .gpu-bundle (../shared/gpu/make_bundle.sh) and, for the Megatron-LM rows, .mlm (../shared/megatron-lm/
# make_slice.sh); without .mlm those rows are skipped. Knobs: MEMCHECK_SKIP="tests,layer,mlm" (any of them),
# MEMCHECK_BUDGET_S (default 540: the Megatron-LM runs get what the earlier parts left).
# Logs under $OUT (default /tmp/memcheck): pytest.log, bench_mem.log, mlm_{bf16,fp8flow,flag}/ (run_mlm.sh's logs);
# a summary is printed last.
set -u -o pipefail
ROOT=$(pwd)
[[ -f "$ROOT/setup.py" && -d "$ROOT/fp8flow_megatron" ]] || { echo "run me from the project root"; exit 2; }
OUT=${OUT:-/tmp/memcheck}
mkdir -p "$OUT"
SKIP=${MEMCHECK_SKIP:-}
BUDGET=${MEMCHECK_BUDGET_S:-540}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/fp8flow_torch_ext} PYTHONUNBUFFERED=1
T0=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - T0))); }
skip() { [[ ",$SKIP," == *,$1,* ]]; }
SUMMARY=()

if ! skip tests; then
  timeout 150 python -m pytest -m gpu -q -p no:cacheprovider tests/ops/test_experts.py \
    tests/ops/test_gpu_cuda_graph_layer.py > "$OUT/pytest.log" 2>&1
  SUMMARY+=("gpu tests (rc $?): $(tail -1 "$OUT/pytest.log")")
fi
if ! skip layer; then
  timeout 170 python scripts/bench_moe_layer.py --variants bf16,fp8flow_triton,fp8flow_transient_wt_triton --iters 10 \
    --memory-snapshot /tmp/memcheck_snaps --memory-snapshot-top 20 > "$OUT/bench_mem.log" 2>&1
  SUMMARY+=("layer bench (rc $?): $OUT/bench_mem.log")
fi
if ! skip mlm; then
  if [[ -f .mlm/run_mlm.sh ]]; then
    for run in bf16:route1_bf16: fp8flow:route1_fp8flow: flag:route1_fp8flow:--disable-parameter-transpose-cache; do
      IFS=: read -r tag name extra <<<"$run"
      t=$(($(left) / 3))
      [[ $tag == fp8flow ]] && t=$(($(left) / 2))
      [[ $tag == flag ]] && t=$(left)
      if ((t < 60)); then SUMMARY+=("mlm $tag: skipped (budget)"); continue; fi
      OUT=$OUT/mlm_$tag MLM_ONLY=$name MLM_BUDGET_S=$t MLM_EXTRA_ARGS="$extra" bash .mlm/run_mlm.sh \
        > "$OUT/mlm_$tag.txt" 2>&1
      mem=$(grep -h 'memory (MB)' "$OUT/mlm_$tag/mlm_$name.log" 2>/dev/null | tail -1 \
        | sed -nE 's/.*\| allocated: ([0-9.]+) \| max allocated: ([0-9.]+).*/resting \1 MB, max \2 MB/p')
      ms=$(sed -nE "s/^$name +[0-9]+ +[0-9/]+ +([0-9.]+) .*/\1/p" "$OUT/mlm_$tag/mlm_summary.txt" 2>/dev/null)
      SUMMARY+=("mlm $tag${extra:+ ($extra)}: ${mem:-no memory line} | last ms/iter ${ms:--}")
    done
  else
    SUMMARY+=("mlm: skipped (no .mlm; make it with ../shared/megatron-lm/make_slice.sh)")
  fi
fi

echo
echo "== gpu_memory_check ($(($(date +%s) - T0)) s)"
[[ -f "$OUT/bench_mem.log" ]] && sed -n '/^| variant/,/^$/p' "$OUT/bench_mem.log" | cut -d'|' -f1-7
printf '%s\n' "${SUMMARY[@]}"
