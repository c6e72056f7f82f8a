#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# A baseline and a fine-tuned model answer the same prompts, side by side (chatrlhf.inference.prompt_eval).
# Run from the step folder, as DeepSpeed-Chat's script is:
#   cd training/step1_supervised_finetuning && bash evaluation_scripts/run_prompt.sh [BASELINE] [FINETUNE] [more flags]
# e.g. more flags: --language Chinese, --num_beams 4, --penalty_alpha 0.6 --top_k 4, --reward_model_name_or_path DIR
set -eo pipefail
BASELINE=${1:-smollm2-135m-instruct}
FINETUNE=${2:-./output/llama-135m_cpu}
shift $(( $# < 2 ? $# : 2 ))
python prompt_eval.py \
    --model_name_or_path_baseline $BASELINE \
    --model_name_or_path_finetune $FINETUNE \
    "$@"
