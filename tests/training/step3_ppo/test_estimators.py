"""Advantage estimators (chatrlhf.training.step3_ppo.estimators) against hand-computed advantages on small groups,
the KL-in-the-loss gradient against a reference implementation, and the loss pieces the critic-free runs use."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from chatrlhf.training.step3_ppo import core
from chatrlhf.training.step3_ppo.controllers import RunningMoments
from chatrlhf.training.step3_ppo.core import ADVANTAGE_ESTIMATORS, AdvantageInputs, aggregate_loss, kl_penalty
from chatrlhf.training.step3_ppo.estimators import discounted_returns, group_moments

EPS = 1e-6
# Five answers: group 7 holds three (scores 1, 0, 2), group 9 two that scored alike (3, 3).
SCORES = torch.tensor([1.0, 0.0, 2.0, 3.0, 3.0])
GROUP = torch.tensor([7, 7, 7, 9, 9])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 0, 0]])


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), atol=atol, rtol=0)


def inputs(kl_per_token: float = 0.0, gamma: float = 1.0, values=None) -> AdvantageInputs:
    """The record the trainer builds: the score at each row's last token, -kl_per_token on every counted token."""
    rewards = core.place_at_last(SCORES, MASK) - kl_per_token * MASK
    return AdvantageInputs(scores=SCORES, rewards=rewards, action_mask=MASK, group=GROUP,
                           config=SimpleNamespace(gamma=gamma, lam=0.95), values=values)


def per_row(values) -> torch.Tensor:
    """(B,) per-answer advantages on every counted token."""
    return torch.as_tensor(values, dtype=torch.float32)[:, None] * MASK


def run(name, x):
    advantages, returns = ADVANTAGE_ESTIMATORS[name](x)
    assert advantages.shape == returns.shape == MASK.shape and (advantages[MASK == 0] == 0).all()
    return advantages, returns


def test_group_moments():
    mean, std, count = group_moments(SCORES, GROUP)
    close(mean, [1, 1, 1, 3, 3])
    close(std, [1, 1, 1, 0, 0])  # unbiased: sqrt((0 + 1 + 1) / 2)
    close(count, [3, 3, 3, 2, 2])
    _, std, _ = group_moments(torch.tensor([5.0]), torch.tensor([0]))
    close(std, [0.0])  # a group of one has no spread


def test_grpo_normalises_each_group_by_its_mean_and_std():
    advantages, returns = run("grpo", inputs())
    close(advantages, per_row([0.0, -1 / (1 + EPS), 1 / (1 + EPS), 0.0, 0.0]))  # a flat group: 0, not 0/0
    close(returns, advantages)


def test_dr_grpo_subtracts_the_group_mean_only():
    advantages, _ = run("dr_grpo", inputs())
    close(advantages, per_row([0.0, -1.0, 1.0, 0.0, 0.0]))
    assert ADVANTAGE_ESTIMATORS["dr_grpo"].loss_agg == "seq_mean_token_sum_norm"


def test_rloo_leaves_each_answer_out_of_its_baseline():
    advantages, _ = run("rloo", inputs())
    # baselines: (0 + 2) / 2 = 1, (1 + 2) / 2 = 1.5, (1 + 0) / 2 = 0.5; group 9: 3 and 3.
    close(advantages, per_row([0.0, -1.5, 1.5, 0.0, 0.0]))


def test_reinforce_pp_is_the_reward_to_go_of_the_kl_shaped_reward():
    advantages, returns = run("reinforce_pp", inputs(kl_per_token=0.1))
    # row 0: rewards [-0.1, 1 - 0.1] -> [0.8, 0.9]; row 1: [-0.1, -0.1, -0.1] -> [-0.3, -0.2, -0.1]; ...
    close(returns, [[0.8, 0.9, 0], [-0.3, -0.2, -0.1], [1.9, 0, 0], [2.8, 2.9, 0], [2.9, 0, 0]])
    close(advantages, returns)  # whitened later, over every rank, by the trainer
    assert ADVANTAGE_ESTIMATORS["reinforce_pp"].whiten and not ADVANTAGE_ESTIMATORS["grpo"].whiten
    discounted, _ = run("reinforce_pp", inputs(kl_per_token=0.1, gamma=0.5))
    close(discounted[0], [-0.1 + 0.5 * 0.9, 0.9, 0])


def test_reinforce_pp_baseline_subtracts_the_group_mean_then_keeps_the_kl_per_token():
    advantages, _ = run("reinforce_pp_baseline", inputs(kl_per_token=0.1))
    # row 1 (score 0, group mean 1): rewards [-0.1, -0.1, -1 - 0.1] -> [-1.3, -1.2, -1.1]
    close(advantages[1], [-1.3, -1.2, -1.1])
    close(advantages[0], [-0.2, -0.1, 0.0])
    close(advantages[2], [1 - 0.1, 0, 0])


def test_group_estimators_with_the_kl_in_the_reward_add_its_reward_to_go():
    plain, _ = run("grpo", inputs())
    shaped, _ = run("grpo", inputs(kl_per_token=0.1))
    close(shaped - plain, [[-0.2, -0.1, 0], [-0.3, -0.2, -0.1], [-0.1, 0, 0], [-0.2, -0.1, 0], [-0.1, 0, 0]])


def test_gae_estimator_reads_values_from_the_record():
    values = torch.zeros(5, 3)
    advantages, returns = run("gae", inputs(values=values))
    # V = 0, gamma 1, lam 0.95: the score discounted by lam from the end.
    close(advantages[1], [0.0, 0.0, 0.0])
    close(advantages[0], [0.95 * 1.0, 1.0, 0.0])
    close(returns, advantages)


def test_discounted_returns_skip_masked_positions():
    rewards = torch.tensor([[1.0, 99.0, 2.0, 3.0]])
    mask = torch.tensor([[1, 0, 1, 1]])
    close(discounted_returns(rewards, mask, gamma=0.5), [[1 + 0.5 * (2 + 0.5 * 3), 0, 2 + 0.5 * 3, 3]])


def test_a_new_estimator_is_one_function_and_its_registration():
    @core.register_estimator("test_constant_one", needs_groups=True)
    def constant(x: AdvantageInputs):
        ones = x.action_mask.float()
        return ones, ones

    try:
        from chatrlhf.training.step3_ppo.config import PPOConfig
        from chatrlhf.utils.config import from_flat

        cfg = from_flat(PPOConfig, {"advantage_estimator": "test_constant_one", "n_samples_per_prompt": 2})
        assert cfg.ppo.estimator.fn is constant and not cfg.ppo.estimator.needs_critic
        with pytest.raises(ValueError, match="needs --n_samples_per_prompt >= 2"):
            from_flat(PPOConfig, {"advantage_estimator": "test_constant_one"})
        with pytest.raises(ValueError, match="already registered"):
            core.register_estimator("test_constant_one")(constant)
    finally:
        del ADVANTAGE_ESTIMATORS["test_constant_one"]


# --------------------------------------------------------------------------- the KL in the loss

def reference_k3(logprob, ref_logprob):
    """verl's `kl_penalty_forward(..., "low_var_kl")` (core_algos.py), written out: ratio - log ratio - 1."""
    kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)
    return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_in_loss_gradient_matches_a_reference_implementation(kind):
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(2, 4, generator=g) * 2).requires_grad_()
    ref = -torch.rand(2, 4, generator=g) * 2
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    ref_with_garbage = torch.where(mask.bool(), ref, torch.full_like(ref, float("nan")))  # padding never leaks
    ours = aggregate_loss(kl_penalty(logp, ref_with_garbage, mask, kind), mask, "token_mean")
    (grad,) = torch.autograd.grad(ours, logp)

    theirs_logp = logp.detach().clone().requires_grad_()
    reference = {"k1": lambda a, b: a - b, "k2": lambda a, b: 0.5 * (a - b) ** 2, "k3": reference_k3}[kind]
    theirs = (reference(theirs_logp, ref) * mask).sum() / mask.sum()
    (expected,) = torch.autograd.grad(theirs, theirs_logp)
    close(ours, theirs.detach())
    close(grad, expected)
    analytic = {"k1": torch.ones_like(ref), "k2": logp.detach() - ref, "k3": 1 - torch.exp(ref - logp.detach())}[kind]
    close(grad, analytic * mask / mask.sum())


def test_asymmetric_clip_by_hand():
    # clip_low 0.2, clip_high 0.28 (DAPO). log-ratio +1 with A > 0 is clipped at 1.28, -1 with A < 0 at 0.8.
    old = torch.zeros(1, 2)
    logp = torch.tensor([[1.0, -1.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0]])
    per_token, stats = core.policy_loss(logp, old, adv, torch.ones(1, 2), 0.2, 0.28)
    close(per_token, [[-1.28, 0.8]])
    close(stats["clipfrac"], 1.0)
    # A ratio inside [0.8, 1.28] is not clipped: e^0.2 = 1.22.
    per_token, stats = core.policy_loss(torch.tensor([[0.2]]), torch.zeros(1, 1), torch.ones(1, 1),
                                        torch.ones(1, 1), 0.2, 0.28)
    close(per_token, [[-math.exp(0.2)]])
    close(stats["clipfrac"], 0.0)


def test_running_moments_merge_equals_update():
    a, b = RunningMoments(), RunningMoments()
    x = torch.tensor([1.0, 4.0, 7.0])
    a.update(x)
    b.merge(3, 4.0, float(((x - 4) ** 2).sum()))
    assert (a.mean, a.std, a.count) == (b.mean, b.std, b.count)
