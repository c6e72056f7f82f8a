"""Rewards other than a reward model: any callable `(prompts: list[str], responses: list[str]) -> scores`.

Pass one with `--reward_function package.module:callable` (or `run(cfg, reward_fn=...)`); it replaces the reward
model and is called with the decoded prompt and answer texts of a rollout. A few examples live here.
"""
from __future__ import annotations

import importlib
import re
from typing import Callable, Protocol

import torch


class RewardFn(Protocol):
    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor | list[float]: ...


def load_reward_function(spec: str) -> RewardFn:
    """"package.module:name" -> the callable."""
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
