#!/usr/bin/env bash
# Launch the trainer with torchrun on one node or several: scripts/torchrun_train.sh CONFIG.yaml [TRAINER ARGS...]
# Paths (CONFIG, --data-path, --save, ...) are relative to the current directory.
#
# Environment (the usual torchrun / Megatron names; defaults in brackets):
#   GPUS_PER_NODE [8]  NNODES [1]  NODE_RANK [0]  MASTER_ADDR [localhost]  MASTER_PORT [6000]
# Multi-node: run the same command on every node with its own NODE_RANK and node 0's address as MASTER_ADDR.
# TRAINER ARGS are Megatron-style flags that override the YAML (e.g. --data-path PREFIX --save DIR).
# Prints the exact command, then replaces itself with it.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 CONFIG.yaml [TRAINER ARGS...]" >&2
    exit 2
fi
config=$1
shift
if [ ! -f "$config" ]; then
    echo "$0: no config file $config" >&2
    exit 2
fi

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}

cmd=(
    torchrun
    --nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK"
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
    -m fp8flow_megatron.train --config "$config" "$@"
)
printf -v line '%q ' "${cmd[@]}"
echo "+ ${line% }"
exec "${cmd[@]}"
