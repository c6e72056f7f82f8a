"""Step 3's data: prompts only (the actor writes the answers), from the third --data_split share.

Each prompt keeps its chat messages next to its tokens: a reward model with another tokenizer renders them its
own way. Prompts longer than --max_prompt_seq_len keep their last tokens (or are dropped with --overlength drop).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from chatrlhf.training.data.collate import pad, pad_id
from chatrlhf.training.data.pipeline import PhaseData, StepData, load_phase_data
from chatrlhf.training.data.render import encode_prompts


def tokenize(batch, tokenizer, max_seq_len, max_prompt_len, overlength):
    """Batched: normalised examples -> input_ids (prompt tokens only), prompt_messages (JSON), length."""
    out = {k: [] for k in ("input_ids", "prompt_messages", "length", "_truncated", "_eos_cut")}
    for p, messages in zip(encode_prompts(tokenizer, batch["prompt"]), batch["prompt"]):
        cut = len(p) > max_prompt_len
        if cut and overlength == "drop":
            continue
        p = p[-max_prompt_len:] if cut else p
        out["input_ids"].append(p)
        out["prompt_messages"].append(json.dumps(messages))
        out["length"].append(len(p))
        out["_truncated"].append(cut)
        out["_eos_cut"].append(False)
    return out


PROMPT_DATA = StepData(name="prompts", share=2, tokenize=tokenize,
                       columns={"input_ids": "ids", "prompt_messages": "string"})


def prompt_data(cfg, tokenizer) -> PhaseData:
    """Step 3's training and held-out prompts from a PPOConfig (the pipeline's report samples the same split)."""
    return load_phase_data(cfg.data, PROMPT_DATA, tokenizer, seed=cfg.run.seed, max_prompt_len=cfg.max_prompt_seq_len)


@dataclass
class PromptCollator:
    """LEFT-padded prompts for generation, input_ids/attention_mask [B, T], plus the prompts' chat messages
    (`prompt_messages`, a list of message lists) when the dataset has them."""
    tokenizer: object
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        input_ids, mask = pad([f["input_ids"] for f in features], pad_id(self.tokenizer), "left",
                              self.pad_to_multiple_of)
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if features and "prompt_messages" in features[0]:
            batch["prompt_messages"] = [json.loads(f["prompt_messages"]) for f in features]
        return batch
