"""Step 3's data: prompts only (the actor writes the answers), from the third --data_split share.

Each prompt keeps its chat messages next to its tokens (a reward model with another tokenizer renders them its
own way) and its record's other fields (`metadata`, JSON: e.g. a reference answer, for reward functions). Prompts
longer than --max_prompt_seq_len keep their last tokens (or are dropped with --overlength drop).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from chatrlhf.training.data.collate import pad, pad_id
from chatrlhf.training.data.pipeline import PhaseData, StepData, load_phase_data
from chatrlhf.training.data.render import encode_prompts


def tokenize(batch, tokenizer, max_seq_len, max_prompt_len, overlength):
    """Batched: normalised examples -> input_ids (prompt tokens only), prompt_messages (JSON), metadata (JSON or
    None), length."""
    out = {k: [] for k in ("input_ids", "prompt_messages", "metadata", "length", "_truncated", "_eos_cut")}
    metadata = batch.get("metadata") or [None] * len(batch["prompt"])
    for p, messages, meta in zip(encode_prompts(tokenizer, batch["prompt"]), batch["prompt"], metadata):
        cut = len(p) > max_prompt_len
        if cut and overlength == "drop":
            continue
        p = p[-max_prompt_len:] if cut else p
        out["input_ids"].append(p)
        out["prompt_messages"].append(json.dumps(messages))
        out["metadata"].append(meta)
        out["length"].append(len(p))
        out["_truncated"].append(cut)
        out["_eos_cut"].append(False)
    return out


PROMPT_DATA = StepData(name="prompts", share=2, tokenize=tokenize,
                       columns={"input_ids": "ids", "prompt_messages": "string", "metadata": "string"})


def prompt_data(cfg, tokenizer) -> PhaseData:
    """Step 3's training and held-out prompts from a PPOConfig (the pipeline's report samples the same split)."""
    return load_phase_data(cfg.data, PROMPT_DATA, tokenizer, seed=cfg.run.seed, max_prompt_len=cfg.max_prompt_seq_len)


@dataclass
class PromptCollator:
    """LEFT-padded prompts for generation, input_ids/attention_mask [B, T], plus the prompts' chat messages
    (`prompt_messages`, a list of message lists) and their records' other fields (`metadata`, a list of dicts,
    {} for none) when the dataset has them."""
    tokenizer: object
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        input_ids, mask = pad([f["input_ids"] for f in features], pad_id(self.tokenizer), "left",
                              self.pad_to_multiple_of)
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if features and "prompt_messages" in features[0]:
            batch["prompt_messages"] = [json.loads(f["prompt_messages"]) for f in features]
        if features and "metadata" in features[0]:
            batch["metadata"] = [json.loads(f["metadata"]) if f["metadata"] else {} for f in features]
        return batch
