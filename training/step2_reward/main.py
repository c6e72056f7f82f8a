"""Step 2: the reward model (pairwise Bradley-Terry loss on end scores).

  deepspeed training/step2_reward/main.py --model_name_or_path <hf id or path> --data_path <pairs> --output_dir out/rm
  deepspeed --num_gpus 2 --module chatrlhf.training.step2_reward --zero_stage 3 ...   # one node, 2 GPUs
  python -m chatrlhf.training.step2_reward --dtype bf16 ...                           # one process (CPU or 1 GPU)

The output folder loads with plain `AutoModelForSequenceClassification.from_pretrained(out)` (num_labels=1) and
scores a sequence at its last real token (chatrlhf.training.value_model); step 3 loads it as the reward model and
the critic. Score answers with `python -m chatrlhf.training.step2_reward.rw_eval`. Flags: `--help`; recipes:
applications/recipes/. Parse -> build -> train -> save; `run(config)` is what tests call.
"""
from __future__ import annotations

from typing import NoReturn

from chatrlhf.training import memory_plan
from chatrlhf.training.builders import build_trained_model, start_run
from chatrlhf.training.dschat import print_notice
from chatrlhf.training.data.pipeline import load_phase_data
from chatrlhf.training.loop import total_optimizer_steps
from chatrlhf.training.step2_reward import trainer
from chatrlhf.training.step2_reward.config import RewardConfig
from chatrlhf.training.step2_reward.data import REWARD_DATA, PairCollator, check_unseen_shares, unseen_pairs
from chatrlhf.utils import distributed as dist
from chatrlhf.utils.config import parse_config, save_config
from chatrlhf.utils.logging import print0
from chatrlhf.utils.models import load_tokenizer


def run(cfg: RewardConfig) -> dict:
    """Trains and saves; returns the final evaluation metrics."""
    check_unseen_shares(cfg.heldout_shares, "--heldout_shares")
    logger = start_run(cfg.train, cfg)
    tokenizer = load_tokenizer(cfg.model.model_name_or_path)
    data = load_phase_data(cfg.data, REWARD_DATA, tokenizer, seed=cfg.train.seed, max_seq_len=cfg.train.max_seq_len)
    print0(f"step 2: {len(data.train)} training and {len(data.eval)} eval pairs; {data.stats}")
    total_steps = total_optimizer_steps(len(data.train), cfg.train, cfg.optim.gradient_accumulation_steps)
    memory_plan.check_supervised(cfg, head="score", pairs=True, title="step 2")
    engine = build_trained_model(cfg.model, cfg.optim, cfg.engine, tokenizer, head="score",
                                 micro_batch_size=cfg.train.per_device_train_batch_size, total_steps=total_steps)
    save_config(cfg, cfg.train.output_dir)
    metrics = trainer.train(engine, data, PairCollator(tokenizer), cfg, logger, total_steps)
    engine.save_pretrained(cfg.train.output_dir, tokenizer, keep_lora_adapter=cfg.model.keep_lora_adapter)
    if cfg.heldout_shares:  # after the save: the model is safe whatever happens here
        parts = unseen_pairs(cfg.data, tokenizer, cfg.heldout_shares, seed=cfg.train.seed,
                             max_seq_len=cfg.train.max_seq_len, own_eval=data.eval)
        print0(f"step 2: scoring the {sum(len(d) for _, d in parts)} pairs it never trained on "
               f"({', '.join(f'{name} {len(d)}' for name, d in parts)})")
        heldout = trainer.evaluate_unseen(engine, parts, PairCollator(tokenizer), cfg)
        logger.log(total_steps, heldout)
        metrics.update(heldout)
    logger.close()
    print0(f"step 2 done: {metrics}; model saved to {cfg.train.output_dir}")
    return metrics


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(RewardConfig, argv)
    print_notice("step2_reward", RewardConfig, cfg, argv)  # DeepSpeed-Chat flags that work differently here
    return run(cfg)


def cli() -> NoReturn:
    """The process entry (`python -m`, the deepspeed launcher, `chatrlhf-reward`): main, then an exit without
    interpreter teardown (utils.distributed.run_as_process)."""
    dist.run_as_process(main)


if __name__ == "__main__":
    cli()
