"""PPO step-time breakdown: generation / scoring / training and tokens per second, from a short real step-3 run.

  python benchmarks/ppo_step.py                                    # SmolLM2-135M actor + critic, bf16, CPU or 1 GPU
  deepspeed --num_gpus 2 benchmarks/ppo_step.py --zero_stage 3     # 2 ranks, ZeRO-3 actor and critic

Runs step 3 in-process for --steps PPO steps (a rule-based reward: no reward model needed) and prints the mean
seconds per stage over the steps after the first (warm-up), and their shares of a step.
"""
from __future__ import annotations

import argparse
import tempfile

from chatrlhf.training.step3_ppo.config import PPOConfig
from chatrlhf.training.step3_ppo.main import run
from chatrlhf.training.step3_ppo.rewards import brevity
from chatrlhf.utils import distributed as dist
from chatrlhf.utils.config import from_flat
from chatrlhf.utils.logging import read_metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--zero_stage", type=int, default=0)
    ap.add_argument("--batch_size", type=int, default=4, help="prompts per rank per step")
    ap.add_argument("--max_answer_seq_len", type=int, default=48)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--local_rank", type=int, default=-1)
    args = ap.parse_args()
    out = dist.broadcast_object(tempfile.mkdtemp(prefix="ppo_bench_")) if dist.is_initialized() else None
    dist.init_distributed()
    out = dist.broadcast_object(out or tempfile.mkdtemp(prefix="ppo_bench_"))
    cfg = from_flat(PPOConfig, dict(
        actor_model_name_or_path=args.model, critic_model_name_or_path=args.model, dtype=args.dtype,
        actor_zero_stage=args.zero_stage, critic_zero_stage=args.zero_stage, output_dir=out, max_steps=args.steps,
        per_device_generation_batch_size=args.batch_size, per_device_training_batch_size=args.batch_size,
        max_answer_seq_len=args.max_answer_seq_len, max_prompt_seq_len=128, eval_iters=0, resume=False))
    run(cfg, reward_fn=brevity)
    if dist.is_main_process():
        steps = [m for m in read_metrics(out) if "time/generation" in m][1:]
        mean = lambda k: sum(m[k] for m in steps) / len(steps)  # noqa: E731
        total = mean("time/step")
        print(f"\n== PPO step breakdown: {args.model}, ZeRO-{args.zero_stage}, {dist.get_world_size()} rank(s), "
              f"{args.batch_size} prompts/rank, answers <= {args.max_answer_seq_len} tokens, mean of {len(steps)} steps ==")
        for k in ("generation", "scoring", "training"):
            print(f"{k:>10}: {mean('time/' + k):6.2f} s  ({mean('time/' + k) / total:5.1%})")
        print(f"{'step':>10}: {total:6.2f} s | generated {mean('throughput/generated_tokens_per_second'):.1f} tok/s "
              f"while generating | {mean('throughput/tokens_per_second'):.1f} tok/s end to end")


if __name__ == "__main__":
    main()
