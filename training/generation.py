"""The one generation call of the project: training's generation mode, the chatbot and prompt_eval all use it.

Cheap to import (transformers is imported on call), so inference needs no DeepSpeed engine to reach it.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from chatrlhf.training.prepacked_linear import prepacked_linears


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
    with _own_settings(module, GenerationConfig), _categorical_sampling(input_ids.device), prepacked_linears(module):
        return module.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                               synced_gpus=synced_gpus, streamer=streamer, **_last_logit_only(module, input_ids))


def _last_logit_only(module, input_ids) -> dict:
    """generate's own `logits_to_keep=1` as an index tensor, for models that take it. The int makes transformers
    slice the prefill's hidden states into a strided (B, 1, H) view, and PyTorch's CPU matmul then copies the head
    weight once per row: 5.5 s and 5.3 GB for 100 rows of SmolLM2 against 9 ms (153 against 2.4 ms for 4),
    identical logits. Decoding steps (one position) are contiguous either way."""
    supports = getattr(_base_model(module), "_supports_logits_to_keep", None)
    if supports is None or not supports():
        return {}
    return {"logits_to_keep": torch.tensor([-1], device=input_ids.device)}


def _base_model(module):
    """The transformers model under a peft wrapper (the module itself without one)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


@contextmanager
def _own_settings(module, config_class):
    """`module`'s generation_config replaced by a blank one for the call (a peft model reads its base model's),
    put back afterwards, also after an error."""
    model = _base_model(module)
    saved = getattr(model, "generation_config", None)
    model.generation_config = config_class()
    try:
        yield
    finally:
        model.generation_config = saved


def sample_categorical(probs: torch.Tensor) -> torch.Tensor:
    """(B, V) non-negative weights -> (B, 1) long: one index per row, drawn with probability weight / row sum, by
    inverting the row's float64 CDF at one uniform draw per row.

    The distribution of `torch.multinomial(probs, 1)`, the random stream is not. The CPU multinomial draws an
    exponential variate for every one of the B x V entries: 171 ms against 21 ms for 100 rows of SmolLM2's 49,152
    tokens, and 28% of the time spent generating them. Zero weights are never drawn. Like multinomial, this refuses
    negative, NaN or infinite weights and rows that sum to zero."""
    if probs.dim() != 2:
        raise ValueError(f"expected (B, V) weights, got shape {tuple(probs.shape)}")
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)
    total = cdf[:, -1:]
    if not (torch.isfinite(total).all() and (total > 0).all() and (probs >= 0).all()):
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0, or a row sums to 0")
    u = torch.rand(probs.size(0), 1, dtype=torch.float64, device=probs.device) * total
    # The first entry whose CDF exceeds u: never a zero weight, and u < total (u in [0, 1) times total does not
    # round up to total in float64), so never past the last positive weight.
    return torch.searchsorted(cdf, u, right=True)


def _multinomial_by_inverse_cdf(multinomial):
    """`torch.multinomial` with `(probs, 1)` calls (how transformers' sampling draws the next token) sent to
    `sample_categorical`; every other call goes to `multinomial`."""

    def draw(input, num_samples, replacement=False, *, generator=None, out=None):  # noqa: A002 - torch's names
        if num_samples == 1 and generator is None and out is None and input.dim() == 2:
            return sample_categorical(input)
        return multinomial(input, num_samples, replacement, generator=generator, out=out)

    return draw


@contextmanager
def _categorical_sampling(device: torch.device):
    """On CPU, where multinomial is slow, `torch.multinomial` is replaced for the call. Not a TorchFunctionMode, which
    made every op of a decoding step pay (74 -> 85 ms a step at 4 rows, more than the 6 ms the sampling saves there).
    The draws follow the same distribution from another random stream, so this is not one of the fast paths that
    $CHATRLHF_FAST_PATHS turns off to compare numbers. Other accelerators keep torch.multinomial."""
    if device.type != "cpu":
        yield
        return
    multinomial = torch.multinomial
    torch.multinomial = _multinomial_by_inverse_cdf(multinomial)
    try:
        yield
    finally:
        torch.multinomial = multinomial
