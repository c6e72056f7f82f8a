"""Tiny models that say something: the shared fixture's random models answer greedily with a single repeated
token (often a newline); re-drawing their weights with a larger spread makes answers depend on the prompt."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def chatty_model_dir(tiny_model_dir, tmp_path_factory):
    """`chatty_model_dir(family="llama", chat_template=True, seed=1)` -> the path of a saved model + tokenizer folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache: dict = {}

    def make(family: str = "llama", chat_template: bool = True, seed: int = 1):
        key = (family, chat_template, seed)
        if key not in cache:
            src = tiny_model_dir(family, chat_template=chat_template)
            model = AutoModelForCausalLM.from_pretrained(src)
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    if p.ndim >= 2:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            out = tmp_path_factory.mktemp(f"chatty-{family}-{seed}")
            model.save_pretrained(out)
            AutoTokenizer.from_pretrained(src).save_pretrained(out)
            cache[key] = str(out)
        return cache[key]

    return make
