"""DPO's losses (sigmoid, cDPO, IPO, SimPO), log-probabilities and KL against values computed by hand."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from chatrlhf.training.step2_dpo.loss import (LOSS_TYPES, cdpo_losses, ipo_losses, preference_losses, sequence_logprobs,
                                              simpo_losses, token_kl, token_logprobs, wins)


def nll(x: float) -> float:
    """-log(sigmoid(x)) by hand."""
    return math.log(1.0 + math.exp(-x))


# Two pairs: policy chosen/rejected and reference chosen/rejected summed log-probabilities.
PC, PR = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
RC, RR = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
# h = (pc - rc) - (pr - rr) = [1 - (-1), 0 - 1] = [2, -1]


def test_sigmoid_is_dpo_on_the_difference_of_log_ratios():
    losses, chosen, rejected = preference_losses("sigmoid", PC, PR, RC, RR, beta=0.1)
    assert losses.tolist() == pytest.approx([nll(0.2), nll(-0.1)], rel=1e-6)  # 0.5981, 0.7444
    assert chosen.tolist() == pytest.approx([0.1, 0.0]) and rejected.tolist() == pytest.approx([-0.1, 0.1])
    # beta scales the log-ratio before the sigmoid
    assert preference_losses("sigmoid", PC, PR, RC, RR, beta=0.5)[0].tolist() == pytest.approx([nll(1.0), nll(-0.5)])


def test_label_smoothing_is_deepspeed_chats_conservative_loss_and_cdpo():
    e = 0.1
    expected = [(1 - e) * nll(0.2) + e * nll(-0.2), (1 - e) * nll(-0.1) + e * nll(0.1)]
    smoothed = preference_losses("sigmoid", PC, PR, RC, RR, beta=0.1, label_smoothing=e)[0]
    assert smoothed.tolist() == pytest.approx(expected, rel=1e-6)
    assert preference_losses("cdpo", PC, PR, RC, RR, beta=0.1, label_smoothing=e)[0].tolist() == pytest.approx(
        expected, rel=1e-6)
    # DeepSpeed-Chat's expression, written out
    logits = 0.1 * torch.tensor([2.0, -1.0])
    dschat = -F.logsigmoid(logits) * (1 - e) - F.logsigmoid(-logits) * e
    torch.testing.assert_close(smoothed, dschat)
    with pytest.raises(ValueError, match="label_smoothing"):
        cdpo_losses(torch.zeros(2), 0.1, 0.0)


def test_ipo_is_the_squared_distance_of_h_to_one_over_two_beta():
    losses, chosen, _ = preference_losses("ipo", PC, PR, RC, RR, beta=0.1)
    assert losses.tolist() == pytest.approx([(2 - 5) ** 2, (-1 - 5) ** 2])  # 9, 36
    assert chosen.tolist() == pytest.approx([0.1, 0.0])
    assert ipo_losses(torch.tensor([1.0]), beta=0.5).item() == pytest.approx(0.0)  # h = 1 / (2 beta): minimum


def test_simpo_is_reference_free_length_normalised_with_a_margin():
    mean_c, mean_r = torch.tensor([-0.5, -2.0]), torch.tensor([-1.0, -1.0])
    losses, chosen, rejected = preference_losses("simpo", mean_c, mean_r, RC, RR, beta=2.0, simpo_gamma=0.5)
    # beta * (mean_c - mean_r) - gamma = [2 * 0.5 - 0.5, 2 * (-1) - 0.5] = [0.5, -2.5]; the reference is ignored
    assert losses.tolist() == pytest.approx([nll(0.5), nll(-2.5)], rel=1e-6)
    assert chosen.tolist() == pytest.approx([-1.0, -4.0]) and rejected.tolist() == pytest.approx([-2.0, -2.0])
    assert simpo_losses(mean_c, mean_r, 2.0, 0.5, 0.2).tolist() == pytest.approx(
        [0.8 * nll(0.5) + 0.2 * nll(-0.5), 0.8 * nll(-2.5) + 0.2 * nll(2.5)], rel=1e-6)


def test_reference_free_is_a_reference_of_log_probability_zero():
    free = preference_losses("sigmoid", PC, PR, beta=0.1)
    zero = preference_losses("sigmoid", PC, PR, torch.zeros(2), torch.zeros(2), beta=0.1)
    for a, b in zip(free, zero):
        torch.testing.assert_close(a, b)
    assert free[0].tolist() == pytest.approx([nll(0.1 * 2.0), nll(0.1 * -1.0)])  # pc - pr = [2, -1]


def test_gradient_at_the_start_pushes_chosen_up_and_rejected_down():
    pc, pr = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    losses, _, _ = preference_losses("sigmoid", pc, pr, torch.zeros(2), torch.zeros(2), beta=0.1)
    assert losses.tolist() == pytest.approx([math.log(2)] * 2)
    losses.mean().backward()
    # d/dpc of -logsigmoid(beta h) at h = 0 is -beta / 2, averaged over 2 pairs
    assert pc.grad.tolist() == pytest.approx([-0.025, -0.025]) and pr.grad.tolist() == pytest.approx([0.025, 0.025])


def test_losses_are_fp32_for_bf16_inputs_and_checked():
    bf = lambda t: t.to(torch.bfloat16)  # noqa: E731
    for loss_type in LOSS_TYPES:
        out = preference_losses(loss_type, bf(PC), bf(PR), bf(RC), bf(RR), beta=0.1, label_smoothing=0.1 * (
            loss_type != "ipo"))
        assert all(t.dtype == torch.float32 for t in out) and torch.isfinite(out[0]).all()
    with pytest.raises(ValueError, match="unknown loss_type"):
        preference_losses("kto", PC, PR)
    with pytest.raises(ValueError, match="log-probability tensors"):
        preference_losses("sigmoid", torch.zeros(3), torch.zeros(2))


def test_token_and_sequence_logprobs_by_hand():
    # One row, vocabulary of 3: logits at positions 0 and 1 predict tokens 1 and 2.
    logits = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]])
    ids = torch.tensor([[0, 2, 1]])
    lp = token_logprobs(logits, ids)
    norm = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    assert lp.tolist()[0] == pytest.approx([math.log(1 / 3), 2.0 - norm])
    mask = torch.tensor([[0, 1, 1]])  # the answer is tokens 1 and 2
    assert sequence_logprobs(lp, mask).item() == pytest.approx(math.log(1 / 3) + 2.0 - norm)
    assert sequence_logprobs(lp, mask, average=True).item() == pytest.approx((math.log(1 / 3) + 2.0 - norm) / 2)
    assert sequence_logprobs(lp, torch.tensor([[0, 0, 1]])).item() == pytest.approx(2.0 - norm)  # shift by one
    assert lp.dtype == torch.float32 and token_logprobs(logits.bfloat16(), ids).dtype == torch.float32


def test_token_kl_by_hand():
    p = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.3, 0.7]]]))
    q = torch.log(torch.tensor([[[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]]))
    kl_pos0 = 0.0
    kl_pos1 = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    mask = torch.tensor([[0, 1, 1]])  # tokens 1, 2 are predicted at positions 0, 1
    assert token_kl(p, q, mask).item() == pytest.approx(kl_pos0 + kl_pos1, rel=1e-5)
    assert token_kl(p, p, mask).item() == pytest.approx(0.0, abs=1e-7)
    assert token_kl(p, q, torch.tensor([[0, 0, 1]])).item() == pytest.approx(kl_pos1, rel=1e-5)


def test_wins_count_ties_half():
    assert wins(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])).tolist() == [1.0, 0.5, 0.0]
