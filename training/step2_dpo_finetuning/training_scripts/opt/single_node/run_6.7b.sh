#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# chatrlhf step 2 (DPO): facebook/opt-6.7b on every GPU of this machine.
# Run from the step folder, as DeepSpeed-Chat's scripts are:
#   cd training/step2_dpo_finetuning && bash training_scripts/opt/single_node/run_6.7b.sh [OUTPUT] [ZERO_STAGE]
# The log is also written to $OUTPUT/training.log; every flag: python main.py --help.
set -eo pipefail
OUTPUT=$1
ZERO_STAGE=$2
if [ "$OUTPUT" == "" ]; then
    OUTPUT=./output/opt-6.7b_single_node
fi
if [ "$ZERO_STAGE" == "" ]; then
    ZERO_STAGE=3
fi
mkdir -p $OUTPUT

deepspeed main.py \
   --model_name_or_path facebook/opt-6.7b \
   --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
   --data_split 2,4,4 \
   --per_device_train_batch_size 8 \
   --per_device_eval_batch_size 8 \
   --max_seq_len 512 \
   --learning_rate 5e-7 \
   --weight_decay 0.0 \
   --num_train_epochs 1 \
   --gradient_accumulation_steps 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 10 \
   --seed 1234 \
   --dtype bf16 \
   --zero_stage $ZERO_STAGE \
   --gradient_checkpointing \
   --output_dir $OUTPUT \
   2>&1 | tee $OUTPUT/training.log
