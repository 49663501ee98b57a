#!/usr/bin/env bash
# DeepSeek-V2-Lite (16B, configs/deepseek_v2_lite.yaml) with FP8-Flow-MoE: 8 GPUs per node, experts over 8 ranks.
#   scripts/pretrain_deepseek_v2_lite.sh --data-path /data/dsv2_text_document --save ckpt/dsv2-lite
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 scripts/pretrain_deepseek_v2_lite.sh ...   (and NODE_RANK=1 on node1)
# Without --data-path it trains on the embedded byte-level corpus (a smoke run). FP8 baseline: add --no-moe-fp8-flow.
# Environment and argument handling: scripts/torchrun_train.sh.
root=$(cd "$(dirname "$0")/.." && pwd)
exec "$root/scripts/torchrun_train.sh" "$root/configs/deepseek_v2_lite.yaml" "$@"
