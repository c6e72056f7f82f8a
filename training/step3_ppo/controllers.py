"""The PPO state that lives across rollouts: the KL coefficient's controllers and the running score moments
(plain Python and torch; imports nothing else).

References: [ZIEG] Ziegler et al. 2019, Fine-Tuning LMs from Human Preferences, https://arxiv.org/abs/1909.08593
"""
from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


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
        self.merge(n_b, mean_b, m2_b)
        return mean_b, math.sqrt(m2_b / (n_b - 1)) if n_b > 1 else 0.0

    def merge(self, n_b: float, mean_b: float, m2_b: float) -> None:
        """Merge a batch given by its count, mean and sum of squared deviations (e.g. every rank's, all-reduced)."""
        if n_b <= 0:
            raise ValueError("RunningMoments.merge got an empty batch")
        delta, total = mean_b - self.mean, self.count + int(n_b)
        self.mean += delta * n_b / total
        self.m2 += m2_b + delta**2 * self.count * n_b / total
        self.count = total

    def state_dict(self) -> dict:
        return {"mean": self.mean, "m2": self.m2, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.m2, self.count = float(state["mean"]), float(state["m2"]), int(state["count"])


def normalize_scores(scores: Tensor, mean: float, std: float, eps: float = 1e-8) -> Tensor:
    """(B,) -> (B,): (scores - mean) / (std + eps), e.g. with a RunningMoments' mean and std."""
    return (scores - mean) / (std + eps)
