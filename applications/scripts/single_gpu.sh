#!/usr/bin/env bash
# One GPU. Usage: applications/scripts/single_gpu.sh <actor model> <reward model> [more chatrlhf-train options]
# e.g. applications/scripts/single_gpu.sh meta-llama/Llama-3.2-1B HuggingFaceTB/SmolLM2-360M
set -euo pipefail
cd "$(dirname "$0")/../.."
ACTOR=${1:-smollm2-135m-instruct}; REWARD=${2:-$ACTOR}; shift $(( $# < 2 ? $# : 2 ))
OUTPUT=${OUTPUT:-./output}
python train.py --deployment-type single_gpu --actor-model "$ACTOR" --reward-model "$REWARD" --output-dir "$OUTPUT" "$@"
