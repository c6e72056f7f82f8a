#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# chatrlhf step 1 (SFT): meta-llama/Llama-3.2-1B on one GPU.
# Run from the step folder, as DeepSpeed-Chat's scripts are:
#   cd training/step1_supervised_finetuning && bash training_scripts/llama/single_gpu/run_1b.sh [OUTPUT] [ZERO_STAGE]
# The log is also written to $OUTPUT/training.log; every flag: python main.py --help.
set -eo pipefail
OUTPUT=$1
ZERO_STAGE=$2
if [ "$OUTPUT" == "" ]; then
    OUTPUT=./output/llama-1b_single_gpu
fi
if [ "$ZERO_STAGE" == "" ]; then
    ZERO_STAGE=2
fi
mkdir -p $OUTPUT

deepspeed --num_gpus 1 main.py \
   --model_name_or_path meta-llama/Llama-3.2-1B \
   --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
   --data_split 2,4,4 \
   --per_device_train_batch_size 8 \
   --per_device_eval_batch_size 8 \
   --max_seq_len 512 \
   --learning_rate 9.65e-6 \
   --weight_decay 0.1 \
   --num_train_epochs 1 \
   --gradient_accumulation_steps 2 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 10 \
   --seed 1234 \
   --dtype bf16 \
   --zero_stage $ZERO_STAGE \
   --gradient_checkpointing \
   --output_dir $OUTPUT \
   2>&1 | tee $OUTPUT/training.log
