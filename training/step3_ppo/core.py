"""The PPO algorithm as small pure functions over tensors (imports nothing but torch).

Shapes: B sequences, T response tokens (the trainer slices the response region), V vocabulary.
`action_mask` is (B, T), bool or 0/1 float, 1 on response tokens that count; positions after EOS are 0,
so rows may be ragged, e.g. [1, 1, 1, 0, 0]. Masked positions may hold anything (even inf/nan): every
function selects with `torch.where` instead of multiplying by the mask, so garbage never leaks.
Losses are per token, (B, T); `aggregate_loss` reduces them. The advantage estimators (GAE and the critic-free
ones) are in `estimators.py`, registered in `ADVANTAGE_ESTIMATORS` here: importing core registers them. KL
controllers and running score moments are in `controllers.py`.

References:
  [PPO]   Schulman et al. 2017, Proximal Policy Optimization Algorithms, https://arxiv.org/abs/1707.06347
  [GAE]   Schulman et al. 2016, High-Dimensional Continuous Control Using GAE, https://arxiv.org/abs/1506.02438
  [ZIEG]  Ziegler et al. 2019, Fine-Tuning LMs from Human Preferences, https://arxiv.org/abs/1909.08593
  [LMHP]  lm-human-preference-details, https://iclr-blog-track.github.io/2022/03/25/ppo-implementation-details/
  [KLAPX] Schulman, Approximating KL Divergence, http://joschu.net/blog/kl-approx.html
  [GRPO]  Shao et al. 2024, DeepSeekMath (GRPO, KL in the loss), https://arxiv.org/abs/2402.03300
  [DRGRPO] Liu et al. 2025, Understanding R1-Zero-Like Training (Dr. GRPO), https://arxiv.org/abs/2503.20783
  [DAPO]  Yu et al. 2025, DAPO (clip-higher, token-level loss), https://arxiv.org/abs/2503.14476
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

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


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  moments: tuple[float, float] | None = None) -> Tensor:
    """Normalise x to mean 0 / variance 1 over the valid positions: (B, T) -> (B, T), masked-out positions 0.

    w = (x - mean) / sqrt(var + eps), plus mean again if not shift_mean (scale only) [LMHP]. `moments` (mean, var)
    replaces x's own, e.g. those of every rank's rollout (the trainer's global whitening).
    """
    mean, var = (masked_mean(x, mask), masked_var(x, mask)) if moments is None else moments
    whitened = (x - mean) * torch.rsqrt(torch.as_tensor(var, dtype=x.dtype, device=x.device) + eps)
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


def place_at_last(values: Tensor, action_mask: Tensor) -> Tensor:
    """(B,), (B, T) -> (B, T): values[b] at row b's last valid position, 0 elsewhere (and on empty rows)."""
    mask = action_mask.bool()
    # Index of the last set position per row (-1 for an empty row), without a Python loop over the batch.
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=1).values
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    out.scatter_(1, last.clamp_min(0).unsqueeze(1), torch.where(last >= 0, values, 0.0).unsqueeze(1))
    return out


@torch.no_grad()
def shape_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor | None,
    action_mask: Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
    score_clip: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token rewards from sequence scores and a KL penalty: (B,), (B, T) x3 -> ((B, T), (B, T)).

    rewards[b, t] = -kl_coef * kl[b, t] + [t == last valid t of row b] * clip(scores[b], +-score_clip) [ZIEG].
    Returns (rewards, non_score_rewards); both are 0 outside action_mask, and a row with no valid token
    gets no score at all. The reward model scored the EOS token, which is the last valid action [LMHP].
    `ref_logprobs` None or kl_coef 0 (no reference, or the KL in the loss): no per-token part.
    """
    mask = action_mask.bool()
    if ref_logprobs is None or kl_coef == 0:
        non_score_rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    else:
        kl = kl_estimate(logprobs.float(), ref_logprobs.float(), kl_estimator)
        non_score_rewards = torch.where(mask, -kl_coef * kl, torch.zeros_like(kl))
    scores = scores.to(non_score_rewards.dtype)
    if score_clip is not None:
        scores = scores.clamp(-score_clip, score_clip)
    return non_score_rewards + place_at_last(scores, mask), non_score_rewards


# --------------------------------------------------------------------------- losses

LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


def aggregation_count(action_mask: Tensor, loss_agg: str = "token_mean") -> Tensor:
    """What `aggregate_loss` divides by, counted in this batch: valid tokens (token_mean) or non-empty sequences."""
    mask = action_mask.bool()
    return mask.sum() if loss_agg == "token_mean" else mask.any(dim=-1).sum()


def aggregate_loss(per_token: Tensor, action_mask: Tensor, loss_agg: str = "token_mean",
                   denominator: Tensor | float | None = None, max_len: int | None = None) -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar, dividing by `denominator` D (default: this batch's own
    `aggregation_count`; the trainer passes the count of a whole optimizer step over every rank, so that each
    token or sequence weighs the same wherever it landed [DAPO]):

    token_mean:              sum of valid tokens' losses / D (tokens)
    seq_mean_token_mean:     sum over sequences of their token mean / D (sequences); "seq_mean" is its old name
    seq_mean_token_sum:      sum over sequences of their token sum / D (sequences)
    seq_mean_token_sum_norm: sum over sequences of their token sum / (D * max_len): a constant length normaliser,
                             max_len the generation budget (default T) [DRGRPO]
    """
    mask = action_mask.bool()
    loss_agg = "seq_mean_token_mean" if loss_agg == "seq_mean" else loss_agg
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; expected one of {LOSS_AGGREGATIONS}")
    if denominator is None:
        denominator = aggregation_count(mask, loss_agg).clamp_min(1)
    if loss_agg == "token_mean":
        return masked_sum(per_token, mask) / denominator
    per_seq = masked_mean(per_token, mask, dim=-1) if loss_agg == "seq_mean_token_mean" else masked_sum(per_token, mask, dim=-1)
    if loss_agg == "seq_mean_token_sum_norm":
        per_seq = per_seq / (max_len or mask.shape[1])
    return per_seq.sum() / denominator


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    action_mask: Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate per token: (B, T) x4 -> ((B, T) loss, 0 outside action_mask; stats) [PPO eq. 7].

    loss = max(-A * r, -A * clip(r, 1 - clip_low, 1 + clip_high)),  r = exp(logprobs - old_logprobs);
    clip_high > clip_low is DAPO's clip-higher [DAPO]. stats (detached scalars, means over valid tokens):
    clipfrac (share where the clipped term is the max, so no gradient flows), approx_kl (k2 = 0.5 * (logp -
    old_logp)^2 [KLAPX]), ratio_mean.
    """
    mask = action_mask.bool()
    # Zero the log-ratio on padding first: exp of garbage there could overflow and poison the gradient.
    log_ratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    advantages = torch.where(mask, advantages, torch.zeros_like(advantages))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.where(mask, torch.maximum(unclipped, clipped), torch.zeros_like(unclipped))
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return per_token, stats


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, action_mask: Tensor, kind: str = "k3") -> Tensor:
    """The KL term of the actor loss (--kl_in_loss): (B, T) x3 -> (B, T), the `kind` estimate of KL(pi || ref),
    differentiable in logprobs, 0 outside action_mask [GRPO eq. 4 uses k3]. Its gradient per token:
    k1: 1;  k2: logp - ref;  k3: 1 - exp(ref - logp)."""
    mask = action_mask.bool()
    kl = kl_estimate(logprobs, torch.where(mask, ref_logprobs, logprobs.detach()), kind)
    return torch.where(mask, kl, torch.zeros_like(kl))


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    action_mask: Tensor,
    clip: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss per token: (B, T) x4 -> ((B, T), stats) [LMHP, "value function loss clipping"].

    loss = 0.5 * max((V - R)^2, (clamp(V, V_old - clip, V_old + clip) - R)^2); clip=None: 0.5 * (V - R)^2;
    0 outside action_mask. stats: vf_clipfrac, the share of valid tokens where the clipped term is the max.
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
    per_token = torch.where(mask, 0.5 * per_token, torch.zeros_like(per_token))
    return per_token, {"vf_clipfrac": masked_mean(clipped_active.detach(), mask)}


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, action_mask: Tensor) -> Tensor:
    """How well values predict returns over valid tokens: (B, T) x3 -> scalar, 1 - var(R - V) / var(R).

    1 is perfect, 0 is no better than a constant, < 0 is worse; nan when the returns have no variance.
    """
    var_returns = masked_var(returns.float(), action_mask)
    if var_returns == 0:
        return torch.tensor(float("nan"), device=returns.device)
    return 1.0 - masked_var(returns.float() - values.float(), action_mask) / var_returns


# --------------------------------------------------------------------------- registries (config name -> function)

@dataclass
class AdvantageInputs:
    """What an advantage estimator sees of a rollout (B sequences, T response tokens)."""
    scores: Tensor                # (B,) the scores learned from: normalised, clipped, missing-EOS penalty applied
    rewards: Tensor               # (B, T) `shape_rewards`: each score at its row's last token, minus the per-token
                                  #        KL penalty when the KL is in the reward
    action_mask: Tensor           # (B, T)
    group: Tensor                 # (B,) long: the answers to one prompt share a value (--n_samples_per_prompt)
    config: Any                   # the PPO settings (PPOArgs: gamma, lam, ...)
    values: Tensor | None = None  # (B, T) critic values; None for estimators that need no critic


@dataclass(frozen=True)
class Estimator:
    """A registered estimator: fn(AdvantageInputs) -> (advantages (B, T), returns (B, T)), plus what it needs."""
    fn: Callable[[AdvantageInputs], tuple[Tensor, Tensor]]
    needs_critic: bool = False   # False: no critic is loaded, trained or saved
    needs_groups: bool = False   # needs --n_samples_per_prompt >= 2 (its baseline is the other answers)
    whiten: bool = False         # the default of --whiten_advantages
    loss_agg: str = "token_mean"  # the default of --loss_agg

    def __call__(self, inputs: AdvantageInputs) -> tuple[Tensor, Tensor]:
        return self.fn(inputs)


ADVANTAGE_ESTIMATORS: dict[str, Estimator] = {}  # filled by estimators.py (imported at the end of this module)


def register_estimator(name: str, **needs) -> Callable:
    """Decorator: registers fn(AdvantageInputs) -> (advantages, returns) as --advantage_estimator `name`;
    `needs` are Estimator's fields (needs_critic, needs_groups, whiten, loss_agg)."""
    def wrap(fn):
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name] = Estimator(fn, **needs)
        return fn
    return wrap


POLICY_LOSSES = {"clip": policy_loss}  # (logprobs, old_logprobs, advantages, action_mask, clip_low, clip_high)
KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}  # (logprobs, ref_logprobs) -> per-token KL

# At the end: estimators.py imports this module's helpers and fills ADVANTAGE_ESTIMATORS.
from chatrlhf.training.step3_ppo import estimators as _estimators  # noqa: E402,F401
