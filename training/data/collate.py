"""Dynamic padding for the steps' collators (each step's data.py): each batch is padded to its own longest row
(optionally to a multiple of 8).

The pad id is `tokenizer.pad_token_id`, which must exist and differ from eos (CONTRIBUTING.md): masks come from
`attention_mask`, so a generated or trained eos is never mistaken for padding.
"""
from __future__ import annotations

import torch


def pad_id(tokenizer) -> int:
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
