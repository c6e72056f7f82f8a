"""The one generation call of the project: training's generation mode, the chatbot and prompt_eval all use it.

Cheap to import (transformers is imported on call), so inference needs no DeepSpeed engine to reach it.
"""
from __future__ import annotations


def generate(module, input_ids, attention_mask, *, max_new_tokens: int, pad_token_id: int, eos_token_id: int | None,
             do_sample: bool = True, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             synced_gpus: bool = False, streamer=None):
    """HF generate with our sampling settings only (a checkpoint's generation_config cannot override them).

    Stops at EOS, no minimum length (DeepSpeed-Chat's forced min_length made answers repeat to the limit)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad_token_id,
                              eos_token_id=eos_token_id, use_cache=True,
                              **(dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}))
    return module.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                           synced_gpus=synced_gpus, streamer=streamer)
