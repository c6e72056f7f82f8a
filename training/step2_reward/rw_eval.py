"""Score answers with a trained reward model (DeepSpeed-Chat's rw_eval.py, for any saved model and any prompts).

  python -m chatrlhf.training.step2_reward.rw_eval --model_name_or_path output/step2_reward \\
      --prompt "How do I bake bread?" --answers "Mix flour, water, yeast and salt..." "No."
  python -m chatrlhf.training.step2_reward.rw_eval --model_name_or_path output/step2_reward \\
      --input_file pairs.jsonl --output_file scores.jsonl

  python -m chatrlhf.training.step2_reward.rw_eval --model_name_or_path output/step2_reward   # built-in pairs

Input records are {"prompt": ..., "answers": [...]} or any preference layout the data pipeline reads
({"prompt", "chosen", "rejected"}, HH-RLHF transcripts, ...); for pairs the pairwise accuracy is printed too.
With neither --prompt nor --input_file it scores built-in good/bad answer pairs, as DeepSpeed-Chat's rw_eval.py does
(its --num_padding_at_beginning and --add_eot_token are accepted and have no effect here).
A prompt is a user message, a "\\n\\nHuman: ...\\n\\nAssistant: ..." transcript or a list of chat messages. Each
answer is rendered exactly as in training (chatrlhf.training.data.render: prompt + answer + EOS) and scored at its
last token (chatrlhf.training.value_model). Import `score_texts` from chatrlhf.training.reward_model.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from chatrlhf.training.data.messages import as_messages
from chatrlhf.training.reward_model import load_reward_model, score_texts

# Scored when no input is given: a helpful answer, then an evasive or repetitive one, for each prompt.
BUILTIN_PAIRS = [
    ("Please tell me about Microsoft in a few sentences.",
     "Microsoft is an American technology company founded by Bill Gates and Paul Allen in 1975. It makes the "
     "Windows operating system, the Office applications and the Azure cloud platform, and it is one of the "
     "largest companies in the world by revenue.",
     "I'm not sure. I'm not sure. I'm not sure what you mean. I'm not sure."),
    ("Explain the moon landing to a 6 year old in a few sentences.",
     "A long time ago, in 1969, three astronauts flew a big rocket all the way to the moon. Two of them climbed "
     "down a ladder and walked on it, bouncing because the moon pulls on you less than the Earth does, and then "
     "they flew safely home.",
     "I don't know, I don't know."),
]

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
    num_padding_at_beginning: int = 1
    """DeepSpeed-Chat's flag; no effect: the score is read at the last token where attention_mask is 1."""
    add_eot_token: bool = False
    """DeepSpeed-Chat's flag; no effect: answers end with the tokenizer's EOS token."""

    def __post_init__(self):
        if self.input_file is not None and self.prompt is not None:
            raise ValueError("give either --prompt with --answers, or --input_file, not both (neither: the "
                             "built-in pairs)")
        if self.answers and self.prompt is None:
            raise ValueError("--answers needs --prompt")
        if self.prompt is not None and not self.answers:
            raise ValueError("--prompt needs at least one answer in --answers")


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
    from chatrlhf.training.dschat import print_notice

    cfg = parse_config(RwEvalConfig, argv)
    print_notice("rw_eval", RwEvalConfig, cfg, argv)
    model, tokenizer = load_reward_model(cfg.model_name_or_path, cfg.dtype)
    if cfg.input_file:
        items = read_inputs(cfg.input_file)
    elif cfg.prompt is not None:
        items = [{"prompt": as_messages(cfg.prompt), "answers": list(cfg.answers)}]
    else:
        items = [{"prompt": as_messages(p), "answers": [good, bad], "pair": True} for p, good, bad in BUILTIN_PAIRS]
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
