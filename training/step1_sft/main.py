"""Step 1: supervised fine-tuning (SFT).

  deepspeed training/step1_sft/main.py --model_name_or_path <hf id or path> --data_path <data> --output_dir out/sft
  deepspeed --num_gpus 2 --module chatrlhf.training.step1_sft --zero_stage 3 ...   # one node, 2 GPUs
  python -m chatrlhf.training.step1_sft --dtype bf16 ...                           # one process (CPU or 1 GPU)

Flags: `--help`; recipes: applications/recipes/. Parse -> build -> train -> save; `run(config)` is what tests call.
"""
from __future__ import annotations

from typing import NoReturn

from chatrlhf.training import memory_plan
from chatrlhf.training.builders import build_trained_model, start_run
from chatrlhf.training.dschat import print_notice
from chatrlhf.training.data.pipeline import load_phase_data
from chatrlhf.training.loop import total_optimizer_steps
from chatrlhf.training.step1_sft import trainer
from chatrlhf.training.step1_sft.config import SFTConfig
from chatrlhf.training.step1_sft.data import SFT_DATA, SFTCollator
from chatrlhf.utils import distributed as dist
from chatrlhf.utils.config import parse_config, save_config
from chatrlhf.utils.logging import print0
from chatrlhf.utils.models import load_tokenizer


def run(cfg: SFTConfig) -> dict:
    """Trains and saves; returns the final evaluation metrics."""
    logger = start_run(cfg.train, cfg)
    tokenizer = load_tokenizer(cfg.model.model_name_or_path)
    data = load_phase_data(cfg.data, SFT_DATA, tokenizer, seed=cfg.train.seed, max_seq_len=cfg.train.max_seq_len,
                           train_on_prompt=cfg.train_on_prompt)
    print0(f"step 1: {len(data.train)} training and {len(data.eval)} eval examples; {data.stats}")
    total_steps = total_optimizer_steps(len(data.train), cfg.train, cfg.optim.gradient_accumulation_steps)
    memory_plan.check_supervised(cfg, head="causal_lm", title="step 1")
    engine = build_trained_model(cfg.model, cfg.optim, cfg.engine, tokenizer, head="causal_lm",
                                 micro_batch_size=cfg.train.per_device_train_batch_size, total_steps=total_steps)
    save_config(cfg, cfg.train.output_dir)
    metrics = trainer.train(engine, data, SFTCollator(tokenizer), cfg, logger, total_steps)
    engine.save_pretrained(cfg.train.output_dir, tokenizer, keep_lora_adapter=cfg.model.keep_lora_adapter)
    logger.close()
    print0(f"step 1 done: {metrics}; model saved to {cfg.train.output_dir}")
    return metrics


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(SFTConfig, argv)
    print_notice("step1", SFTConfig, cfg, argv)  # DeepSpeed-Chat flags that work differently here
    return run(cfg)


def cli() -> NoReturn:
    """The process entry (`python -m`, the deepspeed launcher, `chatrlhf-sft`): main, then an exit without
    interpreter teardown (utils.distributed.run_as_process)."""
    dist.run_as_process(main)


if __name__ == "__main__":
    cli()
