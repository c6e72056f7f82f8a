"""Step 2, DPO: direct preference optimisation of the step-1 model on preference pairs, in place of the reward model
and PPO (steps 2-3). `--loss_type` sigmoid (DPO), cdpo, ipo, simpo; `--reference_free`; `--precompute_ref_logprobs`.

  deepspeed training/step2_dpo/main.py --model_name_or_path output/step1_sft --data_path <pairs> --output_dir out/dpo
  deepspeed --num_gpus 2 --module chatrlhf.training.step2_dpo --zero_stage 3 ...   # one node, 2 GPUs
  python -m chatrlhf.training.step2_dpo --dtype bf16 ...                           # one process (CPU or 1 GPU)

The reference is a frozen copy of --model_name_or_path (ZeRO-3 when the policy is; `--offload_reference_model`),
or with LoRA on a frozen base (--only_optimize_lora) the policy with its adapters off, never a second copy. The
output folder loads with plain `AutoModelForCausalLM.from_pretrained(out)`. Flags: `--help`; recipes:
applications/recipes/. Parse -> build -> train -> save; `run(config)` is what tests call.
"""
from __future__ import annotations

import gc
from typing import NoReturn

from chatrlhf.training import memory_plan
from chatrlhf.training.builders import build_frozen_model, build_trained_model, start_run
from chatrlhf.training.data.pipeline import load_phase_data
from chatrlhf.training.dschat import print_notice
from chatrlhf.training.loop import total_optimizer_steps
from chatrlhf.training.step2_dpo import trainer
from chatrlhf.training.step2_dpo.config import DPOConfig
from chatrlhf.training.step2_dpo.data import DPO_DATA, DPOCollator
from chatrlhf.utils import distributed as dist
from chatrlhf.utils.config import parse_config, save_config
from chatrlhf.utils.logging import print0
from chatrlhf.utils.models import load_tokenizer


def run(cfg: DPOConfig) -> dict:
    """Trains and saves; returns the final evaluation metrics."""
    logger = start_run(cfg.train, cfg)
    tokenizer = load_tokenizer(cfg.model.model_name_or_path)
    data = load_phase_data(cfg.data, DPO_DATA, tokenizer, seed=cfg.train.seed, max_seq_len=cfg.train.max_seq_len)
    print0(f"step 2 DPO: {len(data.train)} training and {len(data.eval)} eval pairs; {data.stats}")
    total_steps = total_optimizer_steps(len(data.train), cfg.train, cfg.optim.gradient_accumulation_steps)
    frozen_copy = cfg.uses_reference() and cfg.model.lora_dim == 0  # else no reference, or the adapters-off policy
    memory_plan.check_supervised(cfg, head="causal_lm", pairs=True, title="step 2 DPO",
                                 reference=cfg.model.model_name_or_path if frozen_copy else None)
    engine = build_trained_model(cfg.model, cfg.optim, cfg.engine, tokenizer, head="causal_lm",
                                 micro_batch_size=cfg.train.per_device_train_batch_size, total_steps=total_steps)
    collate = DPOCollator(tokenizer)
    kind = trainer.reference_kind(cfg)
    lora = cfg.model.lora_dim > 0
    ref = trainer.Reference("none")
    if kind != "none":
        # With LoRA the reference is the policy with its adapters off. Otherwise a frozen copy, sharded like the
        # policy under ZeRO-3 and whole below (stages 1-2 shard optimizer state, which it has none of), as in
        # DeepSpeed-Chat.
        ref = trainer.Reference("adapters") if lora else trainer.Reference("model", build_frozen_model(
            cfg.model.model_name_or_path, tokenizer, head="causal_lm", zero_stage=3 if cfg.model.zero_stage == 3 else 0,
            dtype=cfg.engine.dtype, offload=cfg.offload_reference_model))
    if kind == "precomputed":
        if lora and not cfg.engine.only_optimize_lora:
            print0("step 2 DPO: LoRA with trained base weights: the adapters-off model is the reference only before "
                   "the first step, so its log-probabilities are precomputed")
        # Before fit() restores a checkpoint: a resumed run recomputes them from the same starting weights.
        data = trainer.with_ref_logprobs(data, ref, engine, collate, cfg.train.per_device_eval_batch_size)
        ref = trainer.Reference("precomputed")  # the frozen copy, if any, is released: training holds one model
        gc.collect()
        dist.accelerator().empty_cache()
    print0(f"step 2 DPO: loss {cfg.loss_type}, beta {cfg.beta}, reference: {ref.kind}")
    save_config(cfg, cfg.train.output_dir)
    metrics = trainer.train(engine, ref, data, collate, cfg, logger, total_steps)
    engine.save_pretrained(cfg.train.output_dir, tokenizer, keep_lora_adapter=cfg.model.keep_lora_adapter)
    logger.close()
    print0(f"step 2 DPO done: {metrics}; model saved to {cfg.train.output_dir}")
    return metrics


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(DPOConfig, argv)
    print_notice("step2_dpo", DPOConfig, cfg, argv)  # DeepSpeed-Chat flags that work differently here
    return run(cfg)


def cli() -> NoReturn:
    """The process entry (`python -m`, the deepspeed launcher, `chatrlhf-dpo`): main, then an exit without
    interpreter teardown (utils.distributed.run_as_process)."""
    dist.run_as_process(main)


if __name__ == "__main__":
    cli()
