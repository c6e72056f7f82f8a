#!/usr/bin/env bash
# Step 3 on a CPU box with a verifiable reward: GRPO on SmolLM2-135M-Instruct, no critic, no reward model, no
# reference model (--kl_coef 0), 2 DeepSpeed ranks, LoRA.
#
# Task: the bundled synthetic arithmetic word problems (training/data/bundled/arithmetic_word_problems.jsonl.gz,
# 3,000 problems generated from seed 0 by `python -m chatrlhf.training.step3_ppo.arithmetic`; GSM8K is out of reach
# for a 135M model, see the README). A tenth is held out (300 problems no step trains on); 200 of them are answered
# greedily before the first and after the last step: eval/reward/final_number_match in metrics.jsonl is the held-out
# accuracy. Reward: 1 for the right final number (verifiable:final_number_match, the reference `answer` of each record
# reaching it as metadata) + 0.2 for ending with "#### <number>" (verifiable:number_format).
#
#   ESTIMATOR=grpo|rloo|dr_grpo|reinforce_pp_baseline  group estimator (default grpo)
#   ESTIMATOR=gae      PPO with a critic (started from the actor), one answer per prompt, the same answers per step
#   STEPS=N            RL steps (default 16)
#
#   bash applications/recipes/step3_grpo_arithmetic_cpu.sh
#   ESTIMATOR=gae bash applications/recipes/step3_grpo_arithmetic_cpu.sh     # the comparison in the README
#
# Measured on this 2-core machine: see "Step 3 with verifiable rewards" in the README.
set -euo pipefail
cd "$(dirname "$0")/../.."
ESTIMATOR=${ESTIMATOR:-grpo}
STEPS=${STEPS:-16}
OUT=${OUT:-output/step3_${ESTIMATOR}_arithmetic}

if [[ $ESTIMATOR == gae ]]; then
  # 16 prompts x 1 answer per rank: as many answers per step as 2 prompts x 8 answers; the critic trains with LoRA too.
  ESTIMATOR_FLAGS=(--advantage_estimator gae --n_samples_per_prompt 1 --per_device_generation_batch_size 16
          --critic_model_name_or_path smollm2-135m-instruct --critic_lora_dim 16 --critic_lora_alpha 32
          --critic_learning_rate 1e-4 --critic_lora_learning_rate 2e-4)
else
  ESTIMATOR_FLAGS=(--advantage_estimator "$ESTIMATOR" --n_samples_per_prompt 8 --per_device_generation_batch_size 2)
fi

# One thread per rank: two ranks already use both cores.
OMP_NUM_THREADS=1 deepspeed --num_gpus 2 training/step3_ppo/main.py \
  --actor_model_name_or_path smollm2-135m-instruct "${ESTIMATOR_FLAGS[@]}" \
  --data_path training/data/bundled/arithmetic_word_problems.jsonl.gz --data_split 0,0,1 --eval_fraction 0.1 \
  --reward_function chatrlhf.training.step3_ppo.verifiable:final_number_match \
                    chatrlhf.training.step3_ppo.verifiable:number_format --reward_weights 1.0 0.2 \
  --kl_coef 0 --temperature 0.7 --max_prompt_seq_len 96 --max_answer_seq_len 32 \
  --actor_lora_dim 16 --actor_lora_alpha 32 --only_optimize_lora --actor_lora_learning_rate 5e-5 \
  --dtype fp32 --lr_scheduler_type constant --per_device_training_batch_size 16 --ppo_epochs 1 \
  --max_steps "$STEPS" --save_interval 8 --eval_greedy --per_device_eval_batch_size 50 --eval_iters 2 \
  --output_dir "$OUT" \
  "$@"
