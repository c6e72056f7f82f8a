"""Per-token scalar outputs of a sequence-classification model, and THE rule for a sequence's score.

Step 2 trains the reward model with these; step 3 uses them for the critic (`values`, every token) and the
reward model (`scores`, one per sequence). A reward/value model is any Hugging Face
`AutoModelForSequenceClassification` with `num_labels=1` (a causal-LM backbone plus a linear `score` head), so
plain transformers loads what we save.

The score of a sequence is the head's output at its last real token: the last position where
`attention_mask == 1`. Under the end-of-text convention (CONTRIBUTING.md) that is the EOS closing the answer.
The rule looks only at the mask, never at token ids, so it is the same for left and right padding, for
truncated sequences (their last kept token) and for tokenizers whose pad id equals their eos id. DeepSpeed-Chat
searched ids for the (num_padding_at_beginning + 1)-th pad token instead (dschat.md §4.1), which needs an
OPT-specific offset and breaks when pad == eos.
"""
from __future__ import annotations

import inspect

import torch

from chatrlhf.training import packing

HEAD_NAME = "score"  # AutoModelForSequenceClassification's head in every family we support


def unwrap(model) -> torch.nn.Module:
    """The plain Hugging Face model inside a HybridEngine / DeepSpeedEngine / peft wrapper (or `model` itself)."""
    while True:
        if hasattr(model, "get_base_model"):  # peft: base_model.model is the HF model, LoRA layers injected
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # (Hybrid/DeepSpeed)Engine
            model = model.module
        else:
            return model


def checkpointing(model) -> bool:
    """Whether gradient checkpointing is on in the Hugging Face model inside `model` (transformers 5 renamed
    `is_gradient_checkpointing` to `is_activation_checkpointing`; the old name now warns)."""
    hf = unwrap(model)
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(hf), name):
            return bool(getattr(hf, name))
    return False


def score_head(model) -> torch.nn.Module:
    """The scalar head (`score`) of a sequence-classification model, through any wrapper."""
    hf = unwrap(model)
    head = getattr(hf, HEAD_NAME, None)
    if head is None:
        raise TypeError(f"{type(hf).__name__} has no {HEAD_NAME!r} head: load the model as "
                        "AutoModelForSequenceClassification with num_labels=1 "
                        "(chatrlhf.utils.models.load_model(head='score'))")
    return head


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """input_ids, attention_mask (B, T) -> the head's output at every position, (B, T), in the model's dtype.

    `model` is a sequence-classification model with a one-output `score` head, bare or wrapped (peft,
    `engine.module`, a HybridEngine or DeepSpeedEngine). The whole model is called (not its backbone and head
    separately): DeepSpeed ZeRO-3 gathers and releases parameters from hooks on the root module, and
    transformers' model already applies `score` to every position, so a forward hook on the head reads the
    per-token values with no second head call. Position ids count real tokens only, so a left-padded
    sequence gets the same values as the same sequence right-padded.
    """
    head = score_head(model)
    # Padding-free where it applies (chatrlhf.training.packing): padding positions get 0, not their padded value.
    hf = unwrap(model)
    packed = packing.maybe_pack(hf, input_ids, attention_mask)
    if packed is not None:
        values = _head_output(head, lambda: packing.call(model, hf, packed))
        if values is not None:
            return packed.unpack(values)
    kwargs = {}
    if accepts_position_ids(hf):  # not all families do (BLOOM's ALiBi reads the mask itself)
        kwargs["position_ids"] = position_ids(attention_mask)
    return _head_output(head, lambda: model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                            **kwargs))


def _head_output(head, forward) -> torch.Tensor | None:
    """The head's (B, T) output in `forward()`, read by a forward hook; None when `forward()` returns None (a
    refused packed forward)."""
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        if forward() is None:
            return None
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"the {HEAD_NAME!r} head ran {len(captured)} times in one forward; expected once")
    values = captured[0]
    if values.dim() != 3 or values.size(-1) != 1:
        raise ValueError(f"the {HEAD_NAME!r} head returned shape {tuple(values.shape)}; a reward/value model needs "
                         "num_labels=1, i.e. (B, T, 1)")
    return values.squeeze(-1)


def accepts_position_ids(hf_model) -> bool:
    return "position_ids" in inspect.signature(hf_model.forward).parameters


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """attention_mask (B, T) -> (B, T) long: 0, 1, 2, ... over the real tokens (padding gets its neighbour's)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """attention_mask (B, T) of 0/1 -> (B,) long: the last position where the mask is 1.

    Raises if a row has no real token (such a sequence has no score).
    """
    mask = attention_mask.bool()
    if not bool(mask.any(dim=1).all()):
        raise ValueError("a row of attention_mask is all zeros: an empty sequence has no last token")
    positions = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    # Positions are distinct, so the max over real positions is the last real one, for any padding side.
    return torch.where(mask, positions, -1).max(dim=1).values


def end_scores(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """values (B, T), attention_mask (B, T) -> scores (B,): the value at each row's last real token."""
    if values.shape != attention_mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and attention_mask {tuple(attention_mask.shape)} "
                         "differ in shape")
    index = last_token_index(attention_mask)
    return values.gather(1, index.unsqueeze(1)).squeeze(1)
