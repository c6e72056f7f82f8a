#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# chatrlhf step 2 (reward model): facebook/opt-125m on a CPU-only machine, one process.
# Run from the step folder, as DeepSpeed-Chat's scripts are:
#   cd training/step2_reward_model_finetuning && bash training_scripts/opt/cpu/run_125m.sh [OUTPUT] [ZERO_STAGE]
# The log is also written to $OUTPUT/training.log; every flag: python main.py --help.
# Meant to finish in minutes on a few cores: LoRA (peft's scale 2, as the pipeline's CPU recipe), short
# sequences and a fixed number of steps.
set -eo pipefail
OUTPUT=$1
ZERO_STAGE=$2
if [ "$OUTPUT" == "" ]; then
    OUTPUT=./output/opt-125m_cpu
fi
if [ "$ZERO_STAGE" == "" ]; then
    ZERO_STAGE=0
fi
mkdir -p $OUTPUT

python main.py \
   --model_name_or_path facebook/opt-125m \
   --data_path hh-rlhf-demo \
   --data_split 2,4,4 \
   --per_device_train_batch_size 4 \
   --per_device_eval_batch_size 4 \
   --max_seq_len 256 \
   --learning_rate 1e-3 \
   --weight_decay 0.0 \
   --num_train_epochs 1 \
   --gradient_accumulation_steps 2 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 0 \
   --seed 1234 \
   --dtype bf16 \
   --zero_stage $ZERO_STAGE \
   --eval_interval 0 \
   --lora_dim 16 --lora_alpha 32 --lora_init peft \
   --lora_module_name decoder.layers.11. \
   --only_optimize_lora \
   --lora_learning_rate 1e-3 \
   --max_steps 40 \
   --eval_iters 10 \
   --output_dir $OUTPUT \
   2>&1 | tee $OUTPUT/training.log
