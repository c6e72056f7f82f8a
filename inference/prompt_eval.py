"""The same prompts through a baseline and a fine-tuned model, answers side by side (DeepSpeed-Chat's prompt_eval).

  python -m chatrlhf.inference.prompt_eval --model_name_or_path_baseline output/step1_sft \\
      --model_name_or_path_finetune output/step3_ppo/actor
  python -m chatrlhf.inference.prompt_eval --model_name_or_path_baseline smollm2-135m-instruct \\
      --model_name_or_path_finetune output/step1_sft --reward_model_name_or_path output/step2_reward \\
      --prompts_file prompts.jsonl --output_file compare.jsonl
  python -m chatrlhf.inference.prompt_eval ... --prompts "How do I bake bread?" "Write a haiku about rain." \\
      --do_sample --temperature 0.7 --top_p 0.9 --seed 1

Prompts come from --prompts, --prompts_file (.txt: one per line; .jsonl: one {"prompt": ...} per line, a prompt being
a user message, a "Human: ... Assistant:" transcript or a list of chat messages), or else six built-in English ones.
Each prompt is rendered as in training (chat template, else the Human/Assistant form). Decoding is greedy unless
--do_sample, so differences come from the models. Each model is loaded as training loads it, generates through the
generation mode of training's engine (chatrlhf.training.hybrid_engine), and is freed before the next. Given
--reward_model_name_or_path, every answer gets the reward model's score (as step 2's rw_eval computes it) and the
mean per model is printed. `compare(...)` is the function to import; --output_file writes its records as JSONL.
"""
from __future__ import annotations

import contextlib
import gc
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from chatrlhf.training.config import Dtype, GenerationArgs
from chatrlhf.training.data.collate import pad
from chatrlhf.training.data.render import encode_prompts
from chatrlhf.training.data.messages import as_messages
from chatrlhf.utils.config import group, parse_config

DEFAULT_PROMPTS = [
    "Please tell me about Microsoft in a few sentences.",
    "Explain the moon landing to a 6 year old in a few sentences.",
    "Write a short poem about a wise frog.",
    "Who was president of the United States in 1955?",
    "How does a telescope work?",
    "Why do birds migrate south for the winter?",
]
MODELS = ("baseline", "finetune")


@dataclass
class PromptEvalConfig:
    """Answers of a baseline and a fine-tuned model to the same prompts, side by side (and their reward scores)."""

    model_name_or_path_baseline: str
    """The model before fine-tuning (e.g. the base model or the step-1 output); hub id, folder or smollm2-135m-instruct."""
    model_name_or_path_finetune: str
    """The fine-tuned model (e.g. the step-1 output or the step-3 actor)."""
    prompts: list[str] = field(default_factory=list)
    """Prompts given on the command line (default: six built-in English prompts)."""
    prompts_file: Optional[str] = None
    """A .txt file (one prompt per line) or .jsonl file (one {"prompt": ...} per line) instead of --prompts."""
    reward_model_name_or_path: Optional[str] = None
    """A step-2 output: score every answer and print the mean score per model."""
    output_file: Optional[str] = None
    """Write one JSON line per prompt: {prompt, baseline, finetune[, baseline_score, finetune_score]}."""
    max_new_tokens: int = 100
    """Most tokens per answer; an answer ends earlier at the EOS token."""
    batch_size: int = 8
    """Prompts generated together."""
    dtype: Dtype = "auto"
    """Precision: fp32, bf16, fp16, or auto (bf16 where the accelerator supports it, else fp32)."""
    seed: int = 1234
    """Seed set before each model generates (with --do_sample both models see the same random stream)."""
    gen: GenerationArgs = group(GenerationArgs, do_sample=False)

    def __post_init__(self):
        if self.prompts and self.prompts_file:
            raise ValueError("give either --prompts or --prompts_file, not both")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("--max_new_tokens and --batch_size must be >= 1")


def read_prompts(path: str) -> list:
    """Prompts from a .txt file (one per non-empty line) or a .jsonl file ({"prompt": ...} or a bare string per line)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--prompts_file: no such file {path}")
    lines = [(i, line.strip()) for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)]
    lines = [(i, line) for i, line in lines if line]
    if p.suffix not in (".jsonl", ".json"):
        return [line for _, line in lines]
    prompts = []
    for i, line in lines:
        try:
            record = json.loads(line)
            prompt = record["prompt"] if isinstance(record, dict) else record
            as_messages(prompt)  # checks the layout
        except (json.JSONDecodeError, KeyError, ValueError) as e:
            raise ValueError(f"{path}: line {i}: expected {{\"prompt\": ...}} with a non-empty prompt: {e!r}") from None
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def generate_answers(path: str, prompts: list, *, max_new_tokens: int = 100, gen_args: GenerationArgs | None = None,
                     dtype: str = "auto", batch_size: int = 8, seed: int = 1234) -> list[str]:
    """The answers of the model at `path` to `prompts` (strings or chat messages), through training's generation mode."""
    from transformers import set_seed

    from chatrlhf.training.hybrid_engine import build_engine
    from chatrlhf.training.precision import DTYPES, training_dtype
    from chatrlhf.utils.models import load_model, load_tokenizer

    gen_args = gen_args or GenerationArgs(do_sample=False)
    dtype = training_dtype(dtype)
    tokenizer = load_tokenizer(path)
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's start-up prints are not answers
        engine = build_engine(load_model(path, tokenizer, head="causal_lm", dtype=DTYPES[dtype]), zero_stage=0,
                              dtype=dtype, micro_batch_size=1, trainable=False)
    set_seed(seed)
    eos, answers = tokenizer.eos_token_id, []
    try:
        with engine.generation() as gen:
            for i in range(0, len(prompts), batch_size):
                rows = encode_prompts(tokenizer, [as_messages(p) for p in prompts[i:i + batch_size]])
                input_ids, attention_mask = pad(rows, tokenizer.pad_token_id, "left")
                sequences = gen(input_ids.to(engine.device), attention_mask.to(engine.device),
                                max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=eos, **gen_args.sampling())
                for row in sequences[:, input_ids.size(1):].tolist():
                    row = row[:row.index(eos)] if eos in row else row
                    answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        del engine
        _release()
    return answers


def score_answers(reward_path: str, prompts: list, answers: dict[str, list[str]], dtype: str = "auto") -> dict:
    """{model: [reward score of each answer]} for {model: [answer to each prompt]}."""
    from chatrlhf.training.precision import training_dtype
    from chatrlhf.training.reward_model import load_reward_model, score_texts

    model, tokenizer = load_reward_model(reward_path, training_dtype(dtype))
    scores = {name: [] for name in answers}
    for i, prompt in enumerate(prompts):
        row = score_texts(model, tokenizer, as_messages(prompt), [answers[name][i] for name in answers])
        for name, s in zip(answers, row):
            scores[name].append(s)
    del model
    _release()
    return scores


def _release() -> None:
    from chatrlhf.utils.distributed import accelerator

    gc.collect()
    accelerator().empty_cache()


def compare(baseline: str, finetune: str, prompts: list | None = None, *, reward_model: str | None = None,
            max_new_tokens: int = 100, gen_args: GenerationArgs | None = None, dtype: str = "auto",
            batch_size: int = 8, seed: int = 1234) -> list[dict]:
    """One record per prompt: {prompt, baseline, finetune} answers, plus {baseline_score, finetune_score} given a
    reward model. One model is in memory at a time."""
    prompts = list(prompts) if prompts else list(DEFAULT_PROMPTS)
    kw = dict(max_new_tokens=max_new_tokens, gen_args=gen_args, dtype=dtype, batch_size=batch_size, seed=seed)
    answers = {name: generate_answers(path, prompts, **kw) for name, path in zip(MODELS, (baseline, finetune))}
    records = [{"prompt": p, **{name: answers[name][i] for name in MODELS}} for i, p in enumerate(prompts)]
    if reward_model:
        scores = score_answers(reward_model, prompts, answers, dtype)
        for i, r in enumerate(records):
            r.update({f"{name}_score": scores[name][i] for name in MODELS})
    return records


def mean_scores(records: list[dict]) -> dict[str, float]:
    """{model: mean reward score} over records that have scores (empty without a reward model)."""
    if not records or "baseline_score" not in records[0]:
        return {}
    return {name: sum(r[f"{name}_score"] for r in records) / len(records) for name in MODELS}


def format_records(records: list[dict], paths: tuple[str, str] = MODELS) -> str:
    """The side-by-side text: per prompt, each model's answer (and score)."""
    out = []
    for i, r in enumerate(records, 1):
        prompt = r["prompt"] if isinstance(r["prompt"], str) else as_messages(r["prompt"])[-1]["content"]
        out.append(f"==== [{i}/{len(records)}] prompt: {prompt}")
        for name, path in zip(MODELS, paths):
            score = f" score {r[name + '_score']:+.4f}" if name + "_score" in r else ""
            out.append(f"---- {name} ({path}){score}:\n{r[name] or '(empty answer)'}")
    means = mean_scores(records)
    if means:
        out.append("==== mean reward score: " + ", ".join(f"{n} {v:+.4f}" for n, v in means.items())
                   + f" (finetune - baseline {means['finetune'] - means['baseline']:+.4f}, {len(records)} prompts)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = parse_config(PromptEvalConfig, argv)
    prompts = read_prompts(cfg.prompts_file) if cfg.prompts_file else cfg.prompts
    paths = (cfg.model_name_or_path_baseline, cfg.model_name_or_path_finetune)
    records = compare(*paths, prompts, reward_model=cfg.reward_model_name_or_path, max_new_tokens=cfg.max_new_tokens,
                      gen_args=cfg.gen, dtype=cfg.dtype, batch_size=cfg.batch_size, seed=cfg.seed)
    print(format_records(records, paths), flush=True)
    if cfg.output_file:
        Path(cfg.output_file).parent.mkdir(parents=True, exist_ok=True)
        with open(cfg.output_file, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        print(f"wrote {len(records)} records to {cfg.output_file}")
    return records


if __name__ == "__main__":
    main()
