"""Step 1's data: prompt + answer + EOS, the loss on the answer tokens only (unless --train_on_prompt)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from chatrlhf.training.data.collate import pad, pad_id
from chatrlhf.training.data.pipeline import StepData
from chatrlhf.training.data.render import encode_prompts, encode_responses
from chatrlhf.training.data.tokenize import IGNORE_INDEX, budget


def tokenize(batch, tokenizer, max_seq_len, max_prompt_len, overlength, train_on_prompt=False):
    """input_ids = prompt + response + eos; labels = -100 on prompt tokens (unless train_on_prompt)."""
    out = {k: [] for k in ("input_ids", "labels", "length", "_truncated", "_eos_cut")}
    prompts, responses = encode_prompts(tokenizer, batch["prompt"]), encode_responses(tokenizer, batch["chosen"])
    for p, r in zip(prompts, responses):
        kp, kr = budget(len(p), len(r), max_seq_len, max_prompt_len)
        cut = kp < len(p) or kr < len(r)
        if cut and overlength == "drop":
            continue
        p, r_kept = p[len(p) - kp:], r[:kr]
        ids = p + r_kept
        out["input_ids"].append(ids)
        out["labels"].append(list(ids) if train_on_prompt else [IGNORE_INDEX] * len(p) + r_kept)
        out["length"].append(len(ids))
        out["_truncated"].append(cut)
        out["_eos_cut"].append(kr < len(r))
    return out


# DeepSpeed-Chat's --data_split gives step 1 the first share; --sft_only_data_path goes here whole.
SFT_DATA = StepData(name="sft", share=0, tokenize=tokenize, columns={"input_ids": "ids", "labels": "ids"},
                    takes_sft_only=True)


@dataclass
class SFTCollator:
    """Right-padded input_ids, attention_mask [B, T] and labels [B, T] (padding = -100)."""
    tokenizer: object
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        input_ids, mask = pad([f["input_ids"] for f in features], pad_id(self.tokenizer), "right",
                              self.pad_to_multiple_of)
        labels, _ = pad([f["labels"] for f in features], IGNORE_INDEX, "right", self.pad_to_multiple_of)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
