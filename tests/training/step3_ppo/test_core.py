"""PPO math in chatrlhf.training.step3_ppo.core, checked against hand-computed numbers and slow references."""
import inspect
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from chatrlhf.training.step3_ppo import core
from chatrlhf.training.step3_ppo.controllers import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    normalize_scores,
)
from chatrlhf.training.step3_ppo.core import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    aggregate_loss,
    entropy_from_logits,
    explained_variance,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    shape_rewards,
)
from chatrlhf.training.step3_ppo.core import policy_loss as policy_loss_per_token
from chatrlhf.training.step3_ppo.core import value_loss as value_loss_per_token
from chatrlhf.training.step3_ppo.estimators import gae

E = math.e
RAGGED = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])


def policy_loss(logprobs, old_logprobs, advantages, mask, clip, loss_agg="token_mean", clip_high=None):
    """The per-token surrogate aggregated as the trainer does (symmetric clip unless clip_high is given)."""
    per_token, stats = policy_loss_per_token(logprobs, old_logprobs, advantages, mask, clip,
                                             clip if clip_high is None else clip_high)
    return aggregate_loss(per_token, mask, loss_agg), stats


def value_loss(values, old_values, returns, mask, clip, loss_agg="token_mean"):
    per_token, stats = value_loss_per_token(values, old_values, returns, mask, clip)
    return aggregate_loss(per_token, mask, loss_agg), stats


def close(actual, expected, atol=1e-6):
    as64 = lambda v: torch.as_tensor(v, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(as64(actual), as64(expected), atol=atol, rtol=0)


# --------------------------------------------------------------------------- logits


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_logprobs_match_log_softmax(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 3
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    expected = torch.log_softmax(logits / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    close(logprobs_from_logits(logits, tokens, temperature), expected, atol=1e-5)


def test_logprobs_hand_values_and_fp32():
    # logits [0, log 3] -> p = [1/4, 3/4]; at temperature 2, z = [0, log(3)/2] -> p1 = sqrt3 / (1 + sqrt3).
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)]]])
    close(logprobs_from_logits(logits, torch.tensor([[0, 1]])), [[math.log(0.25), math.log(0.75)]])
    s3 = math.sqrt(3)
    expected = [[math.log(1 / (1 + s3)), math.log(s3 / (1 + s3))]]
    close(logprobs_from_logits(logits, torch.tensor([[0, 1]]), 2.0), expected)
    assert logprobs_from_logits(logits.bfloat16(), torch.tensor([[0, 1]])).dtype == torch.float32


def test_logprobs_gradient_flows():
    logits = torch.zeros(1, 1, 4, requires_grad=True)
    logprobs_from_logits(logits, torch.tensor([[2]])).sum().backward()
    close(logits.grad, [[[-0.25, -0.25, 0.75, -0.25]]])  # d log p_k / d z = onehot - p


def test_entropy():
    V = 7
    close(entropy_from_logits(torch.full((2, 3, V), 1.5)), torch.full((2, 3), math.log(V)), atol=1e-6)
    close(entropy_from_logits(torch.full((1, 2, V), 4.0), temperature=0.3), torch.full((1, 2), math.log(V)), atol=1e-5)
    # p = [1/4, 3/4]: H = -(1/4 log 1/4 + 3/4 log 3/4)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    close(entropy_from_logits(torch.tensor([[[0.0, math.log(3)]]])), [[h]])


# --------------------------------------------------------------------------- masked statistics

X = torch.tensor([[1.0, 2.0, 3.0, float("inf")], [4.0, 5.0, float("nan"), 99.0]])
XMASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # valid: 1 2 3 4 5, mean 3, var (4+1+0+1+4)/5 = 2


def test_masked_mean_var_ignore_padding():
    close(masked_sum(X, XMASK), 15.0)
    close(masked_mean(X, XMASK), 3.0)
    close(masked_mean(X, XMASK.float(), dim=-1), [2.0, 4.5])
    close(masked_sum(X, XMASK.bool(), dim=-1), [6.0, 9.0])
    close(masked_var(X, XMASK), 2.0)
    close(masked_var(X, XMASK, unbiased=True), 2.5)
    close(masked_mean(X, torch.zeros_like(XMASK)), 0.0)  # empty mask: 0, not nan
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(X, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]), unbiased=True)


def test_masked_whiten():
    valid = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    ref = (valid - valid.mean()) / np.sqrt(valid.var() + 1e-8)
    w = masked_whiten(X, XMASK)
    close(w[XMASK.bool()], ref)
    close(w[~XMASK.bool()], [0.0, 0.0, 0.0])  # padding zeroed even though it held inf/nan
    close(masked_mean(w, XMASK), 0.0)
    close(masked_var(w, XMASK), 1.0, atol=1e-6)
    kept = masked_whiten(X, XMASK, shift_mean=False)
    close(kept[XMASK.bool()], ref + 3.0)
    close(masked_mean(kept, XMASK), 3.0, atol=1e-6)


# --------------------------------------------------------------------------- KL


def test_kl_hand_values():
    # logp = log 1/2, ref = log 1/4: delta = log 2.  And the reverse: delta = -log 2.
    logp = torch.tensor([math.log(0.5), math.log(0.25)])
    ref = torch.tensor([math.log(0.25), math.log(0.5)])
    l2 = math.log(2)
    close(kl_estimate(logp, ref, "k1"), [l2, -l2])
    close(kl_estimate(logp, ref, "k2"), [0.5 * l2**2, 0.5 * l2**2])
    close(kl_estimate(logp, ref, "k3"), [0.5 - 1 + l2, 2 - 1 - l2])  # exp(ref-logp) - 1 - (ref-logp)
    close(kl_estimate(logp, ref), [l2, -l2])  # default k1


def test_k3_nonnegative_and_unknown_kind():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    assert (kl_estimate(a, b, "k3") >= 0).all() and (kl_estimate(a, b, "k2") >= 0).all()
    close(kl_estimate(a, a, "k3"), torch.zeros(1000))
    with pytest.raises(ValueError, match="k7"):
        kl_estimate(a, b, "k7")


# --------------------------------------------------------------------------- reward shaping


def test_shape_rewards_score_at_last_valid_token():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    lp = torch.randn(4, 4)
    rewards, non_score = shape_rewards(scores, lp, lp.clone(), RAGGED, kl_coef=0.1)
    expected = torch.tensor([[0, 0, 1.0, 0], [2.0, 0, 0, 0], [0, 0, 0, 3.0], [0, 0, 0, 0]])
    close(rewards, expected)
    close(non_score, torch.zeros(4, 4))


def test_shape_rewards_kl_part_and_clip():
    scores = torch.tensor([1.0, -5.0, 3.0, 4.0])
    ref = torch.zeros(4, 4)
    logp = torch.full((4, 4), 0.5)
    logp[0, 3] = 1e4  # padding: ignored
    rewards, non_score = shape_rewards(scores, logp, ref, RAGGED.float(), kl_coef=0.1, score_clip=2.5)
    kl = -0.1 * 0.5  # k1 = 0.5 per valid token
    expected_ns = RAGGED.float() * kl
    close(non_score, expected_ns)
    expected = expected_ns.clone()
    expected[0, 2] += 1.0
    expected[1, 0] += -2.5  # clipped from -5
    expected[2, 3] += 2.5  # clipped from 3
    close(rewards, expected)  # row 3 (empty mask) stays zero, score 4 dropped

    # k2 estimator: 0.5 * 0.5^2 = 0.125 per token
    _, ns2 = shape_rewards(scores, logp, ref, RAGGED, kl_coef=0.2, kl_estimator="k2")
    close(ns2, RAGGED.float() * -0.2 * 0.125)


def test_shape_rewards_no_grad():
    lp = torch.zeros(1, 3, requires_grad=True)
    rewards, _ = shape_rewards(torch.tensor([1.0]), lp, torch.zeros(1, 3), torch.ones(1, 3), kl_coef=0.1)
    assert not rewards.requires_grad


# --------------------------------------------------------------------------- GAE


def slow_gae(rewards, values, mask, gamma, lam):
    """Textbook GAE per row over the valid positions only (the trajectory), bootstrapping 0 at its end."""
    B, T = rewards.shape
    adv, ret = torch.zeros(B, T, dtype=torch.float64), torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        r = [float(rewards[b, t]) for t in idx]
        v = [float(values[b, t]) for t in idx] + [0.0]
        running = 0.0
        for k in reversed(range(len(idx))):
            running = r[k] + gamma * v[k + 1] - v[k] + gamma * lam * running
            adv[b, idx[k]] = running
            ret[b, idx[k]] = running + v[k]
    return adv, ret


@pytest.mark.parametrize("holes", [False, True])
def test_gae_matches_slow_reference(holes):
    g = torch.Generator().manual_seed(2)
    B, T = 6, 9
    lengths = torch.tensor([9, 1, 5, 0, 3, 8])
    mask = (torch.arange(T) < lengths[:, None]).float()
    if holes:
        mask = mask * (torch.rand(B, T, generator=g) > 0.3)
    rewards = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    adv, ret = gae(rewards, values, mask, gamma=0.95, lam=0.9)
    ref_adv, ref_ret = slow_gae(rewards, values, mask, 0.95, 0.9)
    close(adv, ref_adv, atol=1e-5)
    close(ret, ref_ret, atol=1e-5)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_closed_forms():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 7.0]])
    values = torch.tensor([[0.5, 1.0, 1.5, 9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0]])
    # lam = 0: one-step TD error r_t + gamma V_{t+1} - V_t, with V = 0 after the last valid token.
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.0)
    close(adv, [[1 + 0.9 * 1.0 - 0.5, 2 + 0.9 * 1.5 - 1.0, 3 - 1.5, 0.0]])
    close(ret, [[1.9, 3.35, 3.0, 0.0]])
    assert not adv.requires_grad and not ret.requires_grad
    # lam = 1, gamma = 1: reward-to-go minus V; returns = reward-to-go.
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(adv, [[6 - 0.5, 5 - 1.0, 3 - 1.5, 0.0]])
    close(ret, [[6.0, 5.0, 3.0, 0.0]])


# --------------------------------------------------------------------------- policy loss


def test_policy_loss_clip_cases_by_hand():
    # per token (clip 0.2): log-ratio, advantage -> max(-A r, -A clip(r)):
    #  +1, A=+1: max(-e, -1.2)      = -1.2     clipped
    #  -1, A=-1: max(1/e, 0.8)      =  0.8     clipped
    #  +1, A=-1: max(e, 1.2)        =  e       unclipped (pessimistic bound keeps the big ratio)
    #  -1, A=+1: max(-1/e, -0.8)    = -1/e     unclipped
    #   0, A=+2: max(-2, -2)        = -2       not clipped
    #  padding with an absurd log-ratio: ignored
    old = torch.zeros(1, 6)
    logp = torch.tensor([[1.0, -1.0, 1.0, -1.0, 0.0, 1000.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0, 2.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    loss, stats = policy_loss(logp, old, adv, mask, clip=0.2)
    close(loss, (-1.2 + 0.8 + E - 1 / E - 2) / 5)
    close(stats["clipfrac"], 2 / 5)
    close(stats["approx_kl"], 0.5 * 4 / 5)
    close(stats["ratio_mean"], (2 * E + 2 / E + 1) / 5, atol=1e-5)
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())
    loss.backward()
    # d(-A r)/d logp = -A r; zero where the clipped (constant) branch is active, and on padding.
    close(logp.grad, [[0.0, 0.0, E / 5, -1 / (5 * E), -2 / 5, 0.0]], atol=1e-6)


def test_policy_loss_seq_mean_and_bad_agg():
    # ratio 1 everywhere -> per-token loss = -A.
    lp = torch.zeros(3, 3)
    adv = torch.tensor([[1.0, 2.0, 3.0], [6.0, 50.0, 50.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    tok, _ = policy_loss(lp, lp, adv, mask, clip=0.2)
    seq, _ = policy_loss(lp, lp, adv, mask, clip=0.2, loss_agg="seq_mean")
    close(tok, -(1 + 2 + 3 + 6) / 4)
    close(seq, -(2 + 6) / 2)  # the empty row counts as no sequence
    with pytest.raises(ValueError, match="loss_agg"):
        policy_loss(lp, lp, adv, mask, clip=0.2, loss_agg="sum")
    # The other aggregations of the same per-token loss -A: token sums [-6, -6] (the empty row is no sequence).
    seq_sum, _ = policy_loss(lp, lp, adv, mask, clip=0.2, loss_agg="seq_mean_token_sum")
    close(seq_sum, -(6 + 6) / 2)
    norm, _ = policy_loss(lp, lp, adv, mask, clip=0.2, loss_agg="seq_mean_token_sum_norm")
    close(norm, -(6 + 6) / 2 / 3)  # over T = 3, the constant length (Dr. GRPO)
    per_token, _ = policy_loss_per_token(lp, lp, adv, mask, 0.2, 0.2)
    close(aggregate_loss(per_token, mask, "seq_mean_token_sum_norm", max_len=10), -(6 + 6) / 2 / 10)
    close(aggregate_loss(per_token, mask, "token_mean", denominator=8.0), -12 / 8)  # a given (global) count


def test_gradient_accumulation_invariance():
    g = torch.Generator().manual_seed(3)
    B, T = 6, 7
    mask = (torch.arange(T) < torch.tensor([7, 2, 5, 1, 4, 6])[:, None]).float()
    old = torch.randn(B, T, generator=g)
    logp = (old + 0.3 * torch.randn(B, T, generator=g)).requires_grad_()
    adv = torch.randn(B, T, generator=g)
    full, _ = policy_loss(logp, old, adv, mask, clip=0.2)
    (full_grad,) = torch.autograd.grad(full, logp)
    total = mask.sum()
    acc = 0.0
    for part in (slice(0, 2), slice(2, 6)):
        micro, _ = policy_loss(logp[part], old[part], adv[part], mask[part], clip=0.2)
        acc = acc + micro * mask[part].sum() / total
    (acc_grad,) = torch.autograd.grad(acc, logp)
    close(acc, full)
    close(acc_grad, full_grad)


# --------------------------------------------------------------------------- value loss


def test_value_loss_clip_cases_by_hand():
    # clip 0.2, old = 0.5 -> clipped V in [0.3, 0.7].
    #  V=1.0 R=1.0: unclipped 0,    clipped (0.7-1)^2 = 0.09 -> 0.09 clipped
    #  V=1.0 R=0.0: unclipped 1,    clipped 0.49             -> 1.0
    #  V=0.6 R=2.0: inside the clip, both 1.96               -> 1.96
    #  V=0.0 R=0.2: unclipped 0.04, clipped (0.3-0.2)^2=0.01 -> 0.04
    #  V=0.0 R=0.0: unclipped 0,    clipped 0.09             -> 0.09 clipped
    values = torch.tensor([[1.0, 1.0, 0.6, 0.0, 0.0, 123.0]], requires_grad=True)
    old = torch.full((1, 6), 0.5)
    returns = torch.tensor([[1.0, 0.0, 2.0, 0.2, 0.0, -7.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, clip=0.2)
    close(loss, 0.5 * (0.09 + 1.0 + 1.96 + 0.04 + 0.09) / 5)
    close(stats["vf_clipfrac"], 2 / 5)
    loss.backward()
    # 0.5 * d(V-R)^2/dV / 5 = (V-R)/5; zero through the clipped branch and on padding.
    close(values.grad, [[0.0, 1.0 / 5, -1.4 / 5, -0.2 / 5, 0.0, 0.0]])

    unclipped, stats = value_loss(values, old, returns, mask, clip=None)
    close(unclipped, 0.5 * (0 + 1.0 + 1.96 + 0.04 + 0) / 5)
    close(stats["vf_clipfrac"], 0.0)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    close(explained_variance(returns.clone(), returns, mask), 1.0)
    close(explained_variance(torch.full((1, 4), 2.0), returns, mask), 0.0)  # a constant (the mean) explains nothing
    # V = [1, 1, 1]: R - V = [0, 1, 2], var 2/3; var(R) = 2/3 -> 0.
    close(explained_variance(torch.ones(1, 4), returns, mask), 0.0)
    # V = [3, 2, 1]: R - V = [-2, 0, 2], var 8/3 -> 1 - 4 = -3.
    close(explained_variance(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), returns, mask), -3.0, atol=1e-5)
    assert torch.isnan(explained_variance(torch.zeros(1, 4), torch.ones(1, 4), mask))


# --------------------------------------------------------------------------- controllers and score statistics


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=256)  # error 0.5 clipped to 0.2 -> x (1 + 0.2 * 256 / 10000)
    close(ctl.value, 0.1 * 1.00512)
    ctl.update(current_kl=6.6, n_steps=256)  # error 0.1 -> x 1.00256
    close(ctl.value, 0.1 * 1.00512 * 1.00256)
    low = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    low.update(current_kl=3.0, n_steps=256)  # error -0.5 clipped to -0.2 -> x 0.99488
    close(low.value, 0.1 * 0.99488)
    same = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    same.update(current_kl=6.0, n_steps=256)
    close(same.value, 0.1)

    resumed = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=512)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_running_moments_match_concatenated_batches():
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(5, generator=g) * 2 + 1, torch.randn(1, generator=g), torch.randn(7, generator=g) - 3]
    rm = RunningMoments()
    assert rm.mean == 0.0 and rm.std == 1.0
    for b in batches:
        bm, bs = rm.update(b)
        close(bm, b.double().mean())
        close(bs, b.double().std() if b.numel() > 1 else 0.0)
    allx = torch.cat(batches).double()
    close(rm.mean, allx.mean(), atol=1e-9)
    close(rm.std, allx.std(), atol=1e-9)
    assert rm.count == 13

    resumed = RunningMoments()
    resumed.load_state_dict(rm.state_dict())
    extra = torch.tensor([10.0, 11.0])
    rm.update(extra), resumed.update(extra)
    assert (resumed.mean, resumed.std) == (rm.mean, rm.std)
    close(rm.std, torch.cat([allx, extra.double()]).std(), atol=1e-9)
    with pytest.raises(ValueError, match="empty"):
        rm.update(torch.tensor([]))


def test_normalize_scores():
    close(normalize_scores(torch.tensor([1.0, 3.0, 2.0]), mean=2.0, std=0.5), [-2.0, 2.0, 0.0], atol=1e-6)


# --------------------------------------------------------------------------- registries and imports


def _params(fn):
    return [p.name for p in inspect.signature(fn).parameters.values()]


def test_registries_share_signatures():
    assert POLICY_LOSSES["clip"] is core.policy_loss
    assert {"gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"} <= set(ADVANTAGE_ESTIMATORS)
    for estimator in ADVANTAGE_ESTIMATORS.values():
        assert _params(estimator.fn) == ["x"]  # one named record: core.AdvantageInputs
    assert [n for n, e in ADVANTAGE_ESTIMATORS.items() if e.needs_critic] == ["gae"]
    for fn in POLICY_LOSSES.values():
        assert _params(fn) == ["logprobs", "old_logprobs", "advantages", "action_mask", "clip_low", "clip_high"]
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}
    assert {tuple(_params(fn)) for fn in KL_ESTIMATORS.values()} == {("logprobs", "ref_logprobs")}


def test_core_imports_only_torch(tmp_path):
    code = ("import chatrlhf.training.step3_ppo.core, sys; heavy = {'deepspeed', 'transformers'} & set(sys.modules); "
            "assert not heavy, sorted(heavy)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    assert core.__name__ == "chatrlhf.training.step3_ppo.core"
