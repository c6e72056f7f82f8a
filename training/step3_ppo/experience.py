"""Step 3's experience: rollouts sampled and scored (`make_rollout`), then the scores learned from, the shaped
rewards and the advantages (`shape_and_estimate`).

Statistics over a rollout (the running score moments, advantage whitening) are taken over every rank's rows
together, by all-reduced sums: every rank normalises alike, and the moments a checkpoint saves (rank 0's) are
every rank's. Group estimators need no communication: a prompt's answers are all sampled on one rank.
"""
from __future__ import annotations

import time

import torch

from chatrlhf.training.step3_ppo import core
from chatrlhf.training.step3_ppo.controllers import RunningMoments, normalize_scores
from chatrlhf.training.step3_ppo.estimators import group_moments
from chatrlhf.training.step3_ppo.rewards import RewardInputs, score_parts
from chatrlhf.training.step3_ppo.rollout import Rollout, generate, score
from chatrlhf.utils import distributed as dist


# ---- 1-2. rollout and scoring ---------------------------------------------------------------------------
def make_rollout(models, batch: dict, cfg, timings: dict | None = None, *, n_samples: int = 1, group_offset: int = 0,
                 sampling: dict | None = None, max_new_tokens: int | None = None, values: bool = True) -> Rollout:
    """Samples `n_samples` answers to each prompt of `batch` (consecutive rows sharing a `group` index, counted
    from `group_offset`), at most `max_new_tokens` (default --max_answer_seq_len) tokens each, and scores them
    (the critic's values only with `values`); adds the seconds spent to timings["generation"/"scoring"]. The
    prompts' messages and metadata are repeated alike, so the reward sees each answer with its own prompt's
    record."""
    actor, dev = models.actor, models.actor.device
    t0 = time.time()
    prompts, prompt_mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    n_prompts = prompts.size(0)
    if n_samples > 1:
        prompts, prompt_mask = prompts.repeat_interleave(n_samples, 0), prompt_mask.repeat_interleave(n_samples, 0)

    def repeat(rows):
        return None if rows is None else [row for row in rows for _ in range(n_samples)]

    sequences, action_mask, has_eos = generate(
        actor, prompts, prompt_mask, tokenizer=models.tokenizer, sampling=sampling or cfg.generation.sampling(),
        max_new_tokens=max_new_tokens or cfg.max_answer_seq_len, backend=models.generator,
        **cfg.hybrid.generation_mode())
    t1 = time.time()
    out = score(actor, models.ref, models.critic if values else None, sequences, prompt_mask, action_mask,
                temperature=cfg.generation.temperature,
                ref_is_actor_without_adapters=models.ref_is_actor_without_adapters,
                chunk=cfg.per_device_training_batch_size)
    if models.generator is not None:  # vLLM's own log-probs are only compared with the actor's, never used
        models.generator.record_logprobs(out["logprobs"], action_mask)
    scores, parts = score_parts(models.reward, RewardInputs(
        sequences=sequences, attention_mask=out["attention_mask"], action_mask=action_mask, has_eos=has_eos,
        prompt_len=prompts.size(1), prompt_messages=repeat(batch.get("prompt_messages")), tokenizer=models.tokenizer,
        metadata=repeat(batch.get("metadata"))))
    if timings is not None:
        timings["generation"] = timings.get("generation", 0.0) + t1 - t0
        timings["scoring"] = timings.get("scoring", 0.0) + time.time() - t1
    group = group_offset + torch.arange(n_prompts, device=dev).repeat_interleave(n_samples)
    return Rollout(sequences=sequences, action_mask=action_mask, prompt_len=prompts.size(1), scores=scores,
                   has_eos=has_eos, group=group, reward_parts=parts or None, **out)


# ---- statistics over every rank ---------------------------------------------------------------------------
@torch.no_grad()
def global_moments(x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, float, float]:
    """(count, mean, M2 = sum of squared deviations) of x's valid entries over every rank: two all-reduces of
    float64 sums (the second around the global mean, which is exact where sum-of-squares cancels)."""
    x = x.detach().double()
    valid = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    x = torch.where(valid, x, torch.zeros_like(x))
    count, total = dist.all_reduce_sum(torch.stack([valid.double().sum(), x.sum()]).to(dist.device())).tolist()
    mean = total / max(count, 1.0)
    m2 = dist.all_reduce_sum(torch.where(valid, (x - mean) ** 2, torch.zeros_like(x)).sum().to(dist.device()))
    return count, mean, m2.item()


def learned_scores(r: Rollout, p, moments: RunningMoments | None) -> torch.Tensor:
    """(B,) the scores learned from: normalised by the running moments of every rank's scores so far (when
    --normalize_scores), clipped to +-score_clip, plus --length_bonus per answer token (with
    --length_bonus_ended_only, to the answers that ended only), then --missing_eos_penalty, exactly, on answers
    without EOS."""
    scores = r.scores.float()
    if moments is not None:
        moments.merge(*global_moments(scores))
        scores = normalize_scores(scores, moments.mean, moments.std)
    if p.score_clip is not None:
        scores = scores.clamp(-p.score_clip, p.score_clip)
    if p.length_bonus:
        bonus = p.length_bonus * r.action_mask.sum(1).to(scores.dtype)
        if p.length_bonus_ended_only:
            if r.has_eos is None:
                raise ValueError("--length_bonus_ended_only: these rollouts do not record which answers ended")
            bonus = torch.where(r.has_eos, bonus, torch.zeros_like(bonus))
        scores = scores + bonus
    if p.missing_eos_penalty is not None and r.has_eos is not None:
        scores = torch.where(r.has_eos, scores, torch.full_like(scores, p.missing_eos_penalty))
    return scores


# ---- 3-4. reward shaping and advantages -----------------------------------------------------------------
def shape_and_estimate(r: Rollout, cfg, kl_coef: float, moments: RunningMoments | None) -> dict:
    """Fills r.rewards, r.advantages, r.returns; returns the rollout's objective metrics (this rank's)."""
    p = cfg.ppo
    scores = learned_scores(r, p, moments)
    r.rewards, non_score = core.shape_rewards(scores, r.logprobs, r.ref_logprobs, r.action_mask,
                                              0.0 if p.kl_in_loss else kl_coef, kl_estimator=p.kl_estimator)
    group = r.group if r.group is not None else torch.arange(r.scores.size(0), device=r.scores.device)
    r.advantages, r.returns = p.estimator(core.AdvantageInputs(
        scores=scores, rewards=r.rewards, action_mask=r.action_mask, group=group, config=p, values=r.values))
    if p.whiten_advantages:
        count, mean, m2 = global_moments(r.advantages, r.action_mask)
        r.advantages = core.masked_whiten(r.advantages, r.action_mask, moments=(mean, m2 / max(count, 1.0)))
    if r.ref_logprobs is None:
        kl = torch.zeros_like(r.scores)
    else:
        kl = core.masked_sum(core.kl_estimate(r.logprobs, r.ref_logprobs, p.kl_estimator), r.action_mask, dim=1)
    metrics = {"objective/scores": r.scores.mean(), "objective/learned_scores": scores.mean(),
               "objective/kl": kl.mean(), "ppo/kl_coef": kl_coef,
               "objective/non_score_reward": core.masked_sum(non_score, r.action_mask, dim=1).mean(),
               "ppo/response_length": r.action_mask.sum(1).mean()}
    if p.n_samples_per_prompt > 1:
        _, group_std, _ = group_moments(scores, group)
        metrics["objective/group_score_std"] = group_std.mean()
        # Answers whose whole group scored alike: a group baseline gives them no signal at all.
        metrics["objective/flat_groups"] = (group_std == 0).float().mean()
    if r.values is not None:
        metrics["ppo/val/explained_variance"] = core.explained_variance(r.values, r.returns, r.action_mask)
    for name, part in (r.reward_parts or {}).items():
        metrics[f"objective/reward/{name}"] = part.float().mean()
    return metrics
