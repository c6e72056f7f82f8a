"""Step 3: RL of the actor against the step-2 reward model or reward functions: PPO with a critic (gae) or a
critic-free estimator over groups of answers (grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline), the actor
generating through the hybrid engine.

  deepspeed training/step3_ppo/main.py --actor_model_name_or_path out/step1 --critic_model_name_or_path out/step2 \
      --actor_zero_stage 3 --critic_zero_stage 3 --output_dir out/step3
  deepspeed --num_gpus 8 --module chatrlhf.training.step3_ppo ...      # one node
  python -m chatrlhf.training.step3_ppo ...                           # one process (CPU or 1 GPU)

Saves `actor/` (causal LM), `critic/` (reward-model format; only when the estimator has a critic), `actor_ema/`
with --enable_ema. Estimators without a critic load none; --kl_coef 0 loads no reference model. `run(config)` is
what tests and the pipeline call.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NoReturn

from chatrlhf.training import memory_plan
from chatrlhf.training.builders import build_frozen_model, build_trained_model, frozen_zero_stage, start_run
from chatrlhf.training.dschat import print_notice
from chatrlhf.training.loop import eval_loader
from chatrlhf.training.step3_ppo import trainer
from chatrlhf.training.step3_ppo.config import PPOConfig
from chatrlhf.training.step3_ppo.data import PromptCollator, prompt_data
from chatrlhf.training.step3_ppo.ema import ActorEMA
from chatrlhf.training.step3_ppo.ptx import ptx_batches
from chatrlhf.training.step3_ppo.rewards import (CombinedReward, FunctionReward, ModelReward, load_reward_function,
                                                  same_tokens)
from chatrlhf.utils import distributed as dist
from chatrlhf.utils.config import parse_config, save_config
from chatrlhf.utils.logging import print0
from chatrlhf.utils.models import load_tokenizer


def run(cfg: PPOConfig, reward_fn=None) -> dict:
    """Trains and saves; `reward_fn` (prompts, responses[, metadata]) -> scores is one more reward function (it
    replaces the reward model unless --reward_model_name_or_path is given)."""
    logger = start_run(cfg.run, cfg)
    functions = [(spec, load_reward_function(spec)) for spec in cfg.reward_function]
    if reward_fn is not None:
        functions.append((getattr(reward_fn, "__name__", "reward_fn"), reward_fn))
    use_reward_model = not functions or cfg.reward_model_name_or_path is not None
    weights = cfg.reward_weights or [1.0] * (len(functions) + use_reward_model)
    if len(weights) != len(functions) + use_reward_model:
        raise ValueError(f"--reward_weights: {len(weights)} weights for {len(functions) + use_reward_model} rewards")
    needs_critic = cfg.ppo.estimator.needs_critic
    actor_path, critic_path = cfg.actor.model_name_or_path, cfg.critic.model_name_or_path
    reward_path = cfg.reward_model_name_or_path or critic_path
    tokenizer = load_tokenizer(actor_path, padding_side="left")
    if needs_critic and not load_tokenizer(critic_path).get_vocab() == tokenizer.get_vocab():
        raise ValueError(f"the critic ({critic_path}) must share the actor's tokenizer ({actor_path}): it scores the "
                         "actor's tokens. Start the critic from a model of the actor's family (e.g. "
                         "--critic_model_name_or_path <actor path>) and keep a different reward model with "
                         "--reward_model_name_or_path")
    reward_tokenizer = None
    if use_reward_model:
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
    rows = gen_bs * p.generation_batches * p.n_samples_per_prompt  # answers per rank and rollout
    optimizer_steps = total_steps * math.ceil(rows / train_bs) * p.ppo_epochs
    optimizer_steps //= cfg.actor_optim.gradient_accumulation_steps
    print0(f"step 3: {len(data.train)} training and {len(data.eval)} eval prompts; {total_steps} steps of "
           f"{p.advantage_estimator}" + ("" if needs_critic else " (no critic)"))

    memory_plan.check_ppo(cfg, reward_is_function=not use_reward_model)
    actor = build_trained_model(cfg.actor, cfg.actor_optim, cfg.engine, tokenizer, head="causal_lm",
                                micro_batch_size=train_bs, total_steps=optimizer_steps)
    if cfg.hybrid.unpin_actor_parameters and cfg.engine.zero3_gather_whole == "auto":
        actor.gather_whole = False  # asked to bound the actor's gathered memory while generating: training too
    generator = _vllm_generator(cfg, actor) if cfg.hybrid.generation_backend == "vllm" else None
    critic = build_trained_model(cfg.critic, cfg.critic_optim, cfg.engine, tokenizer, head="score",
                                 micro_batch_size=train_bs, total_steps=optimizer_steps) if needs_critic else None
    # With LoRA and a frozen base, the reference is the actor with its adapters off: no second copy. --kl_coef 0:
    # no reference at all.
    shared_ref = (p.uses_reference and cfg.actor.lora_dim > 0 and cfg.engine.only_optimize_lora
                  and not cfg.reference_model_name_or_path)
    # Frozen models at the stage that suits them (ZeRO 1-2 shard optimizer state only): a replica when it fits.
    frozen_stage = lambda choice, path, offload: frozen_zero_stage(choice, path, cfg.engine.dtype,  # noqa: E731
                                                                   offload=offload)
    ref = None if shared_ref or not p.uses_reference else build_frozen_model(
        cfg.reference_model_name_or_path or actor_path, tokenizer, head="causal_lm",
        zero_stage=frozen_stage(cfg.reference_zero_stage, cfg.reference_model_name_or_path or actor_path,
                                cfg.offload_reference_model),
        dtype=cfg.engine.dtype, offload=cfg.offload_reference_model)
    parts = [(name, FunctionReward(fn)) for name, fn in functions]
    if use_reward_model:
        parts.append(("reward_model", ModelReward(build_frozen_model(
            reward_path, reward_tokenizer or tokenizer, head="score",
            zero_stage=frozen_stage(cfg.reward_zero_stage, reward_path, cfg.offload_reward_model),
            dtype=cfg.engine.dtype, offload=cfg.offload_reward_model), reward_tokenizer)))
    reward = CombinedReward([(name.rpartition(":")[2] or name, w, r) for (name, r), w in zip(parts, weights)])
    models = trainer.Models(actor=actor, critic=critic, ref=ref, reward=reward, tokenizer=tokenizer,
                            ema=ActorEMA(actor, p.ema_beta) if p.enable_ema else None, generator=generator,
                            ref_is_actor_without_adapters=shared_ref)
    ptx = None
    if p.unsupervised_dataset_name:
        ptx = ptx_batches(p.unsupervised_dataset_name, p.unsupervised_dataset_config_name, tokenizer,
                          cfg.max_prompt_seq_len + cfg.max_answer_seq_len, train_bs, cfg.run.seed + dist.get_rank())

    save_config(cfg, cfg.run.output_dir)
    metrics = trainer.train(models, data.train, eval_loader(data.eval, cfg.run.per_device_eval_batch_size, collate), cfg,
                            logger, total_steps, ptx)

    out = Path(cfg.run.output_dir)
    actor.save_pretrained(out / "actor", tokenizer, keep_lora_adapter=cfg.actor.keep_lora_adapter)
    if critic is not None:
        critic.save_pretrained(out / "critic", tokenizer, keep_lora_adapter=cfg.critic.keep_lora_adapter)
    if models.ema is not None:
        models.ema.save_pretrained(actor, out / "actor_ema", tokenizer)
    logger.close()
    print0(f"step 3 done: {metrics}; actor saved to {out / 'actor'}")
    return metrics


def _vllm_generator(cfg: PPOConfig, actor):
    """This rank's vLLM engine for the actor (built right after it: a model vLLM cannot run stops the run before
    the other models load)."""
    from chatrlhf.training.precision import DTYPES, training_dtype
    from chatrlhf.training.vllm_backend import VLLMGenerator

    h = cfg.hybrid
    # The held-out evaluation answers up to eval_answer_len tokens (twice the training cap by default).
    longest = cfg.max_prompt_seq_len + max(cfg.max_answer_seq_len, cfg.eval_answer_len)
    return VLLMGenerator(actor.module, dtype=DTYPES[training_dtype(cfg.engine.dtype)],
                         max_model_len=longest, kv_cache_gb=h.vllm_kv_cache_gb,
                         gpu_memory_utilization=h.vllm_gpu_memory_utilization, seed=cfg.run.seed + dist.get_rank(),
                         temperature=cfg.generation.temperature)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(PPOConfig, argv)
    print_notice("step3", PPOConfig, cfg, argv)  # DeepSpeed-Chat flags that work differently here
    return run(cfg)


def cli() -> NoReturn:
    """The process entry (`python -m`, the deepspeed launcher, `chatrlhf-ppo`): main, then an exit without
    interpreter teardown (utils.distributed.run_as_process)."""
    dist.run_as_process(main)


if __name__ == "__main__":
    cli()
