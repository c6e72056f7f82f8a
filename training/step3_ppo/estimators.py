"""Advantage estimators: one function each over a `core.AdvantageInputs` record, registered by name in
`core.ADVANTAGE_ESTIMATORS` (this module imports nothing but torch; importing core imports it).

gae needs a critic. The others need none: a sequence's baseline is the other answers to its prompt (its group,
--n_samples_per_prompt answers sharing one `group` index) or nothing (reinforce_pp, whitened over the rollout).
Each turns the scores into adjusted scores, puts them where the score was (the last counted token, next to the
per-token KL penalty when the KL is in the reward) and takes the reward-to-go as every token's advantage [RPP];
with the KL in the loss and gamma 1 that is the adjusted score on every counted token.

A new estimator: a function (AdvantageInputs) -> (advantages (B, T), returns (B, T)) with
`@register_estimator("name", needs_critic=..., needs_groups=..., whiten=..., loss_agg=...)` here, and a test in
tests/training/step3_ppo/test_estimators.py against hand-computed numbers.

References (besides core's):
  [GRPO]   Shao et al. 2024, DeepSeekMath, https://arxiv.org/abs/2402.03300
  [DRGRPO] Liu et al. 2025, Understanding R1-Zero-Like Training, https://arxiv.org/abs/2503.20783
  [RLOO]   Ahmadian et al. 2024, Back to Basics: Revisiting REINFORCE, https://arxiv.org/abs/2402.14740
  [RPP]    Hu 2025, REINFORCE++, https://arxiv.org/abs/2501.03262
"""
from __future__ import annotations

import torch

from chatrlhf.training.step3_ppo.core import AdvantageInputs, place_at_last, register_estimator

Tensor = torch.Tensor
GROUP_STD_EPS = 1e-6  # a group whose answers all score the same gets advantage 0, not 0/0


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, action_mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation: (B, T) x3 -> (advantages (B, T), returns (B, T)), no grad [GAE].

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};  returns = A + V.
    Masked positions are skipped as if absent, so after the last valid token V = 0 and A = 0 (the episode
    ends at EOS). Advantages and returns are 0 outside action_mask.
    """
    mask = action_mask.bool()
    rewards, values = rewards.float(), values.float()
    zero = torch.zeros_like(values[:, 0])
    next_value, next_adv = zero, zero
    advantages_reversed = []
    for t in reversed(range(rewards.shape[1])):
        valid = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        # A masked position passes the next valid token's value/advantage through unchanged.
        next_value = torch.where(valid, values[:, t], next_value)
        next_adv = torch.where(valid, adv, next_adv)
        advantages_reversed.append(torch.where(valid, adv, zero))
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    return advantages, returns


@torch.no_grad()
def discounted_returns(rewards: Tensor, action_mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Reward-to-go: (B, T) x2 -> (B, T), G_t = r_t + gamma * G_{t+1} over the valid positions (masked ones are
    skipped as if absent, as in `gae`), 0 outside action_mask. GAE with V = 0 and lam = 1."""
    mask = action_mask.bool()
    rewards = rewards.float()
    running = torch.zeros_like(rewards[:, 0])
    out = []
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t], rewards[:, t] + gamma * running, running)
        out.append(torch.where(mask[:, t], running, torch.zeros_like(running)))
    return torch.stack(out[::-1], dim=1) if out else torch.zeros_like(rewards)


@torch.no_grad()
def group_moments(scores: Tensor, group: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each row's group mean, unbiased std (0 for a group of one) and size: (B,), (B,) -> (B,) x3."""
    scores = scores.float()
    _, index = torch.unique(group, return_inverse=True)
    zeros = torch.zeros(int(index.max()) + 1 if index.numel() else 0, dtype=scores.dtype, device=scores.device)
    count = zeros.index_add(0, index, torch.ones_like(scores))
    mean = zeros.index_add(0, index, scores) / count
    square = zeros.index_add(0, index, (scores - mean[index]) ** 2)
    std = torch.where(count > 1, (square / (count - 1).clamp_min(1)).sqrt(), torch.zeros_like(count))
    return mean[index], std[index], count[index]


def outcome_advantages(x: AdvantageInputs, adjusted: Tensor) -> tuple[Tensor, Tensor]:
    """(advantages, returns), both the reward-to-go of x.rewards with each row's score replaced by `adjusted` (B,)."""
    shaped = x.rewards.float() + place_at_last(adjusted.float() - x.scores.float(), x.action_mask)
    returns = discounted_returns(shaped, x.action_mask, x.config.gamma)
    return returns, returns


# --------------------------------------------------------------------------- the registered estimators

@register_estimator("gae", needs_critic=True, whiten=True)
def gae_estimator(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """PPO's: GAE over the KL-shaped rewards and the critic's values [GAE]."""
    return gae(x.rewards, x.values, x.action_mask, x.config.gamma, x.config.lam)


@register_estimator("grpo", needs_groups=True)
def grpo(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """Group-normalised score: (s - mean_group) / (std_group + eps), std unbiased [GRPO, outcome supervision]."""
    mean, std, _ = group_moments(x.scores, x.group)
    return outcome_advantages(x, (x.scores - mean) / (std + GROUP_STD_EPS))


@register_estimator("dr_grpo", needs_groups=True, loss_agg="seq_mean_token_sum_norm")
def dr_grpo(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """Dr. GRPO: s - mean_group (no std: it favours groups of near-equal scores); its loss default sums each
    answer's tokens over a constant length (--max_answer_seq_len), without a per-answer length [DRGRPO]."""
    mean, _, _ = group_moments(x.scores, x.group)
    return outcome_advantages(x, x.scores - mean)


@register_estimator("rloo", needs_groups=True)
def rloo(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """REINFORCE leave-one-out: s_i - mean of the other answers' scores = n / (n - 1) * (s_i - mean) [RLOO]."""
    mean, _, count = group_moments(x.scores, x.group)
    others = torch.where(count > 1, (mean * count - x.scores) / (count - 1).clamp_min(1), torch.zeros_like(mean))
    return outcome_advantages(x, x.scores - others)


@register_estimator("reinforce_pp", whiten=True)
def reinforce_pp(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """REINFORCE++: the token-level reward-to-go of the KL-shaped rewards, whitened over the whole rollout (every
    rank) by the trainer [RPP]."""
    returns = discounted_returns(x.rewards, x.action_mask, x.config.gamma)
    return returns, returns


@register_estimator("reinforce_pp_baseline", needs_groups=True, whiten=True)
def reinforce_pp_baseline(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """REINFORCE++-baseline: the group mean subtracted from each score first, then as reinforce_pp [RPP]."""
    mean, _, _ = group_moments(x.scores, x.group)
    return outcome_advantages(x, x.scores - mean)
