#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# chatrlhf step 3 (PPO with a critic): facebook/opt-125m (actor) with a facebook/opt-125m reward model and critic on a CPU-only machine, one process.
# Run from the step folder, as DeepSpeed-Chat's scripts are:
#   cd training/step3_rlhf_finetuning && bash training_scripts/opt/cpu/run_125m.sh [ACTOR_MODEL_PATH] [CRITIC_MODEL_PATH] [ACTOR_ZERO_STAGE] [CRITIC_ZERO_STAGE] [OUTPUT]
# The log is also written to $OUTPUT/training.log; every flag: python main.py --help.
# Meant to finish in minutes on a few cores: LoRA (peft's scale 2, as the pipeline's CPU recipe), short
# sequences and a fixed number of steps.
# Defaults: the outputs of this family's step-1 and step-2 scripts for the same deployment.
set -eo pipefail
ACTOR_MODEL_PATH=$1
CRITIC_MODEL_PATH=$2
ACTOR_ZERO_STAGE=$3
CRITIC_ZERO_STAGE=$4
OUTPUT=$5
if [ "$ACTOR_MODEL_PATH" == "" ]; then
    ACTOR_MODEL_PATH=../step1_supervised_finetuning/output/opt-125m_cpu
fi
if [ "$CRITIC_MODEL_PATH" == "" ]; then
    CRITIC_MODEL_PATH=../step2_reward_model_finetuning/output/opt-125m_cpu
fi
if [ "$ACTOR_ZERO_STAGE" == "" ]; then
    ACTOR_ZERO_STAGE=0
fi
if [ "$CRITIC_ZERO_STAGE" == "" ]; then
    CRITIC_ZERO_STAGE=0
fi
if [ "$OUTPUT" == "" ]; then
    OUTPUT=./output/opt-125m_cpu
fi
mkdir -p $OUTPUT

python main.py \
   --data_path hh-rlhf-demo \
   --data_split 2,4,4 \
   --actor_model_name_or_path $ACTOR_MODEL_PATH \
   --critic_model_name_or_path $CRITIC_MODEL_PATH \
   --per_device_generation_batch_size 8 \
   --per_device_training_batch_size 8 \
   --generation_batches 1 \
   --ppo_epochs 2 \
   --max_answer_seq_len 32 \
   --max_prompt_seq_len 64 \
   --actor_weight_decay 0.0 \
   --critic_weight_decay 0.0 \
   --num_train_epochs 1 \
   --lr_scheduler_type constant \
   --gradient_accumulation_steps 1 \
   --num_warmup_steps 0 \
   --seed 1234 \
   --dtype bf16 \
   --kl_coef 0.05 \
   --actor_zero_stage $ACTOR_ZERO_STAGE \
   --critic_zero_stage $CRITIC_ZERO_STAGE \
   --actor_lora_dim 16 --actor_lora_alpha 32 --actor_lora_init peft \
   --actor_lora_module_name decoder.layers.11. \
   --actor_lora_learning_rate 2e-3 \
   --critic_lora_dim 16 --critic_lora_alpha 32 --critic_lora_init peft \
   --critic_lora_module_name decoder.layers.11. \
   --critic_learning_rate 1e-3 \
   --critic_lora_learning_rate 1e-3 \
   --only_optimize_lora \
   --max_steps 10 \
   --eval_iters 8 \
   --print_answers \
   --output_dir $OUTPUT \
   2>&1 | tee $OUTPUT/training.log
