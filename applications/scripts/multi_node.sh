#!/usr/bin/env bash
# Several nodes, from the first one; every node needs the same code, data and output paths (a shared filesystem)
# and passwordless ssh (DeepSpeed's pdsh launcher). HOSTFILE defaults to applications/hostfile.example's format.
# Usage: HOSTFILE=/job/hostfile applications/scripts/multi_node.sh <actor model> <reward model> [more options]
set -euo pipefail
cd "$(dirname "$0")/../.."
ACTOR=${1:-smollm2-135m-instruct}; REWARD=${2:-$ACTOR}; shift $(( $# < 2 ? $# : 2 ))
OUTPUT=${OUTPUT:-./output}
python train.py --deployment-type multi_node --hostfile "${HOSTFILE:-/job/hostfile}" --actor-model "$ACTOR" \
    --reward-model "$REWARD" --output-dir "$OUTPUT" "$@"
