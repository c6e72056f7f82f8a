"""The PPO loop: rollout -> score -> shape rewards -> advantages -> PPO epochs -> log, checkpoint.

Each stage is a short function; the math lives in `core.py`. Every rank keeps every sequence it sampled
(short or EOS-less answers are masked or penalised, never dropped), so batch shapes agree across ranks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from chatrlhf.training.hybrid_engine import HybridEngine
from chatrlhf.training.loop import RunState, batch_stream, fit
from chatrlhf.training.step3_ppo import core
from chatrlhf.training.step3_ppo.data import PromptCollator
from chatrlhf.training.step3_ppo.ema import ActorEMA
from chatrlhf.training.step3_ppo.rewards import Reward, RewardInputs
from chatrlhf.training.step3_ppo.rollout import Rollout, concat, generate, response_logits, response_values, score
from chatrlhf.utils import distributed as dist
from chatrlhf.utils.logging import print0


@dataclass
class Models:
    """Every model step 3 runs."""
    actor: HybridEngine             # trainable, generates
    critic: HybridEngine            # trainable
    ref: HybridEngine | None        # frozen; None: the actor with its LoRA adapters disabled
    reward: Reward                  # a reward model or a reward function, behind one call
    tokenizer: "PreTrainedTokenizerBase"  # noqa: F821  the actor's (and critic's)
    ema: ActorEMA | None = None     # EMA of the actor's weights


# ---- 1-2. rollout and scoring ---------------------------------------------------------------------------
def make_rollout(models: Models, batch: dict, cfg, timings: dict | None = None) -> Rollout:
    """Samples answers to `batch` and scores them; adds seconds spent to timings["generation"/"scoring"]."""
    actor, dev = models.actor, models.actor.device
    t0 = time.time()
    prompts, prompt_mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    sequences, action_mask, has_eos = generate(
        actor, prompts, prompt_mask, tokenizer=models.tokenizer, sampling=cfg.generation.sampling(),
        max_new_tokens=cfg.max_answer_seq_len, **cfg.hybrid.generation_mode())
    t1 = time.time()
    out = score(actor, models.ref, models.critic, sequences, prompt_mask, action_mask,
                temperature=cfg.generation.temperature, ref_is_actor_without_adapters=models.ref is None)
    out["scores"] = models.reward(RewardInputs(
        sequences=sequences, attention_mask=out["attention_mask"], action_mask=action_mask, has_eos=has_eos,
        prompt_len=prompts.size(1), prompt_messages=batch.get("prompt_messages"), tokenizer=models.tokenizer))
    if cfg.ppo.missing_eos_penalty is not None:
        out["scores"] = torch.where(has_eos, out["scores"], torch.full_like(out["scores"], cfg.ppo.missing_eos_penalty))
    if timings is not None:
        timings["generation"] = timings.get("generation", 0.0) + t1 - t0
        timings["scoring"] = timings.get("scoring", 0.0) + time.time() - t1
    return Rollout(sequences=sequences, action_mask=action_mask, prompt_len=prompts.size(1), **out)


# ---- 3-4. reward shaping and advantages -----------------------------------------------------------------
def shape_and_estimate(r: Rollout, cfg, kl_coef: float, moments: core.RunningMoments | None) -> dict:
    """Fills r.rewards, r.advantages, r.returns; returns the rollout's objective metrics."""
    p = cfg.ppo
    scores = r.scores
    if moments is not None:
        moments.update(scores)
        scores = core.normalize_scores(scores, moments.mean, moments.std)
    r.rewards, non_score = core.shape_rewards(scores, r.logprobs, r.ref_logprobs, r.action_mask, kl_coef,
                                              kl_estimator=p.kl_estimator, score_clip=p.score_clip)
    estimator = core.ADVANTAGE_ESTIMATORS[p.advantage_estimator]
    r.advantages, r.returns = estimator(r.rewards, r.values, r.action_mask, p.gamma, p.lam)
    if p.whiten_advantages:
        r.advantages = core.masked_whiten(r.advantages, r.action_mask)
    kl = core.masked_sum(core.kl_estimate(r.logprobs, r.ref_logprobs, p.kl_estimator), r.action_mask, dim=1)
    return {"objective/scores": r.scores.mean(), "objective/kl": kl.mean(), "ppo/kl_coef": kl_coef,
            "objective/non_score_reward": core.masked_sum(non_score, r.action_mask, dim=1).mean(),
            "ppo/response_length": r.action_mask.sum(1).mean(),
            "ppo/val/explained_variance": core.explained_variance(r.values, r.returns, r.action_mask)}


# ---- 5. PPO epochs over minibatches ---------------------------------------------------------------------
def ppo_update(models: Models, r: Rollout, cfg, ptx_batches=None) -> dict:
    p, stats = cfg.ppo, []
    policy_loss_fn = core.POLICY_LOSSES[p.policy_loss]
    models.actor.train()
    models.critic.train()
    n, size = r.sequences.size(0), cfg.per_device_training_batch_size
    for _ in range(p.ppo_epochs):
        order = torch.randperm(n)
        for start in range(0, n, size):
            mb = r.select(order[start:start + size].to(r.sequences.device))
            # Actor: clipped surrogate (+ entropy bonus, + the pretraining-mix LM loss in the same objective).
            logits = response_logits(models.actor, mb.sequences, mb.attention_mask, mb.prompt_len)
            logprobs = core.logprobs_from_logits(logits, mb.responses, cfg.generation.temperature)
            actor_loss, pstats = policy_loss_fn(logprobs, mb.logprobs, mb.advantages, mb.action_mask, p.cliprange,
                                                loss_agg=p.loss_agg)
            entropy = core.masked_mean(core.entropy_from_logits(logits.detach(), cfg.generation.temperature),
                                       mb.action_mask)
            if p.entropy_coef:
                entropy_live = core.masked_mean(core.entropy_from_logits(logits, cfg.generation.temperature),
                                                mb.action_mask)
                actor_loss = actor_loss - p.entropy_coef * entropy_live
            ptx_loss = torch.zeros(())
            if ptx_batches is not None:
                ptx = next(ptx_batches)
                ptx_loss = models.actor(input_ids=ptx["input_ids"].to(models.actor.device),
                                        attention_mask=ptx["attention_mask"].to(models.actor.device),
                                        labels=ptx["labels"].to(models.actor.device), use_cache=False).loss
                actor_loss = actor_loss + p.unsup_coef * ptx_loss
            models.actor.backward(actor_loss)
            models.actor.step()
            if models.ema is not None:
                models.ema.update(models.actor)
            # Critic: clipped value loss against the GAE returns.
            values = response_values(models.critic, mb.sequences, mb.attention_mask, mb.prompt_len)
            value_loss, vstats = core.value_loss(values, mb.values, mb.returns, mb.action_mask,
                                                 p.cliprange_value or None, loss_agg=p.loss_agg)
            models.critic.backward(value_loss)
            models.critic.step()
            stats.append({"ppo/loss/policy": actor_loss.detach(), "ppo/loss/value": value_loss.detach(),
                          "ppo/policy/clipfrac": pstats["clipfrac"], "ppo/policy/approxkl": pstats["approx_kl"],
                          "ppo/policy/ratio": pstats["ratio_mean"], "ppo/val/clipfrac": vstats["vf_clipfrac"],
                          "ppo/policy/entropy": entropy.detach(), "ppo/loss/ptx": ptx_loss.detach()})
    return {k: torch.stack([torch.as_tensor(s[k]).float().cpu() for s in stats]).mean() for k in stats[0]}


# ---- evaluation on held-out prompts ----------------------------------------------------------------------
@torch.no_grad()
def evaluate(models: Models, loader, cfg, max_batches: int) -> dict:
    """Reward-model score and KL to the reference on held-out prompts; sampled with a fixed seed so that
    evaluations before and after training see the same randomness, without touching the training RNG."""
    totals = torch.zeros(5, dtype=torch.float64, device=dist.device())  # summed on the device: no sync per batch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            r = make_rollout(models, batch, cfg)
            kl = core.masked_sum(r.logprobs - r.ref_logprobs, r.action_mask, dim=1)
            scores = r.scores.double()
            totals += torch.stack([scores.sum(), scores.square().sum(), kl.double().sum(),
                                   r.action_mask.double().sum(), scores.new_tensor(float(len(scores)))])
    score, square, kl, length, n = dist.all_reduce_sum(totals).cpu().tolist()
    n = max(n, 1.0)
    # The spread of the answers' scores, so that a before/after difference can be read against it.
    std = max(square / n - (score / n) ** 2, 0.0) ** 0.5
    return {"eval/score_mean": score / n, "eval/score_std": std, "eval/kl": kl / n, "eval/response_length": length / n,
            "eval/answers": n}


# ---- the loop -------------------------------------------------------------------------------------------
def train(models: Models, prompts, eval_loader, cfg, logger, total_steps: int, ptx_batches=None) -> dict:
    """PPO on `prompts` (the training prompt Dataset) for `total_steps` iterations; returns the final evaluation.

    One step: rollouts from --generation_batches prompt batches, KL-shaped rewards and advantages, PPO epochs,
    the KL controller; `fit` does the cadence (log, evaluate, checkpoint, resume)."""
    p, run = cfg.ppo, cfg.run
    kl_ctl = (core.AdaptiveKLController(p.kl_coef, p.target_kl, p.kl_horizon) if p.adaptive_kl
              else core.FixedKLController(p.kl_coef))
    moments = core.RunningMoments() if p.normalize_scores else None
    state = RunState(extra={"kl_coef": kl_ctl.value, "score_moments": None, "ptx_batches": 0})
    batches = batch_stream(prompts, cfg.per_device_generation_batch_size, PromptCollator(models.tokenizer), run.seed,
                           state, run.num_train_epochs, group=p.generation_batches)
    if ptx_batches is not None:
        ptx_batches = _counted(ptx_batches, state)

    def train_step() -> dict | None:
        group = next(batches, None)
        if group is None:
            return None
        # 1-2. rollouts scored in eval mode
        timings: dict = {}
        r = concat([make_rollout(models, b, cfg, timings) for b in group], models.tokenizer.pad_token_id)
        t1 = time.time()
        # 3-4. KL-shaped rewards, advantages
        metrics = shape_and_estimate(r, cfg, kl_ctl.value, moments)
        # 5. PPO epochs
        metrics.update(ppo_update(models, r, cfg, ptx_batches))
        t2 = time.time()
        # 6. KL controller, step metrics (the mean over ranks), answers
        kl_now = dist.all_reduce_mean(metrics["objective/kl"].detach().float().to(dist.device())).item()
        kl_ctl.update(kl_now, r.sequences.size(0) * dist.get_world_size())
        state.extra.update(kl_coef=kl_ctl.value, score_moments=moments.state_dict() if moments is not None else None)
        generated = dist.all_reduce_sum(r.action_mask.sum().to(dist.device())).item()
        t_total = timings["generation"] + timings["scoring"] + t2 - t1
        metrics.update({"time/generation": timings["generation"], "time/scoring": timings["scoring"],
                        "time/training": t2 - t1, "time/step": t_total,
                        "throughput/generated_tokens_per_second": generated / max(timings["generation"], 1e-9),
                        "throughput/tokens_per_second": generated / max(t_total, 1e-9)})
        metrics = {k: dist.all_reduce_mean(torch.as_tensor(v, dtype=torch.float64).to(dist.device())).item()
                   for k, v in metrics.items()}
        if cfg.print_answers and (state.step + 1) % cfg.print_answers_interval == 0:
            _print_answer(r, models.tokenizer)
        return metrics

    def on_resume(path):
        kl_ctl.value = state.extra["kl_coef"]
        if moments is not None and state.extra.get("score_moments"):
            moments.load_state_dict(state.extra["score_moments"])
        if models.ema is not None:
            models.ema.load(path)

    return fit(state=state, total_steps=total_steps, run=run, engines={"actor": models.actor, "critic": models.critic},
               train_step=train_step, evaluate=lambda: evaluate(models, eval_loader, cfg, run.eval_iters),
               logger=logger, desc="step 3 PPO", config=cfg, on_resume=on_resume,
               on_save=models.ema.save if models.ema is not None else None,
               postfix=lambda m: {"score": f"{m['objective/scores']:.3f}", "kl": f"{m['objective/kl']:.3f}"})


def _counted(batches, state: RunState):
    """The pretraining-mix stream moved past the batches a resumed run already used, and counted into `state`."""
    for _ in range(state.extra["ptx_batches"]):
        next(batches)
    for batch in batches:
        state.extra["ptx_batches"] += 1
        yield batch


def _print_answer(r: Rollout, tokenizer) -> None:
    n = int(r.action_mask[0].sum())
    prompt = tokenizer.decode(r.sequences[0, :r.prompt_len], skip_special_tokens=True)
    answer = tokenizer.decode(r.responses[0, :n], skip_special_tokens=True)
    print0(f"--- prompt: {prompt[-300:]!r}\n--- answer: {answer!r}\n--- score: {r.scores[0].item():.3f}")
