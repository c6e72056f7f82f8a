"""Step 3's update: --ppo_epochs passes over a rollout in minibatches, the actor's clipped surrogate (+ the KL in
the loss, the entropy bonus, the pretraining mix) and, for gae, the critic's clipped value loss.

Losses are aggregated per optimizer step, globally: the --gradient_accumulation_steps minibatches of a step on
every rank share one denominator (their valid tokens, or answers, counted over all ranks), so every token (or
answer) weighs the same wherever it landed. DeepSpeed divides the gradient by the accumulation steps and averages
it over ranks, so each minibatch's loss is divided by that count / (world size x accumulation steps).
"""
from __future__ import annotations

import torch

from chatrlhf.training.step3_ppo import core
from chatrlhf.training.step3_ppo.rollout import Rollout, logprobs_and_entropy, response_logits, response_values
from chatrlhf.utils import distributed as dist


def step_denominators(action_mask: torch.Tensor, minibatches: list[torch.Tensor], accumulation: int,
                      loss_agg: str, world_size: int, all_reduce_sum=None) -> list[torch.Tensor]:
    """Per minibatch, what `core.aggregate_loss` divides its loss by: the count (tokens or answers) of the
    optimizer step it belongs to (`accumulation` consecutive minibatches), summed over ranks by `all_reduce_sum`
    (default: chatrlhf.utils.distributed's), divided by world_size x accumulation."""
    all_reduce_sum = all_reduce_sum or (lambda t: dist.all_reduce_sum(t.to(dist.device())).cpu())
    counts = torch.stack([core.aggregation_count(action_mask[index], loss_agg).double().cpu()
                          for index in minibatches])
    steps = torch.stack([counts[i:i + accumulation].sum() for i in range(0, len(counts), accumulation)])
    steps = all_reduce_sum(steps).clamp_min(1.0) / (world_size * accumulation)  # one all-reduce per epoch
    return [steps[i // accumulation].float() for i in range(len(counts))]


def ppo_update(models, r: Rollout, cfg, ptx_batches=None, kl_coef: float = 0.0) -> dict:
    """The PPO epochs over rollout `r`; `kl_coef` weighs the KL in the loss (--kl_in_loss). Returns the mean of
    each minibatch's metrics."""
    p, stats = cfg.ppo, []
    policy_loss_fn = core.POLICY_LOSSES[p.policy_loss]
    actor, critic = models.actor, models.critic
    kl_in_loss = p.kl_in_loss and r.ref_logprobs is not None and kl_coef > 0
    actor.train()
    if critic is not None:
        critic.train()
    n, size = r.sequences.size(0), cfg.per_device_training_batch_size
    accumulation = cfg.actor_optim.gradient_accumulation_steps
    temperature = cfg.generation.temperature
    for _ in range(p.ppo_epochs):
        order = torch.randperm(n)
        minibatches = [order[start:start + size] for start in range(0, n, size)]
        denominators = step_denominators(r.action_mask, minibatches, accumulation, p.loss_agg,
                                         dist.get_world_size())
        for index, denominator in zip(minibatches, denominators):
            mb = r.select(index.to(r.sequences.device))
            mask = mb.action_mask

            def aggregate(per_token):
                return core.aggregate_loss(per_token, mask, p.loss_agg, denominator.to(per_token.device),
                                           max_len=cfg.max_answer_seq_len)

            # Actor: clipped surrogate (+ KL in the loss, + entropy bonus, + the pretraining mix), one objective.
            logits = response_logits(actor, mb.sequences, mb.attention_mask, mb.prompt_len)
            # One pass gives the log-probs and the entropy metric (the full-vocabulary entropy was a second one).
            logprobs, token_entropy = logprobs_and_entropy(logits, mb.responses, temperature)
            per_token, pstats = policy_loss_fn(logprobs, mb.logprobs, mb.advantages, mask, p.cliprange_low,
                                               p.cliprange_high)
            policy = aggregate(per_token)
            kl_loss = torch.zeros((), device=policy.device)
            if kl_in_loss:
                kl_loss = aggregate(core.kl_penalty(logprobs, mb.ref_logprobs, mask, p.kl_estimator))
            entropy = core.masked_mean(token_entropy, mask)
            actor_loss = policy + kl_coef * kl_loss
            if p.entropy_coef:
                actor_loss = actor_loss - p.entropy_coef * aggregate(core.entropy_from_logits(logits, temperature))
            ptx_loss = torch.zeros(())
            if ptx_batches is not None:
                ptx = next(ptx_batches)
                ptx_loss = actor(input_ids=ptx["input_ids"].to(actor.device),
                                 attention_mask=ptx["attention_mask"].to(actor.device),
                                 labels=ptx["labels"].to(actor.device), use_cache=False).loss
                actor_loss = actor_loss + p.unsup_coef * ptx_loss
            boundary = actor.is_boundary()  # DeepSpeed answers for the micro-step about to run
            actor.backward(actor_loss)
            actor.step()
            if models.ema is not None and boundary:  # once per optimizer step: its decay is beta per step
                models.ema.update(actor)
            step = {"ppo/loss/policy": policy.detach(), "ppo/loss/kl": kl_loss.detach(),
                    "ppo/policy/clipfrac": pstats["clipfrac"], "ppo/policy/approxkl": pstats["approx_kl"],
                    "ppo/policy/ratio": pstats["ratio_mean"], "ppo/policy/entropy": entropy.detach(),
                    "ppo/loss/ptx": ptx_loss.detach()}
            if critic is not None:  # clipped value loss against the GAE returns
                values = response_values(critic, mb.sequences, mb.attention_mask, mb.prompt_len)
                per_token, vstats = core.value_loss(values, mb.values, mb.returns, mask, p.cliprange_value or None)
                value_loss = aggregate(per_token)
                critic.backward(value_loss)
                critic.step()
                step.update({"ppo/loss/value": value_loss.detach(), "ppo/val/clipfrac": vstats["vf_clipfrac"]})
            stats.append(step)
    return {k: torch.stack([torch.as_tensor(s[k]).float().cpu() for s in stats]).mean() for k in stats[0]}
