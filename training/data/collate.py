"""Dynamic-padding collators: each batch is padded to its own longest row (optionally to a multiple of 8).

The pad id is `tokenizer.pad_token_id`, which must exist and differ from eos (CONTRIBUTING.md): masks come from
`attention_mask`, so a generated or trained eos is never mistaken for padding.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from chatrlhf.training.data.tokenize import IGNORE_INDEX


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; load it with chatrlhf.utils.models.load_tokenizer")
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError("the pad token must differ from the eos token, or eos would be masked as padding")
    return tokenizer.pad_token_id


def pad(rows: list, value: int, side: str = "right",
        multiple_of: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids (lists or 1-D tensors) -> (padded [B, T] long tensor, attention_mask [B, T] long tensor),
    T = the longest row rounded up to `multiple_of`."""
    rows = [torch.as_tensor(r, dtype=torch.long) for r in rows]
    width = max((len(r) for r in rows), default=0)
    if multiple_of:
        width = -(-width // multiple_of) * multiple_of
    out = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        out[i, sl], mask[i, sl] = r, 1
    return out, mask


@dataclass
class SFTCollator:
    """Phase 1: right-padded input_ids, attention_mask [B, T] and labels [B, T] (padding = -100)."""
    tokenizer: object
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        input_ids, mask = pad([f["input_ids"] for f in features], _pad_id(self.tokenizer), "right",
                              self.pad_to_multiple_of)
        labels, _ = pad([f["labels"] for f in features], IGNORE_INDEX, "right", self.pad_to_multiple_of)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


@dataclass
class PairCollator:
    """Phase 2: chosen rows then rejected rows in one right-padded batch, input_ids/attention_mask [2B, T]
    (row i and row B + i are a pair)."""
    tokenizer: object
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        input_ids, mask = pad(rows, _pad_id(self.tokenizer), "right", self.pad_to_multiple_of)
        return {"input_ids": input_ids, "attention_mask": mask}


@dataclass
class PromptCollator:
    """Phase 3: LEFT-padded prompts for generation, input_ids/attention_mask [B, T], plus the prompts'
    chat messages (`prompt_messages`, a list of message lists) when the dataset has them."""
    tokenizer: object
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        input_ids, mask = pad([f["input_ids"] for f in features], _pad_id(self.tokenizer), "left",
                              self.pad_to_multiple_of)
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if features and "prompt_messages" in features[0]:
            batch["prompt_messages"] = [json.loads(f["prompt_messages"]) for f in features]
        return batch
