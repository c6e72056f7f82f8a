#!/usr/bin/env bash
# Step 3 on a CPU box: PPO on SmolLM2-135M-Instruct with 2 DeepSpeed ranks, ZeRO 2 or 3, with or without LoRA.
#
# ACTOR and CRITIC are the outputs of steps 1 and 2 (for example those of `python train.py`: output/step1_sft and
# output/step2_reward); the reward model is the critic's starting point, as in DeepSpeed-Chat. Prompts are the step-3
# share of the bundled HH-RLHF sample (--data_split 2,4,4, the pipeline's split), a quarter held out: those 199
# prompts are answered (sampled, fixed seed) and scored by the frozen reward model before the first and after the
# last PPO step (eval/score_mean, eval/kl in metrics.jsonl). 12 PPO steps of 16 rollouts (8 per rank).
#
#   ZERO=2|3  ZeRO stage of actor and critic (default 3)
#   LORA=1    LoRA rank 16 on the last transformer block, base frozen (--only_optimize_lora): the cheap variant
#   LORA=0    full fine-tuning of actor and critic
#
#   ACTOR=output/step1_sft CRITIC=output/step2_reward ZERO=2 LORA=0 bash applications/recipes/step3_ppo_smollm2_cpu.sh
#
# Measured on this 2-core machine: see the step-3 table of the README.
set -euo pipefail
cd "$(dirname "$0")/../.."
ACTOR=${ACTOR:-output/step1_sft}
CRITIC=${CRITIC:-output/step2_reward}
ZERO=${ZERO:-3}
LORA=${LORA:-1}
OUT=${OUT:-output/step3_ppo_zero${ZERO}_lora${LORA}}

if [[ $LORA == 1 ]]; then
  # peft's LoRA scale (alpha 2 x dim) and init, which these measured runs used
  TUNE=(--actor_lora_dim 16 --actor_lora_alpha 32 --actor_lora_init peft --actor_lora_module_name layers.29.
        --actor_lora_learning_rate 3e-3
        --critic_lora_dim 16 --critic_lora_alpha 32 --critic_lora_init peft --critic_lora_module_name layers.29.
        --critic_lora_learning_rate 1e-3
        --critic_learning_rate 1e-3 --only_optimize_lora)
else
  TUNE=(--actor_learning_rate 5e-5 --critic_learning_rate 2e-5)
fi

# One thread per rank: two ranks already use both cores.
OMP_NUM_THREADS=1 deepspeed --num_gpus 2 training/step3_ppo/main.py \
  --actor_model_name_or_path "$ACTOR" --critic_model_name_or_path "$CRITIC" \
  --actor_zero_stage "$ZERO" --critic_zero_stage "$ZERO" --enable_hybrid_engine \
  --data_path hh-rlhf-demo --data_split 2,4,4 --eval_fraction 0.25 --skip_malformed \
  --dtype bf16 --lr_scheduler_type constant "${TUNE[@]}" \
  --max_prompt_seq_len 64 --max_answer_seq_len 32 \
  --per_device_generation_batch_size 8 --per_device_training_batch_size 8 --ppo_epochs 2 \
  --kl_coef 0.05 --max_steps 12 --save_interval 4 \
  --per_device_eval_batch_size 25 --eval_iters 4 \
  --output_dir "$OUT" --enable_tensorboard \
  "$@"
