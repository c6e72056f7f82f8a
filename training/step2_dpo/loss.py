"""Direct preference optimisation and its family: pure functions of log-probabilities (torch only).

Notation, per pair: pc, pr are the policy's log-probabilities of the chosen and rejected answers (summed over the
answer tokens; SimPO: averaged), rc, rr the reference's, and h = (pc - rc) - (pr - rr) the difference of
log-ratios. The implicit reward of an answer is beta * (policy - reference) log-probability.

  sigmoid  DPO (Rafailov et al. 2023): -logsigmoid(beta h); with label smoothing e it is
           -(1 - e) logsigmoid(beta h) - e logsigmoid(-beta h), DeepSpeed-Chat's loss.
  cdpo     conservative DPO (Mitchell 2023): the same with e > 0 required (preferences flipped with probability e).
  ipo      IPO (Azar et al. 2023): (h - 1 / (2 beta))^2, a squared loss that does not push h to infinity.
  simpo    SimPO (Meng et al. 2024): reference-free, length-normalised: with a = mean answer log-probabilities,
           -logsigmoid(beta (ac - ar) - gamma) (smoothed like sigmoid), gamma the target reward margin.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "cdpo", "simpo")
LENGTH_NORMALISED = ("simpo",)  # these take per-token mean log-probabilities instead of sums
REFERENCE_FREE = ("simpo",)     # these never use a reference model


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """logits (N, T, V), input_ids (N, T) -> (N, T - 1) fp32: log p(input_ids[:, t + 1] | input_ids[:, :t + 1]).

    fp32 whatever the logits' dtype: a bf16 log-softmax over 50k tokens loses the differences DPO trains on."""
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:].unsqueeze(-1)
    return torch.gather(logits, -1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logprobs(token_lp: torch.Tensor, action_mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """token_lp (N, T - 1) from `token_logprobs`, action_mask (N, T) (1 on the answer tokens) -> (N,) fp32: the
    answer's log-probability, summed over its tokens (or their mean with `average`). Position t of token_lp
    scores token t + 1, so the mask is shifted by one."""
    mask = action_mask[:, 1:].to(token_lp.dtype)
    total = (token_lp * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1.0) if average else total


def token_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """policy_logits, ref_logits (N, T, V), action_mask (N, T) -> (N,) fp32: sum over the answer's tokens of the
    exact KL(policy || reference) of the next-token distributions that predict them (nats per answer)."""
    lp, lr = F.log_softmax(policy_logits[:, :-1].float(), -1), F.log_softmax(ref_logits[:, :-1].float(), -1)
    kl = (lp.exp() * (lp - lr)).sum(-1)
    return (kl * action_mask[:, 1:].to(kl.dtype)).sum(-1)


def logistic_losses(logits: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """logits (B,) -> (B,): -(1 - e) logsigmoid(x) - e logsigmoid(-x), e = label_smoothing."""
    losses = -F.logsigmoid(logits)
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return losses


def sigmoid_losses(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """h (B,) log-ratio differences -> (B,): DPO's -logsigmoid(beta h), label-smoothed by e."""
    return logistic_losses(beta * h, label_smoothing)


def cdpo_losses(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """h (B,) -> (B,): conservative DPO, `sigmoid_losses` with a noise rate 0 < e < 0.5."""
    if not 0.0 < label_smoothing < 0.5:
        raise ValueError(f"cdpo needs 0 < label_smoothing < 0.5, got {label_smoothing}")
    return logistic_losses(beta * h, label_smoothing)


def ipo_losses(h: torch.Tensor, beta: float) -> torch.Tensor:
    """h (B,) -> (B,): IPO's (h - 1 / (2 beta))^2 (h from summed log-probabilities, as in the paper)."""
    return (h - 1.0 / (2.0 * beta)) ** 2


def simpo_losses(mean_chosen: torch.Tensor, mean_rejected: torch.Tensor, beta: float, gamma: float,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """mean_chosen, mean_rejected (B,) per-token mean log-probabilities -> (B,):
    -logsigmoid(beta (mean_chosen - mean_rejected) - gamma), label-smoothed by e."""
    return logistic_losses(beta * (mean_chosen - mean_rejected) - gamma, label_smoothing)


def preference_losses(loss_type: str, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                      ref_chosen: torch.Tensor | None = None, ref_rejected: torch.Tensor | None = None, *,
                      beta: float = 0.1, label_smoothing: float = 0.0,
                      simpo_gamma: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One of LOSS_TYPES on (B,) answer log-probabilities -> (losses (B,), chosen_rewards (B,),
    rejected_rewards (B,)), all fp32. The rewards are the implicit ones, beta * (policy - reference).

    `ref_chosen`/`ref_rejected` None means reference-free (a reference of log-probability 0); SimPO ignores them.
    For SimPO the policy inputs must be per-token means (`sequence_logprobs(..., average=True)`)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; accepted: {', '.join(LOSS_TYPES)}")
    if policy_chosen.shape != policy_rejected.shape or policy_chosen.dim() != 1:
        raise ValueError(f"expected two (B,) log-probability tensors, got {tuple(policy_chosen.shape)} and "
                         f"{tuple(policy_rejected.shape)}")
    pc, pr = policy_chosen.float(), policy_rejected.float()
    if loss_type in REFERENCE_FREE or ref_chosen is None or ref_rejected is None:
        rc = rr = torch.zeros_like(pc)
    else:
        rc, rr = ref_chosen.float().to(pc.device), ref_rejected.float().to(pc.device)
    chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        losses = sigmoid_losses(h, beta, label_smoothing)
    elif loss_type == "cdpo":
        losses = cdpo_losses(h, beta, label_smoothing)
    elif loss_type == "ipo":
        losses = ipo_losses(h, beta)
    else:
        losses = simpo_losses(pc, pr, beta, simpo_gamma, label_smoothing)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def wins(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """(B,), (B,) -> (B,) fp32: 1 where chosen > rejected, 0.5 on a tie, else 0. Ties count half because DPO's
    implicit rewards are all exactly 0 before training (policy = reference): the accuracy then reads chance."""
    c, r = chosen.float(), rejected.float()
    return (c > r).float() + 0.5 * (c == r).float()
