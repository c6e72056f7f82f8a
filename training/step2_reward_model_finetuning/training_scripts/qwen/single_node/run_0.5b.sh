#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# chatrlhf step 2 (reward model): Qwen/Qwen2.5-0.5B-Instruct on every GPU of this machine.
# Run from the step folder, as DeepSpeed-Chat's scripts are:
#   cd training/step2_reward_model_finetuning && bash training_scripts/qwen/single_node/run_0.5b.sh [OUTPUT] [ZERO_STAGE]
# The log is also written to $OUTPUT/training.log; every flag: python main.py --help.
set -eo pipefail
OUTPUT=$1
ZERO_STAGE=$2
if [ "$OUTPUT" == "" ]; then
    OUTPUT=./output/qwen-0.5b_single_node
fi
if [ "$ZERO_STAGE" == "" ]; then
    ZERO_STAGE=2
fi
mkdir -p $OUTPUT

deepspeed main.py \
   --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
   --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
   --data_split 2,4,4 \
   --per_device_train_batch_size 8 \
   --per_device_eval_batch_size 8 \
   --max_seq_len 512 \
   --learning_rate 5e-5 \
   --weight_decay 0.0 \
   --num_train_epochs 1 \
   --gradient_accumulation_steps 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 10 \
   --seed 1234 \
   --dtype bf16 \
   --zero_stage $ZERO_STAGE \
   --gradient_checkpointing \
   --eval_interval 100 \
   --output_dir $OUTPUT \
   2>&1 | tee $OUTPUT/training.log
