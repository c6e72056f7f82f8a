#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# chatrlhf step 1 (SFT): smollm2-135m-instruct on a CPU-only machine, one process.
# Run from the step folder, as DeepSpeed-Chat's scripts are:
#   cd training/step1_supervised_finetuning && bash training_scripts/llama/cpu/run_135m.sh [OUTPUT] [ZERO_STAGE]
# The log is also written to $OUTPUT/training.log; every flag: python main.py --help.
# Meant to finish in minutes on a few cores: LoRA (peft's scale 2, as the pipeline's CPU recipe), short
# sequences and a fixed number of steps.
set -eo pipefail
OUTPUT=$1
ZERO_STAGE=$2
if [ "$OUTPUT" == "" ]; then
    OUTPUT=./output/llama-135m_cpu
fi
if [ "$ZERO_STAGE" == "" ]; then
    ZERO_STAGE=0
fi
mkdir -p $OUTPUT

python main.py \
   --model_name_or_path smollm2-135m-instruct \
   --data_path hh-rlhf-demo \
   --data_split 2,4,4 \
   --per_device_train_batch_size 4 \
   --per_device_eval_batch_size 4 \
   --max_seq_len 256 \
   --learning_rate 5e-5 \
   --weight_decay 0.0 \
   --num_train_epochs 1 \
   --gradient_accumulation_steps 2 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 0 \
   --seed 1234 \
   --dtype bf16 \
   --zero_stage $ZERO_STAGE \
   --lora_dim 16 --lora_alpha 32 --lora_init peft \
   --lora_module_name layers.29. \
   --only_optimize_lora \
   --lora_learning_rate 1e-3 \
   --max_steps 40 \
   --eval_iters 10 \
   --output_dir $OUTPUT \
   2>&1 | tee $OUTPUT/training.log
