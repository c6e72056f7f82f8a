"""A trained reward model outside training: load it, score answers exactly as training renders and scores them.

rw_eval, prompt_eval and the pipeline's report use these; the scoring rule itself is `value_model.end_scores`.
"""
from __future__ import annotations

import logging

import torch

from chatrlhf.training.data.collate import pad
from chatrlhf.training.data.messages import as_messages
from chatrlhf.training.data.render import encode_prompt, encode_responses
from chatrlhf.training.data.tokenize import budget
from chatrlhf.training.value_model import end_scores, token_values

logger = logging.getLogger(__name__)


def encode_answers(tokenizer, prompt, answers: list[str], max_seq_len: int) -> tuple[list[list[int]], int]:
    """(token ids of prompt + answer + EOS for each answer, how many were truncated), as in training."""
    p = encode_prompt(tokenizer, as_messages(prompt))
    out, truncated = [], 0
    for r in encode_responses(tokenizer, answers):
        kp, kr = budget(len(p), len(r), max_seq_len, max_seq_len)
        truncated += kp < len(p) or kr < len(r)
        out.append(p[len(p) - kp:] + r[:kr])
    return out, truncated


@torch.no_grad()
def score_ids(model, rows: list[list[int]], pad_id: int, batch_size: int = 8) -> list[float]:
    """Token-id rows -> their end scores, right-padded in batches of `batch_size`."""
    device = next(model.parameters()).device
    scores: list[float] = []
    for i in range(0, len(rows), batch_size):
        input_ids, attention_mask = pad(rows[i:i + batch_size], pad_id, "right")
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        scores += end_scores(token_values(model, input_ids, attention_mask), attention_mask).float().tolist()
    return scores


def score_texts(model, tokenizer, prompt, answers: list[str], max_seq_len: int = 2048,
                batch_size: int = 8) -> list[float]:
    """The reward model's score of each answer to `prompt` (a string or chat messages), in order.

    Rendering and scoring are those of training: prompt + answer + EOS, scored at the last token.
    """
    rows, truncated = encode_answers(tokenizer, prompt, list(answers), max_seq_len)
    if truncated:
        logger.warning("%d of %d answers were longer than max_seq_len=%d and were truncated", truncated, len(rows),
                       max_seq_len)
    was_training = model.training
    model.eval()  # no dropout noise in scores; the caller's mode is restored
    try:
        return score_ids(model, rows, tokenizer.pad_token_id, batch_size)
    finally:
        model.train(was_training)


def load_reward_model(name_or_path: str, dtype: str = "fp32"):
    """(model in eval mode on this machine's accelerator, tokenizer) of a saved reward model."""
    from transformers import AutoModelForSequenceClassification

    from chatrlhf.utils.distributed import device
    from chatrlhf.utils.models import load_tokenizer, model_location

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    tokenizer = load_tokenizer(name_or_path)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        model_location(name_or_path), num_labels=1, dtype=dtypes[dtype], output_loading_info=True, trust_remote_code=False)
    if any(k.startswith("score.") for k in info["missing_keys"]):
        raise ValueError(f"{name_or_path} has no trained score head (is it a step-2 output?); "
                         "its scores would be random")
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ValueError(f"{name_or_path}: the tokenizer has {len(tokenizer)} tokens but the model only "
                         f"{model.get_input_embeddings().num_embeddings} embeddings; save them together")
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device()).eval(), tokenizer
