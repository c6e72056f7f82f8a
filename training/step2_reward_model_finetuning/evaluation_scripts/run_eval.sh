#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# Scores built-in good and bad answers with a trained reward model (chatrlhf.training.step2_reward.rw_eval).
# Run from the step folder, as DeepSpeed-Chat's script is:
#   cd training/step2_reward_model_finetuning && bash evaluation_scripts/run_eval.sh [MODEL] [more flags]
# e.g. more flags: --input_file pairs.jsonl, or --prompt "..." --answers "..." "..."
set -eo pipefail
MODEL=${1:-./output/llama-135m_cpu}
shift $(( $# < 1 ? $# : 1 ))
python rw_eval.py --model_name_or_path $MODEL "$@"
