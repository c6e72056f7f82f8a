#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# chatrlhf step 2 (reward model): Qwen/Qwen2.5-7B-Instruct on several nodes (DeepSpeed hostfile).
# Run from the step folder, as DeepSpeed-Chat's scripts are:
#   cd training/step2_reward_model_finetuning && bash training_scripts/qwen/multi_node/run_7b.sh [OUTPUT] [ZERO_STAGE]
# The log is also written to $OUTPUT/training.log; every flag: python main.py --help.
# HOSTFILE (default /job/hostfile, DeepSpeed's): one "host slots=N" line per node; the launcher
# reaches them by passwordless ssh. Without ssh, run this script on every node with
# LAUNCHER_ARGS="--no_ssh --node_rank <i> --master_addr <node 0>" (see the README, Multi-node).
set -eo pipefail
OUTPUT=$1
ZERO_STAGE=$2
if [ "$OUTPUT" == "" ]; then
    OUTPUT=./output/qwen-7b_multi_node
fi
if [ "$ZERO_STAGE" == "" ]; then
    ZERO_STAGE=3
fi
HOSTFILE=${HOSTFILE:-/job/hostfile}
mkdir -p $OUTPUT

deepspeed --hostfile "$HOSTFILE" $LAUNCHER_ARGS main.py \
   --model_name_or_path Qwen/Qwen2.5-7B-Instruct \
   --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
   --data_split 2,4,4 \
   --per_device_train_batch_size 4 \
   --per_device_eval_batch_size 4 \
   --max_seq_len 512 \
   --learning_rate 9.65e-6 \
   --weight_decay 0.0 \
   --num_train_epochs 1 \
   --gradient_accumulation_steps 2 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 10 \
   --seed 1234 \
   --dtype bf16 \
   --zero_stage $ZERO_STAGE \
   --gradient_checkpointing \
   --offload \
   --eval_interval 100 \
   --output_dir $OUTPUT \
   2>&1 | tee $OUTPUT/training.log
