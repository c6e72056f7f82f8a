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


def pairwise_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """(B,), (B,) -> scalar fp32: the share of pairs whose chosen score is strictly higher (a tie counts as wrong)."""
    return (chosen_scores.float() > rejected_scores.float()).float().mean()
