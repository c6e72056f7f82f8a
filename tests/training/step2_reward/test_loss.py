"""The pairwise loss and accuracy against values computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

from chatrlhf.training.step2_reward.loss import (fit_length_slope, length_margins, pairwise_accuracy, pairwise_loss,
                                                 pairwise_losses)


def nll(x: float) -> float:
    """-log(sigmoid(x)) by hand."""
    return math.log(1.0 + math.exp(-x))


def test_loss_is_the_mean_negative_log_sigmoid_of_the_difference():
    c, r = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 1.0])
    expected = (nll(1.0) + nll(0.0) + nll(-2.0)) / 3  # 0.3133 + 0.6931 + 2.1269
    assert pairwise_loss(c, r).item() == pytest.approx(expected, rel=1e-6)
    assert nll(0.0) == pytest.approx(math.log(2))


def test_margin_shifts_the_difference():
    c, r = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 0.0])
    expected = (nll(2.0 - 1.0 - 0.5) + nll(0.5 - 0.0 - 0.5)) / 2
    assert pairwise_loss(c, r, margin=0.5).item() == pytest.approx(expected, rel=1e-6)
    # per-pair margins (Llama 2 style) as a tensor
    per_pair = pairwise_losses(c, r, margin=torch.tensor([1.0, 0.0]))
    assert per_pair.tolist() == pytest.approx([nll(0.0), nll(0.5)], rel=1e-6)


def test_centring_penalty_is_coef_times_mean_squared_sum():
    c, r = torch.tensor([3.0, -1.0]), torch.tensor([1.0, -2.0])
    base = (nll(2.0) + nll(1.0)) / 2
    centring = 0.01 * ((3.0 + 1.0) ** 2 + (-1.0 - 2.0) ** 2) / 2  # 0.01 * (16 + 9) / 2 = 0.125
    assert pairwise_loss(c, r, center_coef=0.01).item() == pytest.approx(base + centring, rel=1e-6)
    assert pairwise_loss(c, r, margin=1.0, center_coef=0.01).item() == pytest.approx(
        (nll(1.0) + nll(0.0)) / 2 + centring, rel=1e-6)


def test_loss_is_fp32_for_bf16_scores_and_does_not_overflow():
    c = torch.tensor([3.0, 100.0, -100.0], dtype=torch.bfloat16, requires_grad=True)
    r = torch.tensor([2.984375, -100.0, 100.0], dtype=torch.bfloat16)
    losses = pairwise_losses(c, r)
    assert losses.dtype == torch.float32
    assert losses.tolist() == pytest.approx([nll(0.015625), 0.0, 200.0], rel=1e-5, abs=1e-6)
    losses.mean().backward()
    assert torch.isfinite(c.grad.float()).all()


def test_gradient_pushes_chosen_up_and_rejected_down():
    c, r = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    pairwise_loss(c, r).backward()
    # d/dc of -logsigmoid(c - r) at 0 is -1/2, averaged over 2 pairs.
    assert c.grad.tolist() == pytest.approx([-0.25, -0.25])
    assert r.grad.tolist() == pytest.approx([0.25, 0.25])


def test_accuracy_counts_strict_wins_only():
    c = torch.tensor([1.0, 0.0, 2.0, -1.0])
    r = torch.tensor([0.0, 0.0, 3.0, -2.0])
    assert pairwise_accuracy(c, r).item() == pytest.approx(0.5)  # wins: 1st and 4th; a tie is a loss


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="score tensors"):
        pairwise_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="score tensors"):
        pairwise_loss(torch.zeros(3, 1), torch.zeros(3, 1))


def test_length_slope_is_the_logistic_fit_of_length_alone():
    # The shorter answer (rejected longer by 1 token) wins 3 pairs of 4: sigmoid(s) = 3/4, s = log 3.
    assert fit_length_slope(torch.tensor([1.0, 1.0, 1.0, -1.0])) == pytest.approx(math.log(3), rel=1e-9)
    # Twice the length differences, half the slope; pairs of equal length carry no information.
    assert fit_length_slope(torch.tensor([2.0, 2.0, 2.0, -2.0, 0.0])) == pytest.approx(math.log(3) / 2, rel=1e-9)
    # The longer answer wins 3 of 4: the slope is negative.
    assert fit_length_slope(torch.tensor([-1.0, -1.0, -1.0, 1.0])) == pytest.approx(-math.log(3), rel=1e-9)
    # Uneven differences: the fit is where the log-likelihood's derivative sum((1 - sigmoid(s x)) x) is zero.
    x = torch.tensor([3.0, 7.0, -2.0, 1.0, -5.0, 4.0], dtype=torch.float64)
    s = fit_length_slope(x)
    assert ((1 - torch.sigmoid(s * x)) * x).sum().item() == pytest.approx(0.0, abs=1e-9)
    assert fit_length_slope(torch.tensor([])) == 0.0 and fit_length_slope(torch.zeros(3)) == 0.0


def test_length_slope_refuses_pairs_that_length_alone_orders():
    with pytest.raises(ValueError, match="length alone orders all 3 pairs"):
        fit_length_slope(torch.tensor([1.0, 4.0, 0.0, 2.0]))


def test_length_margins_put_length_alone_next_to_the_reward_difference():
    c, r = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])
    lc, lr = torch.tensor([10, 30]), torch.tensor([20, 10])
    s = 0.05
    # -logsigmoid((c - r) + s * (rejected - chosen length)): +0.5 for the shorter chosen, -1.0 for the longer
    expected = [nll(0.5 + 0.5), nll(-0.5 - 1.0)]
    assert length_margins(s, lc, lr).tolist() == pytest.approx([-0.5, 1.0])
    assert pairwise_losses(c, r, margin=length_margins(s, lc, lr)).tolist() == pytest.approx(expected, rel=1e-6)
