"""Built-in verifiable rewards: a rule checks each answer, no reward model. Pass them by name:

  --reward_function chatrlhf.training.step3_ppo.verifiable:final_number_match \
                    chatrlhf.training.step3_ppo.verifiable:number_format --reward_weights 1.0 0.1

`final_number_match` needs each example's reference answer, from the prompt data's `answer` field (GSM8K's whole
solution ending in "#### 72", or just "72"): the data pipeline carries a record's extra fields to reward
functions as their third argument, `metadata` (see chatrlhf.training.step3_ppo.rewards).
"""
from __future__ import annotations

import re

# "#### 1,234.5" (GSM8K's final-answer marker), else any number; "$1,234" and "-3" too.
_MARKED = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """The answer a text gives: the number after its last `####`, else its last number; None when it has none."""
    marked = _MARKED.findall(text)
    found = marked[-1] if marked else (_NUMBER.findall(text) or [None])[-1]
    if found is None:
        return None
    try:
        return float(found.replace(",", "").replace("$", ""))
    except ValueError:
        return None


def final_number_match(prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
    """1.0 when a response's final number equals its example's `answer` (GSM8K-style: `#### 42`, else the last
    number in the response), else 0.0. An example without an `answer` field is an error, naming the field."""
    out = []
    for i, (response, meta) in enumerate(zip(responses, metadata)):
        if not meta or "answer" not in meta:
            raise ValueError(f"final_number_match: example {i} of the batch has no 'answer' field in its prompt "
                             f"data (metadata: {sorted(meta or {})}); it needs the reference answer")
        gold, given = final_number(str(meta["answer"])), final_number(response)
        out.append(float(gold is not None and given is not None and abs(given - gold) < 1e-6))
    return out


def number_format(prompts: list[str], responses: list[str]) -> list[float]:
    """The format reward: 1.0 when a response ends with its final answer marked `#### <number>`, else 0.0."""
    return [float(re.search(r"####\s*-?[\d,]*\.?\d+\s*$", r.strip()) is not None) for r in responses]
