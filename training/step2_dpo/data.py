"""DPO's data: the reward model's preference pairs (chatrlhf.training.data.preference, the same second
--data_split share) plus each pair's prompt length, so the loss covers the answer tokens (and their eos) only.

DeepSpeed-Chat masked up to the first token where chosen and rejected differ, which also drops a common start of
the two answers; the prompt length drops the prompt alone.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from chatrlhf.training.data.collate import pad, pad_id
from chatrlhf.training.data.pipeline import StepData, load_phase_data
from chatrlhf.training.data.preference import PAIR_PROMPT_COLUMNS, tokenize_pairs_with_prompt_length
from chatrlhf.training.data.render import encode_prompts

DPO_DATA = StepData(name="dpo", share=1, tokenize=tokenize_pairs_with_prompt_length, columns=PAIR_PROMPT_COLUMNS,
                    needs_pairs=True)


def answer_mask(attention_mask: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
    """attention_mask (N, T), prompt_lengths (N,) -> action_mask (N, T) long: 1 on each row's real tokens after its
    first prompt_length real tokens (the answer and its eos), for left and right padding alike."""
    real_index = attention_mask.long().cumsum(-1) - 1  # 0, 1, ... over the real tokens
    return (attention_mask.bool() & (real_index >= prompt_lengths.long().unsqueeze(-1))).long()


@dataclass
class DPOCollator:
    """Chosen rows then rejected rows, input_ids/attention_mask/action_mask [2B, T] (row i and B + i are a pair;
    action_mask marks the answer tokens), plus ref_logprobs [2B] when the pairs carry precomputed ones."""
    tokenizer: object
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        input_ids, mask = pad(rows, pad_id(self.tokenizer), self.padding_side, self.pad_to_multiple_of)
        prompt = torch.as_tensor([int(f["prompt_length"]) for f in features] * 2, dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": mask, "action_mask": answer_mask(mask, prompt)}
        if features and "ref_logprobs" in features[0]:
            ref = torch.stack([torch.as_tensor(f["ref_logprobs"], dtype=torch.float32) for f in features])  # [B, 2]
            batch["ref_logprobs"] = torch.cat([ref[:, 0], ref[:, 1]])
        return batch


class WithRefLogprobs(torch.utils.data.Dataset):
    """A tokenised pair dataset whose records also carry ref_logprobs: the reference's (chosen, rejected)
    log-probabilities, row i of `ref_logprobs` (N, 2)."""

    def __init__(self, pairs, ref_logprobs: torch.Tensor):
        if len(pairs) != len(ref_logprobs):
            raise ValueError(f"{len(pairs)} pairs but {len(ref_logprobs)} precomputed reference log-probabilities")
        self.pairs, self.ref_logprobs = pairs, ref_logprobs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        return {**self.pairs[i], "ref_logprobs": self.ref_logprobs[i]}


# ---- held-out prompts for the pipeline's report ---------------------------------------------------------------
def _tokenize_prompts(batch, tokenizer, max_seq_len, max_prompt_len, overlength):
    """Batched: pairs -> their prompts' chat messages (JSON) and prompt length, one per pair (for samples)."""
    out = {k: [] for k in ("prompt_messages", "length", "_truncated", "_eos_cut")}
    for p, messages in zip(encode_prompts(tokenizer, batch["prompt"]), batch["prompt"]):
        out["prompt_messages"].append(json.dumps(messages))
        out["length"].append(len(p))
        out["_truncated"].append(False)
        out["_eos_cut"].append(False)
    return out


DPO_PROMPTS = StepData(name="dpo-prompts", share=1, tokenize=_tokenize_prompts, columns={"prompt_messages": "string"},
                       needs_pairs=True)


def heldout_prompts(cfg, tokenizer, n: int) -> list:
    """The `n` shortest prompts (chat messages) of the pairs a DPOConfig holds out (its eval split: the same
    records DPO evaluated on and never trained on)."""
    data = load_phase_data(cfg.data, DPO_PROMPTS, tokenizer, seed=cfg.train.seed, max_seq_len=cfg.train.max_seq_len)
    split = data.eval if len(data.eval) else data.train
    order = sorted(range(len(split)), key=lambda i: int(split[i]["length"]))[:n]
    return [json.loads(split[i]["prompt_messages"]) for i in order]
