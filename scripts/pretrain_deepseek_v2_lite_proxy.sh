#!/usr/bin/env bash
# DeepSeek-V2-Lite proxy (4 layers, full layer shapes, configs/deepseek_v2_lite_proxy.yaml) on one 80 GB GPU.
#   scripts/pretrain_deepseek_v2_lite_proxy.sh [--data-path /data/dsv2_text_document] [--no-moe-fp8-flow]
# GPUS_PER_NODE defaults to 1 here; more GPUs on the node run data-parallel copies (or pass
# --expert-model-parallel-size N). Environment and argument handling: scripts/torchrun_train.sh.
export GPUS_PER_NODE=${GPUS_PER_NODE:-1}
root=$(cd "$(dirname "$0")/.." && pwd)
exec "$root/scripts/torchrun_train.sh" "$root/configs/deepseek_v2_lite_proxy.yaml" "$@"
