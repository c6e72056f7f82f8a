"""The one generation call of the project: training's generation mode, the chatbot and prompt_eval all use it.

Cheap to import (transformers is imported on call), so inference needs no DeepSpeed engine to reach it.
"""
from __future__ import annotations

from contextlib import contextmanager


def generate(module, input_ids, attention_mask, *, max_new_tokens: int, pad_token_id: int, eos_token_id: int | None,
             do_sample: bool = True, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             synced_gpus: bool = False, streamer=None, num_beams: int = 1, num_return_sequences: int = 1,
             penalty_alpha: float = 0.0):
    """HF generate with our sampling settings only: a checkpoint's generation_config cannot change them.

    transformers 5 fills every field a passed GenerationConfig leaves unset (repetition_penalty,
    no_repeat_ngram_size, min_new_tokens, bad_words_ids, suppress_tokens, ...) from `model.generation_config`, so
    the model's is swapped for a blank one during the call (`_own_settings`): rollouts then sample exactly the
    distribution whose log-probs PPO computes (softmax(logits / temperature), top_k/top_p as given).
    Stops at EOS, no minimum length (DeepSpeed-Chat's forced min_length made answers repeat to the limit).
    `num_beams` > 1: beam search; `penalty_alpha` > 0 (greedy, top_k candidates): contrastive search, run by
    chatrlhf.training.contrastive (transformers runs it only as code fetched from the Hub)."""
    from transformers import GenerationConfig

    if penalty_alpha > 0:
        from chatrlhf.training.contrastive import contrastive_search

        return contrastive_search(module, input_ids, attention_mask, top_k=top_k, penalty_alpha=penalty_alpha,
                                  max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, eos_token_id=eos_token_id)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad_token_id,
                              eos_token_id=eos_token_id, use_cache=True, num_beams=num_beams,
                              num_return_sequences=num_return_sequences,
                              **(dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}))
    with _own_settings(module, GenerationConfig):
        return module.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                               synced_gpus=synced_gpus, streamer=streamer)


@contextmanager
def _own_settings(module, config_class):
    """`module`'s generation_config replaced by a blank one for the call (a peft model reads its base model's),
    put back afterwards, also after an error."""
    model = module.get_base_model() if hasattr(module, "get_base_model") else module
    saved = getattr(model, "generation_config", None)
    model.generation_config = config_class()
    try:
        yield
    finally:
        model.generation_config = saved
