"""The pretraining mix (PPO-ptx, InstructGPT eq. 2): plain-text batches for a language-model loss on the actor."""
from __future__ import annotations

from pathlib import Path

import torch


def _texts(name: str, config_name: str | None) -> list[str]:
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix == ".txt":
            return [line for line in path.read_text().splitlines() if line.strip()]
        from chatrlhf.training.data.sources import read_records

        texts = []
        for i, record in enumerate(read_records(path)):
            if not isinstance(record.get("text"), str):
                raise ValueError(f"{path}: record {i}: needs a string 'text' field for --unsupervised_dataset_name")
            texts.append(record["text"])
        return texts
    from datasets import load_dataset

    return [t for t in load_dataset(name, config_name, split="train")["text"] if t.strip()]


def ptx_batches(name: str, config_name: str | None, tokenizer, block_size: int, batch_size: int, seed: int):
    """An endless iterator of {input_ids, attention_mask, labels} blocks of `block_size` tokens (HF run_clm style:
    texts joined with EOS and cut into equal blocks), reshuffled each pass with `seed`."""
    ids: list[int] = []
    for text in _texts(name, config_name):
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n_blocks = len(ids) // block_size
    if n_blocks < 1:
        raise ValueError(f"--unsupervised_dataset_name {name}: fewer than {block_size} tokens of text")
    blocks = torch.tensor(ids[:n_blocks * block_size]).view(n_blocks, block_size)
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n_blocks, generator=generator)
        for start in range(0, n_blocks - batch_size + 1, batch_size) or [0]:
            x = blocks[order[start:start + batch_size]]
            yield {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}
