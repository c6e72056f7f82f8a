#!/usr/bin/env bash
# Step 2 on a CPU box: a SmolLM2-135M-Instruct reward model on the bundled HH-RLHF harmless-base pairs.
#
# All 1,992 usable pairs go to step 2 (--data_split 0,1,0); 10% (199 pairs) are held out for evaluation before and
# after training. CPU time is what limits this run, so it trains LoRA (rank 16) on the last transformer block only
# plus the score head (--only_optimize_lora): the backward pass stops at block 29, a step costs about one forward pass,
# and 60 optimizer steps of 8 pairs (480 pairs) fit in minutes. bf16 is ~3x faster than fp32 on AVX512-BF16 CPUs.
#
# Measured on a 2-core AMD EPYC (Zen 4) VM: held-out pairwise accuracy 47.7% -> 60.3% (199 pairs; chance 50%,
# "the shorter answer wins" 57%), eval loss 0.860 -> 0.688; see the step-2 section of the README.
#
#   bash applications/recipes/step2_reward_smollm2_cpu.sh [extra flags, e.g. --output_dir out/rm]
set -euo pipefail

python -m chatrlhf.training.step2_reward \
  --model_name_or_path smollm2-135m-instruct \
  --data_path hh-rlhf-demo --data_split 0,1,0 --eval_fraction 0.1 --skip_malformed \
  --max_seq_len 256 --dtype bf16 \
  --lora_dim 16 --lora_alpha 32 --lora_init peft --lora_module_name layers.29. --only_optimize_lora \
  --learning_rate 1e-3 --lora_learning_rate 1e-3 --num_warmup_steps 5 \
  --per_device_train_batch_size 4 --gradient_accumulation_steps 2 --max_steps 60 \
  --per_device_eval_batch_size 4 --eval_iters 100 --eval_interval 0 \
  --output_dir output/step2_reward_smollm2_cpu \
  "$@"
