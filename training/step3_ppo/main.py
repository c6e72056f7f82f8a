"""Step 3: PPO with a critic against the step-2 reward model, the actor generating through the hybrid engine.

  deepspeed training/step3_ppo/main.py --actor_model_name_or_path out/step1 --critic_model_name_or_path out/step2 \
      --actor_zero_stage 3 --critic_zero_stage 3 --output_dir out/step3
  deepspeed --num_gpus 8 --module chatrlhf.training.step3_ppo ...      # one node
  python -m chatrlhf.training.step3_ppo ...                           # one process (CPU or 1 GPU)

Saves `actor/` (causal LM), `critic/` (reward-model format), `actor_ema/` with --enable_ema. `run(config)` is
what tests and the pipeline call.
"""
from __future__ import annotations

import math
from pathlib import Path

from chatrlhf.training.builders import build_frozen_model, build_trained_model, start_run
from chatrlhf.training.loop import eval_loader
from chatrlhf.training.step3_ppo import trainer
from chatrlhf.training.step3_ppo.config import PPOConfig
from chatrlhf.training.step3_ppo.data import PromptCollator, prompt_data
from chatrlhf.training.step3_ppo.ema import ActorEMA
from chatrlhf.training.step3_ppo.ptx import ptx_batches
from chatrlhf.training.step3_ppo.rewards import FunctionReward, ModelReward, load_reward_function, same_tokens
from chatrlhf.utils import distributed as dist
from chatrlhf.utils.config import parse_config, save_config
from chatrlhf.utils.logging import print0
from chatrlhf.utils.models import load_tokenizer


def run(cfg: PPOConfig, reward_fn=None) -> dict:
    """Trains and saves; `reward_fn` (prompts, responses) -> scores replaces the reward model when given."""
    logger = start_run(cfg.run)
    if reward_fn is None and cfg.reward_function:
        reward_fn = load_reward_function(cfg.reward_function)
    actor_path, critic_path = cfg.actor.model_name_or_path, cfg.critic.model_name_or_path
    reward_path = cfg.reward_model_name_or_path or critic_path
    tokenizer = load_tokenizer(actor_path, padding_side="left")
    if not load_tokenizer(critic_path).get_vocab() == tokenizer.get_vocab():
        raise ValueError(f"the critic ({critic_path}) must share the actor's tokenizer ({actor_path}): it scores the "
                         "actor's tokens. Start the critic from a model of the actor's family (e.g. "
                         "--critic_model_name_or_path <actor path>) and keep a different reward model with "
                         "--reward_model_name_or_path")
    reward_tokenizer = None
    if reward_fn is None:
        reward_tokenizer = load_tokenizer(reward_path)
        reward_tokenizer = None if same_tokens(tokenizer, reward_tokenizer) else reward_tokenizer

    data = prompt_data(cfg, tokenizer)
    collate = PromptCollator(tokenizer)
    gen_bs, train_bs, p = cfg.per_device_generation_batch_size, cfg.per_device_training_batch_size, cfg.ppo
    batches_per_epoch = math.ceil(len(data.train) / (gen_bs * dist.get_world_size()))
    if batches_per_epoch < p.generation_batches:  # no PPO step could ever be collected: the loop would spin
        raise ValueError(f"--generation_batches {p.generation_batches} needs as many prompt batches per rank and "
                         f"epoch, but {len(data.train)} training prompts make {batches_per_epoch} of "
                         f"--per_device_generation_batch_size {gen_bs}")
    total_steps = (batches_per_epoch // p.generation_batches) * cfg.run.num_train_epochs
    if cfg.run.max_steps > 0:
        total_steps = min(total_steps, cfg.run.max_steps)
    optimizer_steps = total_steps * math.ceil(gen_bs * p.generation_batches / train_bs) * p.ppo_epochs
    optimizer_steps //= cfg.actor_optim.gradient_accumulation_steps
    print0(f"step 3: {len(data.train)} training and {len(data.eval)} eval prompts; {total_steps} PPO steps")

    actor = build_trained_model(cfg.actor, cfg.actor_optim, cfg.engine, tokenizer, head="causal_lm",
                                micro_batch_size=train_bs, total_steps=optimizer_steps)
    critic = build_trained_model(cfg.critic, cfg.critic_optim, cfg.engine, tokenizer, head="score",
                                 micro_batch_size=train_bs, total_steps=optimizer_steps)
    # With LoRA and a frozen base, the reference is the actor with its adapters off: no second copy.
    shared_ref = cfg.actor.lora_dim > 0 and cfg.engine.only_optimize_lora and not cfg.reference_model_name_or_path
    frozen_stage = lambda stage: 3 if stage == 3 else 0  # noqa: E731  ZeRO 1-2 shard optimizer state only
    ref = None if shared_ref else build_frozen_model(
        cfg.reference_model_name_or_path or actor_path, tokenizer, head="causal_lm",
        zero_stage=frozen_stage(cfg.actor.zero_stage), dtype=cfg.engine.dtype, offload=cfg.offload_reference_model)
    reward = FunctionReward(reward_fn) if reward_fn is not None else ModelReward(build_frozen_model(
        reward_path, reward_tokenizer or tokenizer, head="score", zero_stage=frozen_stage(cfg.critic.zero_stage),
        dtype=cfg.engine.dtype, offload=cfg.offload_reward_model), reward_tokenizer)
    models = trainer.Models(actor=actor, critic=critic, ref=ref, reward=reward, tokenizer=tokenizer,
                            ema=ActorEMA(actor, p.ema_beta) if p.enable_ema else None)
    ptx = None
    if p.unsupervised_dataset_name:
        ptx = ptx_batches(p.unsupervised_dataset_name, p.unsupervised_dataset_config_name, tokenizer,
                          cfg.max_prompt_seq_len + cfg.max_answer_seq_len, train_bs, cfg.run.seed + dist.get_rank())

    save_config(cfg, cfg.run.output_dir)
    metrics = trainer.train(models, data.train, eval_loader(data.eval, cfg.run.per_device_eval_batch_size, collate), cfg,
                            logger, total_steps, ptx)

    out = Path(cfg.run.output_dir)
    actor.save_pretrained(out / "actor", tokenizer, keep_lora_adapter=cfg.actor.keep_lora_adapter)
    critic.save_pretrained(out / "critic", tokenizer, keep_lora_adapter=cfg.critic.keep_lora_adapter)
    if models.ema is not None:
        models.ema.save_pretrained(actor, out / "actor_ema", tokenizer)
    logger.close()
    print0(f"step 3 done: {metrics}; actor saved to {out / 'actor'}")
    return metrics


def main(argv: list[str] | None = None) -> dict:
    return run(parse_config(PPOConfig, argv))


if __name__ == "__main__":
    main()
