"""The pairwise (Bradley-Terry) reward-model loss and accuracy: pure functions of end scores."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_losses(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: float | torch.Tensor = 0.0,
                    center_coef: float = 0.0) -> torch.Tensor:
    """chosen_scores, rejected_scores (B,) -> per-pair losses (B,), fp32:
    -logsigmoid(c - r - margin) + center_coef * (c + r)^2.

    fp32 whatever the inputs' dtype: a bf16 difference of two scores near 3 already loses a tenth.
    `margin` is a float or a (B,) tensor (per-pair margins, as in Llama 2's reward models).
    """
    if chosen_scores.shape != rejected_scores.shape or chosen_scores.dim() != 1:
        raise ValueError(f"expected two (B,) score tensors, got {tuple(chosen_scores.shape)} and "
                         f"{tuple(rejected_scores.shape)}")
    c, r = chosen_scores.float(), rejected_scores.float()
    losses = -F.logsigmoid(c - r - margin)
    if center_coef:
        # TRL's center_rewards_coefficient: without it only differences are trained and scores may drift.
        losses = losses + center_coef * (c + r) ** 2
    return losses


def pairwise_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: float | torch.Tensor = 0.0,
                  center_coef: float = 0.0) -> torch.Tensor:
    """(B,), (B,) -> scalar fp32: the mean of `pairwise_losses`, i.e.
    -logsigmoid(c - r - margin).mean() + center_coef * mean((c + r)^2)."""
    return pairwise_losses(chosen_scores, rejected_scores, margin, center_coef).mean()


def fit_length_slope(length_diff: torch.Tensor, iters: int = 50) -> float:
    """length_diff (N,): rejected minus chosen answer length, one per training pair -> s, the maximum-likelihood
    slope of P(chosen wins) = sigmoid(s * length_diff), no intercept (a pair's order is arbitrary).

    s > 0: the data prefers the shorter answer. This is length alone as a one-parameter preference model (the
    bias-only expert of product-of-experts debiasing); `length_margins` turns it into per-pair margins. Newton's
    method in float64 (the log-likelihood is concave in s); 0 for no pairs or all-equal lengths. Separable data
    (length alone orders every pair) has no finite optimum: refused.
    """
    x = length_diff.double().flatten()
    x = x[x != 0]
    if x.numel() == 0:
        return 0.0
    if bool((x > 0).all() or (x < 0).all()):
        raise ValueError(f"length alone orders all {x.numel()} pairs of unequal length: the length slope has no "
                         "finite fit (--length_debias needs pairs where the longer answer wins and where it loses)")
    s = torch.zeros((), dtype=torch.float64)
    for _ in range(iters):
        p = torch.sigmoid(s * x)
        grad, hess = ((1 - p) * x).sum(), (p * (1 - p) * x * x).sum()
        step = grad / hess
        s = s + step
        if step.abs() < 1e-12 * max(1.0, float(s.abs())):
            break
    if not torch.isfinite(s):
        raise ValueError(f"the length slope over {x.numel()} pairs did not converge (--length_debias)")
    return float(s)


def length_margins(slope: float, chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor) -> torch.Tensor:
    """(B,), (B,) answer lengths -> (B,) margins for `pairwise_losses`: slope * (chosen - rejected).

    With them the loss is -logsigmoid((c - r) + slope * (rejected - chosen length)): the reward model's
    difference is added to what length alone predicts, so the model is trained on what length does not explain.
    """
    return slope * (chosen_lengths.float() - rejected_lengths.float())


def pairwise_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """(B,), (B,) -> scalar fp32: the share of pairs whose chosen score is strictly higher (a tie counts as wrong)."""
    return (chosen_scores.float() > rejected_scores.float()).float().mean()
