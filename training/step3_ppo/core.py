"""The PPO algorithm as small pure functions over tensors (imports nothing but torch).

Shapes: B sequences, T response tokens (the trainer slices the response region), V vocabulary.
`action_mask` is (B, T), bool or 0/1 float, 1 on response tokens that count; positions after EOS are 0,
so rows may be ragged, e.g. [1, 1, 1, 0, 0]. Masked positions may hold anything (even inf/nan): every
function selects with `torch.where` instead of multiplying by the mask, so garbage never leaks.

References:
  [PPO]   Schulman et al. 2017, Proximal Policy Optimization Algorithms, https://arxiv.org/abs/1707.06347
  [GAE]   Schulman et al. 2016, High-Dimensional Continuous Control Using GAE, https://arxiv.org/abs/1506.02438
  [ZIEG]  Ziegler et al. 2019, Fine-Tuning LMs from Human Preferences, https://arxiv.org/abs/1909.08593
  [LMHP]  lm-human-preference-details, https://iclr-blog-track.github.io/2022/03/25/ppo-implementation-details/
  [KLAPX] Schulman, Approximating KL Divergence, http://joschu.net/blog/kl-approx.html
"""
from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


# --------------------------------------------------------------------------- logits -> per-token quantities

def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of each chosen token: (B, T, V), (B, T) -> (B, T), fp32.

    logp[b, t] = z[b, t, tokens[b, t]] - logsumexp(z[b, t]),  z = logits / temperature.
    The temperature must match the one used for sampling, or the ratio to the behaviour policy is off [LMHP].
    """
    out = []
    for row_logits, row_tokens in zip(logits, tokens):
        # One row at a time: the fp32 copy is (T, V) instead of (B, T, V), and no full log_softmax is stored.
        z = row_logits.float() / temperature
        picked = z.gather(-1, row_tokens.long().unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(z, dim=-1))
    return torch.stack(out)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of the next-token distribution: (B, T, V) -> (B, T), fp32.

    H = logsumexp(z) - sum_v softmax(z)_v * z_v,  z = logits / temperature.
    """
    out = []
    for row_logits in logits:  # row by row for the same memory reason as logprobs_from_logits
        z = row_logits.float() / temperature
        logz = torch.logsumexp(z, dim=-1, keepdim=True)
        out.append((logz - ((z - logz).exp() * z).sum(-1, keepdim=True)).squeeze(-1))
    return torch.stack(out)


# --------------------------------------------------------------------------- masked statistics

def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of x over positions where mask is set: (...), (...) -> scalar, or reduced over `dim`."""
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over positions where mask is set: sum(x * m) / max(sum(m), 1).

    An all-zero mask gives 0 rather than nan, so an empty micro-batch contributes nothing to a loss.
    """
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp_min(1).to(x.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = False) -> Tensor:
    """Variance of x over all masked positions: scalar, mean((x - mean(x))^2); Bessel-corrected if unbiased."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = int(mask.bool().sum())
        if n < 2:
            raise ValueError(f"masked_var(unbiased=True) needs at least 2 valid positions, got {n}")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise x to mean 0 / variance 1 over the valid positions: (B, T) -> (B, T), masked-out positions 0.

    w = (x - mean) / sqrt(var + eps), plus mean again if not shift_mean (scale only) [LMHP].
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


# --------------------------------------------------------------------------- KL and reward shaping

def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = logp - ref_logp: unbiased for KL(pi || ref) under samples from pi, high variance, can be < 0 [KLAPX]."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = 0.5 * (logp - ref_logp)^2: biased but low variance, always >= 0 [KLAPX]."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = exp(ref - logp) - 1 - (ref - logp): unbiased and always >= 0 (since e^x >= 1 + x) [KLAPX]."""
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Per-token KL(pi || ref) estimate: (B, T), (B, T) -> (B, T); `kind` is a key of KL_ESTIMATORS [KLAPX]."""
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator kind {kind!r}; expected one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[kind](logprobs, ref_logprobs)


@torch.no_grad()
def shape_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    action_mask: Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
    score_clip: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token rewards from sequence scores and a KL penalty: (B,), (B, T) x3 -> ((B, T), (B, T)).

    rewards[b, t] = -kl_coef * kl[b, t] + [t == last valid t of row b] * clip(scores[b], +-score_clip) [ZIEG].
    Returns (rewards, non_score_rewards); both are 0 outside action_mask, and a row with no valid token
    gets no score at all. The reward model scored the EOS token, which is the last valid action [LMHP].
    """
    mask = action_mask.bool()
    kl = kl_estimate(logprobs.float(), ref_logprobs.float(), kl_estimator)
    non_score_rewards = torch.where(mask, -kl_coef * kl, torch.zeros_like(kl))
    scores = scores.to(non_score_rewards.dtype)
    if score_clip is not None:
        scores = scores.clamp(-score_clip, score_clip)
    # Index of the last set position per row (-1 for an empty row), without a Python loop over the batch.
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=1).values
    score_part = torch.zeros_like(non_score_rewards)
    score_part.scatter_(1, last.clamp_min(0).unsqueeze(1), torch.where(last >= 0, scores, 0.0).unsqueeze(1))
    return non_score_rewards + score_part, non_score_rewards


# --------------------------------------------------------------------------- advantages

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


# --------------------------------------------------------------------------- losses

def aggregate_loss(per_token: Tensor, action_mask: Tensor, loss_agg: str = "token_mean") -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar.

    token_mean: sum over valid tokens / number of valid tokens (every token weighs the same).
    seq_mean:   mean over non-empty sequences of each sequence's token mean (every sequence weighs the same).
    """
    if loss_agg == "token_mean":
        return masked_mean(per_token, action_mask)
    if loss_agg == "seq_mean":
        return masked_mean(masked_mean(per_token, action_mask, dim=-1), action_mask.bool().any(dim=-1))
    raise ValueError(f"unknown loss_agg {loss_agg!r}; expected 'token_mean' or 'seq_mean'")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    action_mask: Tensor,
    clip: float,
    loss_agg: str = "token_mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate: (B, T) x4 -> (scalar loss, stats) [PPO eq. 7].

    loss = agg(max(-A * r, -A * clip(r, 1 - clip, 1 + clip))),  r = exp(logprobs - old_logprobs).
    stats (detached scalars): clipfrac (share of valid tokens where the clipped term is the max, so no
    gradient flows), approx_kl (masked mean of k2 = 0.5 * (logp - old_logp)^2 [KLAPX]), ratio_mean.
    """
    mask = action_mask.bool()
    # Zero the log-ratio on padding first: exp of garbage there could overflow and poison the gradient.
    log_ratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = aggregate_loss(torch.maximum(unclipped, clipped), mask, loss_agg)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    action_mask: Tensor,
    clip: float | None,
    loss_agg: str = "token_mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss: (B, T) x4 -> (scalar loss, stats) [LMHP, "value function loss clipping"].

    loss = 0.5 * agg(max((V - R)^2, (clamp(V, V_old - clip, V_old + clip) - R)^2)); clip=None: 0.5 * agg((V - R)^2).
    stats: vf_clipfrac, the share of valid tokens where the clipped term is the max.
    """
    mask = action_mask.bool()
    unclipped = (values - returns) ** 2
    if clip is None:
        per_token, clipped_active = unclipped, torch.zeros_like(unclipped)
    else:
        # Stay within `clip` of the value the rollout saw, as the policy ratio stays within 1 +- clip.
        values_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        clipped = (values_clipped - returns) ** 2
        per_token, clipped_active = torch.maximum(unclipped, clipped), (clipped > unclipped).float()
    loss = 0.5 * aggregate_loss(per_token, mask, loss_agg)
    return loss, {"vf_clipfrac": masked_mean(clipped_active.detach(), mask)}


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, action_mask: Tensor) -> Tensor:
    """How well values predict returns over valid tokens: (B, T) x3 -> scalar, 1 - var(R - V) / var(R).

    1 is perfect, 0 is no better than a constant, < 0 is worse; nan when the returns have no variance.
    """
    var_returns = masked_var(returns.float(), action_mask)
    if var_returns == 0:
        return torch.tensor(float("nan"), device=returns.device)
    return 1.0 - masked_var(returns.float() - values.float(), action_mask) / var_returns


# --------------------------------------------------------------------------- KL coefficient controllers

class FixedKLController:
    """A constant KL coefficient; `update` is a no-op so the trainer can treat both controllers alike."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass  # fixed by definition

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Steers the KL coefficient so the observed KL tracks `target` [ZIEG, section 2.2].

    e = clip(current_kl / target - 1, -0.2, 0.2);  value *= 1 + e * n_steps / horizon.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController needs target > 0 and horizon > 0, got {target=}, {horizon=}")
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        # Only the learned coefficient: target and horizon come from the (possibly edited) config on resume.
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


# --------------------------------------------------------------------------- score normalisation

class RunningMoments:
    """Running mean and (unbiased) std of every score seen, merged batch by batch.

    Chan et al.'s parallel update: with delta = mean_b - mean and n = count + n_b,
    mean += delta * n_b / n;  M2 += M2_b + delta^2 * count * n_b / n.  Kept in Python floats (float64).
    """

    def __init__(self):
        self.mean, self.m2, self.count = 0.0, 0.0, 0

    @property
    def std(self) -> float:
        # Before two samples the spread is unknown; 1.0 makes normalisation a pure shift.
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    @torch.no_grad()
    def update(self, x: Tensor) -> tuple[float, float]:
        """Merge the batch `x` (any shape); returns its own (mean, unbiased std; 0.0 for a single element)."""
        x = x.detach().double().flatten()
        n_b = x.numel()
        if n_b == 0:
            raise ValueError("RunningMoments.update got an empty tensor")
        mean_b = x.mean().item()
        m2_b = ((x - mean_b) ** 2).sum().item()
        delta, total = mean_b - self.mean, self.count + n_b
        self.mean += delta * n_b / total
        self.m2 += m2_b + delta**2 * self.count * n_b / total
        self.count = total
        return mean_b, math.sqrt(m2_b / (n_b - 1)) if n_b > 1 else 0.0

    def state_dict(self) -> dict:
        return {"mean": self.mean, "m2": self.m2, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.m2, self.count = float(state["mean"]), float(state["m2"]), int(state["count"])


def normalize_scores(scores: Tensor, mean: float, std: float, eps: float = 1e-8) -> Tensor:
    """(B,) -> (B,): (scores - mean) / (std + eps), e.g. with a RunningMoments' mean and std."""
    return (scores - mean) / (std + eps)


# --------------------------------------------------------------------------- registries (config name -> function)

ADVANTAGE_ESTIMATORS = {"gae": gae}  # (rewards, values, action_mask, gamma, lam) -> (advantages, returns)
POLICY_LOSSES = {"clip": policy_loss}  # (logprobs, old_logprobs, advantages, action_mask, clip, loss_agg)
KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}  # (logprobs, ref_logprobs) -> per-token KL
