"""Preference pairs as tokens, for every step that learns from them (the reward model, DPO and its family).

A pair is prompt + chosen + eos and prompt + rejected + eos, under one length budget so that both rows keep
the same prompt tokens. `length` is the longer row's. Steps that put their loss on the answer tokens only (DPO)
take `tokenize_pairs_with_prompt_length`, which also records how many of a row's tokens are prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from chatrlhf.training.data.collate import pad, pad_id
from chatrlhf.training.data.render import encode_prompts, encode_responses
from chatrlhf.training.data.tokenize import budget

PAIR_COLUMNS = {"chosen_input_ids": "ids", "rejected_input_ids": "ids"}
# The pair plus the number of (kept) prompt tokens both rows start with.
PAIR_PROMPT_COLUMNS = {**PAIR_COLUMNS, "prompt_length": "int"}


def _tokenize_pairs(batch, tokenizer, max_seq_len, max_prompt_len, overlength, prompt_length: bool):
    keys = ("chosen_input_ids", "rejected_input_ids") + (("prompt_length",) if prompt_length else ())
    out = {k: [] for k in keys + ("length", "_truncated", "_eos_cut")}
    prompts = encode_prompts(tokenizer, batch["prompt"])
    chosen, rejected = encode_responses(tokenizer, batch["chosen"]), encode_responses(tokenizer, batch["rejected"])
    for p, c, r in zip(prompts, chosen, rejected):
        # One budget for both answers keeps the prompt tokens identical in the pair.
        kp, kr = budget(len(p), max(len(c), len(r)), max_seq_len, max_prompt_len)
        cut = kp < len(p) or kr < max(len(c), len(r))
        if cut and overlength == "drop":
            continue
        p = p[len(p) - kp:]
        out["chosen_input_ids"].append(p + c[:kr])
        out["rejected_input_ids"].append(p + r[:kr])
        if prompt_length:
            out["prompt_length"].append(len(p))
        out["length"].append(len(p) + min(kr, max(len(c), len(r))))
        out["_truncated"].append(cut)
        out["_eos_cut"].append(kr < len(c) or kr < len(r))
    return out


def tokenize_pairs(batch, tokenizer, max_seq_len, max_prompt_len, overlength):
    """Batched: normalised pairs -> chosen_input_ids, rejected_input_ids, length (+ the count columns)."""
    return _tokenize_pairs(batch, tokenizer, max_seq_len, max_prompt_len, overlength, prompt_length=False)


def tokenize_pairs_with_prompt_length(batch, tokenizer, max_seq_len, max_prompt_len, overlength):
    """`tokenize_pairs` plus prompt_length: the prompt tokens kept at the start of both rows (the answer, with its
    eos, is everything after them). Same rows, same truncation."""
    return _tokenize_pairs(batch, tokenizer, max_seq_len, max_prompt_len, overlength, prompt_length=True)


@dataclass
class PairCollator:
    """Chosen rows then rejected rows in one right-padded batch, input_ids/attention_mask [2B, T]
    (row i and row B + i are a pair), plus answer_lengths [2B] (tokens after the shared prompt, eos included)
    when the pairs carry prompt_length."""
    tokenizer: object
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        input_ids, mask = pad(rows, pad_id(self.tokenizer), "right", self.pad_to_multiple_of)
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if features and "prompt_length" in features[0]:
            prompt = torch.as_tensor([int(f["prompt_length"]) for f in features] * 2, dtype=torch.long)
            batch["answer_lengths"] = mask.sum(-1) - prompt
        return batch
