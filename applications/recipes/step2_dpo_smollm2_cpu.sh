#!/usr/bin/env bash
# Step 2, DPO, on a CPU box: SmolLM2-135M-Instruct after a short SFT, on the bundled HH-RLHF harmless-base pairs.
#
# The same pairs and held-out split as the step-2 reward-model recipe (step2_reward_smollm2_cpu.sh): all 1,992
# usable pairs go to step 2 (--data_split 0,1,0) and 10% (199 pairs) are held out, evaluated before and after
# training. The SFT model comes from $SFT; when that folder is missing a quick one is made first (10 steps of LoRA
# on the last block, on the first --data_split share of the training part only, so no held-out pair is seen).
# CPU time is what limits this run, so DPO trains LoRA (rank 16) on the last transformer block only
# (--only_optimize_lora): the backward pass stops at block 29, and the reference is the same model with its
# adapters off (no second copy). A step costs two forward passes (policy and reference) of 8 pairs, and each
# evaluation two over the 199 held-out pairs, so sequences are cut to 128 tokens (the prompt loses its start) and
# 24 steps of 8 pairs (192 pairs) are taken, about a tenth of an epoch. DTYPE=bf16 is
# ~3x faster on CPUs with AVX512-BF16/AMX; elsewhere bf16 is emulated and fp32 (the default here) is faster.
#
# At the end it prints the held-out preference accuracy before and after, with its standard error
# sqrt(p (1 - p) / n), n, the "shorter answer wins" baseline on the same pairs, and the log-probability accuracy;
# see the DPO section of the README. Measured on a 2-core Intel Xeon VM (no AVX512-BF16) shared with other jobs:
# preference accuracy 0.500 -> 0.523 +- 0.035 (n = 199; "the shorter answer wins" 0.573), log-prob accuracy 0.593 ->
# 0.593, KL to the SFT model 0.07 nats: nothing measurable learned in 24 steps; 19 min of CPU (66 min wall).
#
#   bash applications/recipes/step2_dpo_smollm2_cpu.sh [extra DPO flags, e.g. --loss_type ipo --output_dir out/ipo]
set -euo pipefail

SFT=${SFT:-output/step1_sft_smollm2_cpu}
DTYPE=${DTYPE:-fp32}
OUT=output/step2_dpo_smollm2_cpu
for ((i = 1; i <= $#; i++)); do  # an --output_dir among the extra flags is where the metrics are
  if [[ ${!i} == --output_dir ]]; then j=$((i + 1)); OUT=${!j}; fi
done

if [[ ! -f $SFT/config.json ]]; then
  SECONDS=0
  python -m chatrlhf.training.step1_sft \
    --model_name_or_path smollm2-135m-instruct \
    --data_path hh-rlhf-demo --data_split 2,4,4 --eval_fraction 0.1 --skip_malformed \
    --max_seq_len 256 --dtype "$DTYPE" \
    --lora_dim 16 --lora_alpha 32 --lora_init peft --lora_module_name layers.29. --only_optimize_lora \
    --lora_learning_rate 1e-3 --lr_scheduler_type constant \
    --per_device_train_batch_size 8 --max_steps 10 --per_device_eval_batch_size 8 --eval_iters 5 \
    --output_dir "$SFT"
  echo "step 1 (SFT) took ${SECONDS} s"
fi

SECONDS=0
python -m chatrlhf.training.step2_dpo \
  --model_name_or_path "$SFT" \
  --data_path hh-rlhf-demo --data_split 0,1,0 --eval_fraction 0.1 --skip_malformed \
  --max_seq_len 128 --dtype "$DTYPE" \
  --lora_dim 16 --lora_alpha 32 --lora_init peft --lora_module_name layers.29. --only_optimize_lora \
  --lora_learning_rate 1e-3 --num_warmup_steps 5 --beta 0.1 \
  --per_device_train_batch_size 4 --gradient_accumulation_steps 2 --max_steps 24 \
  --per_device_eval_batch_size 8 --eval_iters 100 --eval_interval 0 \
  --output_dir "$OUT" \
  "$@"
echo "step 2 (DPO) took ${SECONDS} s"

python - "$OUT" <<'EOF'
import math
import sys

from chatrlhf.utils.logging import read_metrics

evals = [m for m in read_metrics(sys.argv[1]) if "eval/accuracy" in m]
first, last = evals[0], evals[-1]
n = last["eval/pairs"]
se = lambda p: math.sqrt(p * (1 - p) / n)  # noqa: E731
print(f"held-out pairs n = {n}")
for key, what in (("eval/accuracy", "preference accuracy (implicit reward, ties half)"),
                  ("eval/logprob_accuracy", "log-prob accuracy (chosen answer more likely)")):
    print(f"{what}: {first[key]:.3f} +- {se(first[key]):.3f} (step {first['step']}) -> "
          f"{last[key]:.3f} +- {se(last[key]):.3f} (step {last['step']})")
print(f"'the shorter answer wins' on the same pairs: {last['eval/shorter_wins']:.3f}")
print(f"mean log-prob of the chosen / rejected answers: {first['eval/chosen_logprob']:.2f} / "
      f"{first['eval/rejected_logprob']:.2f} -> {last['eval/chosen_logprob']:.2f} / {last['eval/rejected_logprob']:.2f}")
print(f"margin {last['eval/margin']:+.3f}, eval loss {first['eval/loss']:.4f} -> {last['eval/loss']:.4f}, "
      f"KL to the SFT model on the chosen answers {last.get('eval/kl_chosen', float('nan')):.3f} nats")
EOF
