#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# chatrlhf step 3 (PPO with a critic): Qwen/Qwen2.5-7B-Instruct (actor) with a Qwen/Qwen2.5-0.5B-Instruct reward model and critic on every GPU of this machine.
# Run from the step folder, as DeepSpeed-Chat's scripts are:
#   cd training/step3_rlhf_finetuning && bash training_scripts/qwen/single_node/run_7b.sh [ACTOR_MODEL_PATH] [CRITIC_MODEL_PATH] [ACTOR_ZERO_STAGE] [CRITIC_ZERO_STAGE] [OUTPUT]
# The log is also written to $OUTPUT/training.log; every flag: python main.py --help.
# Defaults: the outputs of this family's step-1 and step-2 scripts for the same deployment.
set -eo pipefail
ACTOR_MODEL_PATH=$1
CRITIC_MODEL_PATH=$2
ACTOR_ZERO_STAGE=$3
CRITIC_ZERO_STAGE=$4
OUTPUT=$5
if [ "$ACTOR_MODEL_PATH" == "" ]; then
    ACTOR_MODEL_PATH=../step1_supervised_finetuning/output/qwen-7b_single_node
fi
if [ "$CRITIC_MODEL_PATH" == "" ]; then
    CRITIC_MODEL_PATH=../step2_reward_model_finetuning/output/qwen-0.5b_single_node
fi
if [ "$ACTOR_ZERO_STAGE" == "" ]; then
    ACTOR_ZERO_STAGE=3
fi
if [ "$CRITIC_ZERO_STAGE" == "" ]; then
    CRITIC_ZERO_STAGE=3
fi
if [ "$OUTPUT" == "" ]; then
    OUTPUT=./output/qwen-7b_single_node
fi
mkdir -p $OUTPUT

deepspeed main.py \
   --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
   --data_split 2,4,4 \
   --actor_model_name_or_path $ACTOR_MODEL_PATH \
   --critic_model_name_or_path $CRITIC_MODEL_PATH \
   --per_device_generation_batch_size 4 \
   --per_device_training_batch_size 4 \
   --generation_batches 1 \
   --ppo_epochs 1 \
   --max_answer_seq_len 256 \
   --max_prompt_seq_len 256 \
   --actor_learning_rate 9.65e-6 \
   --critic_learning_rate 5e-6 \
   --actor_weight_decay 0.0 \
   --critic_weight_decay 0.0 \
   --num_train_epochs 1 \
   --lr_scheduler_type cosine \
   --gradient_accumulation_steps 1 \
   --num_warmup_steps 100 \
   --seed 1234 \
   --dtype bf16 \
   --kl_coef 0.1 \
   --actor_zero_stage $ACTOR_ZERO_STAGE \
   --critic_zero_stage $CRITIC_ZERO_STAGE \
   --enable_hybrid_engine \
   --actor_gradient_checkpointing \
   --critic_gradient_checkpointing \
   --print_answers \
   --output_dir $OUTPUT \
   2>&1 | tee $OUTPUT/training.log
