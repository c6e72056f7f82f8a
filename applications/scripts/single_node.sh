#!/usr/bin/env bash
# All GPUs of this machine (NUM_GPUS=4 to use fewer).
# Usage: applications/scripts/single_node.sh <actor model> <reward model> [more chatrlhf-train options]
set -euo pipefail
cd "$(dirname "$0")/../.."
ACTOR=${1:-smollm2-135m-instruct}; REWARD=${2:-$ACTOR}; shift $(( $# < 2 ? $# : 2 ))
OUTPUT=${OUTPUT:-./output}
python train.py --deployment-type single_node --actor-model "$ACTOR" --reward-model "$REWARD" --output-dir "$OUTPUT" \
    ${NUM_GPUS:+--num-gpus "$NUM_GPUS"} "$@"
