"""Score answers with a trained reward model (DeepSpeed-Chat's rw_eval.py, for any saved model and any prompts).

  python -m chatrlhf.training.step2_reward.rw_eval --model_name_or_path output/step2_reward \\
      --prompt "How do I bake bread?" --answers "Mix flour, water, yeast and salt..." "No."
  python -m chatrlhf.training.step2_reward.rw_eval --model_name_or_path output/step2_reward \\
      --input_file pairs.jsonl --output_file scores.jsonl

Input records are {"prompt": ..., "answers": [...]} or any preference layout the data pipeline reads
({"prompt", "chosen", "rejected"}, HH-RLHF transcripts, ...); for pairs the pairwise accuracy is printed too.
A prompt is a user message, a "\\n\\nHuman: ...\\n\\nAssistant: ..." transcript or a list of chat messages. Each
answer is rendered exactly as in training (chatrlhf.training.data.render: prompt + answer + EOS) and scored at its
last token (chatrlhf.training.value_model). `score_texts` is the function to import.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from chatrlhf.training.data.collate import pad
from chatrlhf.training.data.formats import parse_transcript, user
from chatrlhf.training.data.render import encode_prompt, encode_responses
from chatrlhf.training.data.tokenize import budget
from chatrlhf.training.value_model import end_scores, token_values

logger = logging.getLogger(__name__)


@dataclass
class RwEvalConfig:
    """Score one prompt's answers, or a JSONL file of them, with a reward model."""

    model_name_or_path: str = "output/step2_reward"
    """A step-2 output folder (or any AutoModelForSequenceClassification with num_labels=1); default: step 2's."""
    prompt: Optional[str] = None
    """The prompt: a user message or a Human/Assistant transcript (with --answers)."""
    answers: list[str] = field(default_factory=list)
    """One or more answers to --prompt."""
    input_file: Optional[str] = None
    """A .jsonl/.json(.gz)/.parquet file of {prompt, answers: [...]} or {prompt, chosen, rejected} records."""
    output_file: Optional[str] = None
    """Write one JSON line per prompt: {prompt, answers, scores} (pairs also get chosen_wins)."""
    max_seq_len: int = 2048
    """Longest prompt + answer in tokens; longer ones lose prompt tokens from the left, then answer tokens (counted)."""
    batch_size: int = 8
    """Sequences per forward pass."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Precision to load the model in."""

    def __post_init__(self):
        if (self.input_file is None) == (self.prompt is None):
            raise ValueError("give either --prompt with --answers, or --input_file")
        if self.prompt is not None and not self.answers:
            raise ValueError("--prompt needs at least one answer in --answers")


def as_messages(prompt) -> list[dict]:
    """A prompt given as a user string, a Human/Assistant transcript, or chat messages -> chat messages."""
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                 and isinstance(m.get("content"), str) for m in prompt):
            raise ValueError("a prompt given as a list must hold {'role': str, 'content': str} messages")
        return prompt
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"a prompt must be a non-empty string or a list of messages, got {prompt!r}")
    if prompt.lstrip(" ").startswith(("\n\nHuman:", "Human:")):
        msgs = parse_transcript(prompt)  # a trailing empty "Assistant:" is dropped
        if not msgs or msgs[-1]["role"] != "user":
            raise ValueError("a prompt transcript must end with a Human turn (give the answers separately)")
        return msgs
    return [user(prompt)]


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
    from chatrlhf.utils.models import load_tokenizer
    from chatrlhf.utils.smollm2 import resolve_model_path

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    tokenizer = load_tokenizer(name_or_path)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(name_or_path), num_labels=1, dtype=dtypes[dtype], output_loading_info=True)
    if any(k.startswith("score.") for k in info["missing_keys"]):
        raise ValueError(f"{name_or_path} has no trained score head (is it a step-2 output?); "
                         "its scores would be random")
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ValueError(f"{name_or_path}: the tokenizer has {len(tokenizer)} tokens but the model only "
                         f"{model.get_input_embeddings().num_embeddings} embeddings; save them together")
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device()).eval(), tokenizer


def read_inputs(path: str) -> list[dict]:
    """{prompt, answers[, chosen_index]} records from a file of answer lists or of preference pairs."""
    from chatrlhf.training.data.formats import normalize
    from chatrlhf.training.data.sources import read_records

    if not Path(path).is_file():
        raise FileNotFoundError(f"--input_file: no such file {path}")
    records = list(read_records(Path(path)))
    if records and isinstance(records[0], dict) and "answers" in records[0]:
        out = []
        for i, r in enumerate(records):
            answers = r.get("answers") if isinstance(r, dict) else None
            if not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
                raise ValueError(f"{path}: record {i}: 'answers' must be a non-empty list of strings")
            try:
                out.append({"prompt": as_messages(r.get("prompt")), "answers": answers})
            except ValueError as e:
                raise ValueError(f"{path}: record {i}: {e}") from None
        return out
    columns, _ = normalize(records, path)
    return [{"prompt": p, "answers": [c] if r is None else [c, r], "pair": r is not None}
            for p, c, r in zip(columns["prompt"], columns["chosen"], columns["rejected"])]


def _short(text: str, width: int = 100) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 3] + "..."


def main(argv: list[str] | None = None) -> list[dict]:
    from chatrlhf.utils.config import parse_config

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_config(RwEvalConfig, argv)
    model, tokenizer = load_reward_model(cfg.model_name_or_path, cfg.dtype)
    items = (read_inputs(cfg.input_file) if cfg.input_file
             else [{"prompt": as_messages(cfg.prompt), "answers": list(cfg.answers)}])
    results, wins, pairs = [], 0, 0
    for i, item in enumerate(items):
        scores = score_texts(model, tokenizer, item["prompt"], item["answers"], cfg.max_seq_len, cfg.batch_size)
        result = {"prompt": item["prompt"], "answers": item["answers"], "scores": scores}
        print(f"[{i}] prompt: {_short(item['prompt'][-1]['content'])}")
        for answer, score in zip(item["answers"], scores):
            print(f"    {score:+.4f}  {_short(answer)}")
        if item.get("pair"):
            result["chosen_wins"] = scores[0] > scores[1]
            wins, pairs = wins + result["chosen_wins"], pairs + 1
        results.append(result)
    if pairs:
        print(f"pairwise accuracy: {wins / pairs:.4f} ({wins} of {pairs} chosen answers scored higher)")
    if cfg.output_file:
        Path(cfg.output_file).parent.mkdir(parents=True, exist_ok=True)
        with open(cfg.output_file, "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
        print(f"wrote {len(results)} records to {cfg.output_file}")
    return results


if __name__ == "__main__":
    main()
