#!/usr/bin/env bash
# The whole pipeline on a CPU-only machine (the embedded default: SmolLM2-135M-Instruct, bundled HH-RLHF data).
# Usage: applications/scripts/cpu.sh [more chatrlhf-train options], e.g. --actor-model Qwen/Qwen2.5-0.5B-Instruct
set -euo pipefail
cd "$(dirname "$0")/../.."
OUTPUT=${OUTPUT:-./output}
python train.py --deployment-type cpu --output-dir "$OUTPUT" "$@"
