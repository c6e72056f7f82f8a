"""What scores a rollout: one interface, `Reward`, over a reward model (`ModelReward`), a function of texts
(`FunctionReward`) or a weighted sum of those (`CombinedReward`), so the trainer makes one call whatever the source
of its scores.

A reward function is any callable `(prompts: list[str], responses: list[str]) -> scores`, or
`(prompts, responses, metadata: list[dict]) -> scores` when it needs each example's own data: `metadata[i]` holds
the fields of answer i's prompt record that no data format reads (e.g. GSM8K's `answer`), {} when there are none.
Pass them with `--reward_function package.module:callable ...` (or `run(cfg, reward_fn=...)`); examples live here
and in `verifiable.py`.
"""
from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from chatrlhf.training.data.collate import pad
from chatrlhf.training.data.render import encode_prompt, encode_response
from chatrlhf.training.value_model import end_scores, token_values


@dataclass
class RewardInputs:
    """One generation batch, as every kind of reward may need it. Shapes: B rows, P prompt, R response tokens."""
    sequences: torch.Tensor        # (B, P+R) left-padded prompt + right-padded response, the actor's tokens
    attention_mask: torch.Tensor   # (B, P+R)
    action_mask: torch.Tensor      # (B, R) 1 on response tokens up to and including the first EOS
    has_eos: torch.Tensor          # (B,) bool
    prompt_len: int                # P
    prompt_messages: list | None   # each prompt's chat messages (the data pipeline's), for re-rendering
    tokenizer: object              # the actor's
    metadata: list | None = None   # each row's prompt record fields beyond the format's (dicts), for reward functions


class Reward(Protocol):
    def __call__(self, batch: RewardInputs) -> torch.Tensor:
        """-> scores (B,) fp32 on the batch's device."""


class ModelReward:
    """A frozen reward model (HybridEngine) scoring each sequence at its last real token. When its tokenizer
    renders differently from the actor's (`tokenizer` given), the conversations are re-rendered in its own tokens."""

    def __init__(self, engine, tokenizer=None):
        self.engine, self.tokenizer = engine, tokenizer

    def __call__(self, batch: RewardInputs) -> torch.Tensor:
        ids, mask = batch.sequences, batch.attention_mask
        if self.tokenizer is not None:
            ids, mask = retokenize_for_reward(batch.prompt_messages, batch.sequences[:, batch.prompt_len:],
                                              batch.action_mask, batch.has_eos, batch.tokenizer, self.tokenizer,
                                              batch.sequences.device)
        with torch.no_grad():
            return end_scores(token_values(self.engine, ids, mask), mask).float()


class FunctionReward:
    """A reward function over the decoded prompt and answer texts of a batch (and each row's metadata, when its
    signature takes a third argument or a `metadata` keyword)."""

    def __init__(self, fn: "RewardFn"):
        self.fn, self.takes_metadata = fn, takes_metadata(fn)

    def __call__(self, batch: RewardInputs) -> torch.Tensor:
        prompts, responses = decode(batch.tokenizer, batch.sequences, batch.prompt_len, batch.action_mask)
        if not self.takes_metadata:
            return as_scores(self.fn(prompts, responses), len(responses), batch.sequences.device)
        metadata = batch.metadata if batch.metadata is not None else [{} for _ in responses]
        if len(metadata) != len(responses):
            raise ValueError(f"{len(metadata)} metadata records for {len(responses)} answers")
        if any(p.name == "metadata" and p.kind is p.KEYWORD_ONLY for p in _parameters(self.fn)):
            return as_scores(self.fn(prompts, responses, metadata=metadata), len(responses), batch.sequences.device)
        return as_scores(self.fn(prompts, responses, metadata), len(responses), batch.sequences.device)


def _parameters(fn) -> list:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # some builtins and C callables have no signature: the plain form
        return []


def takes_metadata(fn) -> bool:
    """Whether `fn` accepts (prompts, responses, metadata): a third positional parameter, *args, or `metadata`."""
    params = _parameters(fn)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return (len(positional) >= 3 or any(p.kind is p.VAR_POSITIONAL for p in params)
            or any(p.name == "metadata" for p in params))


class CombinedReward:
    """A weighted sum of rewards (functions and/or a reward model); `parts` also returns each one's own scores,
    which the trainer logs as objective/reward/<name> and eval/reward/<name>."""

    def __init__(self, rewards: list[tuple[str, float, Reward]]):
        if not rewards:
            raise ValueError("no reward: give --reward_function or a reward model")
        names = [name for name, _, _ in rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"two rewards share a name: {names}")
        self.rewards = rewards

    def parts(self, batch: RewardInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted sum (B,), {name: that reward's scores (B,)})."""
        parts = {name: reward(batch).float() for name, _, reward in self.rewards}
        total = sum(weight * parts[name] for name, weight, _ in self.rewards)
        return total, parts

    def __call__(self, batch: RewardInputs) -> torch.Tensor:
        return self.parts(batch)[0]


def reward_names(reward: Reward) -> list[str]:
    """The names `score_parts` gives parts for (none unless several rewards are summed)."""
    names = [name for name, _, _ in reward.rewards] if isinstance(reward, CombinedReward) else []
    return names if len(names) > 1 else []


def score_parts(reward: Reward, batch: RewardInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scores of any Reward, with its parts when it is a CombinedReward of several."""
    if isinstance(reward, CombinedReward):
        total, parts = reward.parts(batch)
        return total, (parts if len(parts) > 1 else {})
    return reward(batch), {}


def same_tokens(a, b) -> bool:
    """True when two tokenizers map text to the same ids with the same rendering, so ids can be shared."""
    return (a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id
            and getattr(a, "chat_template", None) == getattr(b, "chat_template", None))


def decode(tokenizer, sequences, prompt_len: int, action_mask) -> tuple[list[str], list[str]]:
    """(prompt texts, response texts up to their EOS) of a batch."""
    prompts = tokenizer.batch_decode(sequences[:, :prompt_len], skip_special_tokens=True)
    responses = [tokenizer.decode(row[:int(n)], skip_special_tokens=True)
                 for row, n in zip(sequences[:, prompt_len:], action_mask.sum(1))]
    return prompts, responses


def retokenize_for_reward(prompt_messages: list, responses: torch.Tensor, action_mask: torch.Tensor,
                          has_eos: torch.Tensor, actor_tokenizer, reward_tokenizer, device):
    """The same conversations in the reward model's own tokens and chat template (its tokenizer differs)."""
    rows = []
    for messages, ids, mask, eos in zip(prompt_messages, responses, action_mask, has_eos):
        n = int(mask.sum()) - int(eos)  # response tokens without the closing EOS
        text = actor_tokenizer.decode(ids[:n], skip_special_tokens=True)
        answer = encode_response(reward_tokenizer, text)
        rows.append(encode_prompt(reward_tokenizer, messages) + (answer if eos else answer[:-1]))
    ids, mask = pad(rows, reward_tokenizer.pad_token_id, "right")
    return ids.to(device), mask.to(device)


class RewardFn(Protocol):
    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor | list[float]: ...


def load_reward_function(spec: str) -> RewardFn:
    """"package.module:name" -> the callable (taking (prompts, responses) or (prompts, responses, metadata))."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--reward_function must look like package.module:callable, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--reward_function {spec!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"--reward_function {spec!r} is not callable")
    return fn


def as_scores(values, n: int, device) -> torch.Tensor:
    scores = torch.as_tensor(values, dtype=torch.float32, device=device).reshape(-1)
    if scores.numel() != n:
        raise ValueError(f"the reward function returned {scores.numel()} scores for {n} answers")
    return scores


def word_fraction(word: str) -> Callable[[list[str], list[str]], list[float]]:
    """A reward that is the fraction of an answer's words equal to `word` (a toy task for tests and demos)."""
    def reward(prompts: list[str], responses: list[str]) -> list[float]:
        out = []
        for text in responses:
            words = re.findall(r"\w+", text.lower())
            out.append(sum(w == word for w in words) / max(len(words), 1))
        return out
    return reward


def brevity(prompts: list[str], responses: list[str]) -> list[float]:
    """Shorter answers score higher: 1 / (1 + words / 10)."""
    return [1.0 / (1.0 + len(r.split()) / 10.0) for r in responses]
