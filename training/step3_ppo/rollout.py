"""Rollouts: sample answers with the actor (generation mode), then score them with every model (eval mode).

Shapes: B sequences, P prompt tokens (left-padded), R response tokens (right-padded). Position t of every
(B, R) tensor is response token t: `logprobs[:, t]` is its log-probability, `values[:, t]` the critic's
estimate before emitting it, `action_mask[:, t]` whether it counts (up to and including the first EOS).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, fields

import torch

from chatrlhf.training.step3_ppo import core
from chatrlhf.training.value_model import position_ids, token_values, unwrap


@dataclass
class Rollout:
    sequences: torch.Tensor        # (B, P+R) prompt + response ids
    attention_mask: torch.Tensor   # (B, P+R) 1 on prompt tokens and counted response tokens
    action_mask: torch.Tensor      # (B, R) float, 1 on counted response tokens
    logprobs: torch.Tensor         # (B, R) actor, when sampled (old_logprobs in PPO)
    ref_logprobs: torch.Tensor     # (B, R) reference model
    values: torch.Tensor           # (B, R) critic (old_values in PPO)
    scores: torch.Tensor           # (B,) reward model (after missing-EOS penalty, before clip/normalise)
    prompt_len: int                # P
    rewards: torch.Tensor | None = None     # (B, R) shaped: score at the last token, -KL per token
    advantages: torch.Tensor | None = None  # (B, R)
    returns: torch.Tensor | None = None     # (B, R)

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_len:]

    def select(self, index: torch.Tensor) -> "Rollout":
        """The rows `index` of every per-sequence tensor (a PPO minibatch)."""
        return Rollout(**{f.name: _rows(getattr(self, f.name), index) for f in fields(self)})


def _rows(value, index):
    return value[index] if isinstance(value, torch.Tensor) else value


def concat(rollouts: list[Rollout], pad_id: int) -> Rollout:
    """One Rollout from several generation batches (prompts and responses re-padded to common widths)."""
    if len(rollouts) == 1:
        return rollouts[0]
    P = max(r.prompt_len for r in rollouts)
    R = max(r.action_mask.size(1) for r in rollouts)
    parts = []
    for r in rollouts:
        left, right = P - r.prompt_len, R - r.action_mask.size(1)
        pad_rows = lambda t, v: torch.nn.functional.pad(t, (0, right), value=v)  # noqa: E731
        parts.append(dict(
            sequences=torch.nn.functional.pad(r.sequences, (left, right), value=pad_id),
            attention_mask=torch.nn.functional.pad(r.attention_mask, (left, right), value=0),
            action_mask=pad_rows(r.action_mask, 0.0), logprobs=pad_rows(r.logprobs, 0.0),
            ref_logprobs=pad_rows(r.ref_logprobs, 0.0), values=pad_rows(r.values, 0.0), scores=r.scores))
    return Rollout(**{k: torch.cat([p[k] for p in parts]) for k in parts[0]}, prompt_len=P)


def response_mask(responses: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, R) ids -> (action_mask float (B, R): tokens up to and including the first EOS, has_eos bool (B,))."""
    is_eos = responses == eos_id
    before_or_at_eos = (is_eos.long().cumsum(1) - is_eos.long()) == 0
    return before_or_at_eos.float(), is_eos.any(1)


def forward_kwargs(model, attention_mask: torch.Tensor, response_len: int) -> dict:
    """Position ids counting real tokens (as `generate` did for the left-padded prompt), and only the logits
    we need when the family supports it (a (B, P+R, V) fp32 tensor is the biggest thing in PPO)."""
    params = inspect.signature(unwrap(model).forward).parameters
    kwargs = {"attention_mask": attention_mask, "use_cache": False}
    if "position_ids" in params:
        kwargs["position_ids"] = position_ids(attention_mask)
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = response_len + 1
    return kwargs


def response_logits(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """(B, R, V) logits that predict the response tokens."""
    R = sequences.size(1) - prompt_len
    logits = model(input_ids=sequences, **forward_kwargs(model, attention_mask, R)).logits
    return logits[:, -(R + 1):-1]


def response_values(critic, sequences, attention_mask, prompt_len: int) -> torch.Tensor:
    """(B, R) critic values of the states before each response token."""
    return token_values(critic, sequences, attention_mask)[:, prompt_len - 1:-1].float()


@torch.no_grad()
def generate(actor, prompts: torch.Tensor, prompt_mask: torch.Tensor, *, tokenizer, sampling: dict,
             max_new_tokens: int, **mode):
    """(B, P) left-padded prompts -> (sequences (B, P+R), action_mask (B, R), has_eos (B,)).

    `mode`: the hybrid engine's generation settings (HybridEngineArgs.generation_mode()). Generation stops at
    EOS; positions after it are padding and get action_mask 0."""
    with actor.generation(**mode) as gen:
        sequences = gen(prompts, prompt_mask, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, **sampling)
    P = prompts.size(1)
    action_mask, has_eos = response_mask(sequences[:, P:], tokenizer.eos_token_id)
    if action_mask.size(1) == 0:  # nothing generated at all (max_new_tokens 0): keep shapes valid
        raise ValueError("--max_answer_seq_len must be at least 1")
    return sequences, action_mask, has_eos


@torch.no_grad()
def score(actor, ref, critic, sequences, prompt_mask, action_mask, *, temperature: float,
          ref_is_actor_without_adapters: bool = False) -> dict:
    """Log-probs (actor, reference) and values (critic), all in eval mode."""
    P = prompt_mask.size(1)
    attention_mask = torch.cat([prompt_mask, action_mask.long()], dim=1)
    responses = sequences[:, P:]
    for m in (actor, critic):
        m.eval()  # old log-probs and values without dropout noise
    logprobs = core.logprobs_from_logits(response_logits(actor, sequences, attention_mask, P), responses, temperature)
    if ref_is_actor_without_adapters:
        with actor.module.disable_adapter():
            ref_logits = response_logits(actor, sequences, attention_mask, P)
    else:
        ref_logits = response_logits(ref, sequences, attention_mask, P)
    ref_logprobs = core.logprobs_from_logits(ref_logits, responses, temperature)
    values = response_values(critic, sequences, attention_mask, P)
    return dict(attention_mask=attention_mask, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values)
