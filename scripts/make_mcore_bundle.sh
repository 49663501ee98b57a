#!/bin/bash
# Build a second GPU bundle, .gpu-bundle-mcore<VERSION>/ at the project root, holding only another megatron-core wheel
# (Python 3.12) and a setup.sh that swaps it into /tmp/site after the main bundle's setup. The main bundle
# (.gpu-bundle/, from ../shared/gpu/make_bundle.sh: TE 2.20.2 + megatron-core 0.16.1, ~49 MB) and this one (~2.5 MB)
# fit one GPU call's 64 MiB together. Run here (it downloads), from the project root:
#   bash scripts/make_mcore_bundle.sh [VERSION]          # default 0.19.2 -> .gpu-bundle-mcore0.19.2/
# On the GPU machine, from the project root:
#   source .gpu-bundle/setup.sh && source .gpu-bundle-mcore0.19.2/setup.sh && <command>
# or both megatron-cores, one after the other: bash scripts/gpu_suite_both_mcore.sh .gpu-bundle .gpu-bundle-mcore0.19.2
set -euo pipefail
V=${1:-${MCORE_VERSION:-0.19.2}}
OUTD=.gpu-bundle-mcore$V
CACHE=${HOME}/.cache/gpu-bundle
[[ -f setup.py && -d fp8flow_megatron ]] || { echo "run me from the project root"; exit 2; }
mkdir -p "$CACHE/whl"
rm -rf "$OUTD" && mkdir -p "$OUTD/whl"
PLAT="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64"
python3 -m pip download -q --no-deps $PLAT -d "$CACHE/whl" "megatron-core==$V" 2>&1 | grep -v WARNING || true
cp "$CACHE"/whl/megatron_core-"$V"-cp312-*.whl "$OUTD/whl/"
cat >"$OUTD/setup.sh" <<SETUP
# Source this on the GPU machine from the project root, AFTER .gpu-bundle/setup.sh (which installed TE and
# megatron-core 0.16.1 into /tmp/site): replaces megatron-core there with $V (written by scripts/make_mcore_bundle.sh).
B=\$(cd "\$(dirname "\${BASH_SOURCE[0]}")" && pwd)
T=/tmp/site
rm -rf \$T/megatron \$T/megatron_core-*.dist-info
python3 -m pip install -q --no-index --no-deps --no-compile --target \$T \$B/whl/megatron_core-*.whl 2>&1 | grep -v -i warning
# a series that is only ported (compat.PORTED_MCORE, not yet GPU-run) imports only when opted in; a tested one ignores it
export FP8FLOW_ALLOW_PORTED_MCORE=1
python3 -c "import megatron.core, packaging; print('megatron-core swapped in:', megatron.core.__version__, '| packaging', packaging.__version__)" 2>&1 | grep -v Warning | tail -1
SETUP
du -sh "$OUTD"
