"""The same prompts through a baseline and a fine-tuned model, answers side by side (DeepSpeed-Chat's prompt_eval).

  python -m chatrlhf.inference.prompt_eval --model_name_or_path_baseline output/step1_sft \\
      --model_name_or_path_finetune output/step3_ppo/actor
  python -m chatrlhf.inference.prompt_eval --model_name_or_path_baseline smollm2-135m-instruct \\
      --model_name_or_path_finetune output/step1_sft --reward_model_name_or_path output/step2_reward \\
      --prompts_file prompts.jsonl --output_file compare.jsonl
  python -m chatrlhf.inference.prompt_eval ... --prompts "How do I bake bread?" "Write a haiku about rain." \\
      --do_sample --temperature 0.7 --top_p 0.9 --seed 1

Prompts come from --prompts, --prompts_file (.txt: one per line; .jsonl: one {"prompt": ...} per line, a prompt being
a user message, a "Human: ... Assistant:" transcript or a list of chat messages), or else six built-in ones in
--language English, Chinese or Japanese. Each prompt is rendered as in training (chat template, else the
Human/Assistant form). Decoding is greedy unless --do_sample (sampling), --num_beams N (beam search) or
--penalty_alpha A with --top_k K (contrastive search), so differences come from the models; --num_return_sequences
gives several answers per prompt (sampling or beams). DeepSpeed-Chat's prompt_eval.py takes the same flags but
always decoded greedily. Each model is loaded as training loads it, generates through the
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
from typing import Literal, Optional

from chatrlhf.training.config import Dtype, GenerationArgs
from chatrlhf.training.data.collate import pad
from chatrlhf.training.data.render import encode_prompts
from chatrlhf.training.data.messages import as_messages
from chatrlhf.training.vllm_backend import INSTALL_HINT, GenerationBackend, vllm_installed
from chatrlhf.utils.config import group, parse_config

DEFAULT_PROMPTS = [
    "Please tell me about Microsoft in a few sentences.",
    "Explain the moon landing to a 6 year old in a few sentences.",
    "Write a short poem about a wise frog.",
    "Who was president of the United States in 1955?",
    "How does a telescope work?",
    "Why do birds migrate south for the winter?",
]
PROMPTS_BY_LANGUAGE = {
    "English": DEFAULT_PROMPTS,
    "Chinese": [
        "请用几句话介绍一下微软公司。",
        "用几句话向一个六岁的孩子解释登月。",
        "写一首关于一只聪明的青蛙的短诗。",
        "1955年的美国总统是谁？",
        "望远镜是怎么工作的？",
        "为什么鸟类冬天要飞往南方？",
    ],
    "Japanese": [
        "マイクロソフトについて数文で教えてください。",
        "6歳の子どもに月面着陸を数文で説明してください。",
        "賢いカエルについての短い詩を書いてください。",
        "1955年のアメリカ合衆国の大統領は誰でしたか？",
        "望遠鏡はどのような仕組みで動きますか？",
        "鳥はなぜ冬に南へ渡るのですか？",
    ],
}
CONTRASTIVE_TOP_K = 4  # DeepSpeed-Chat's --top_k default: contrastive search's k when --top_k is not given
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
    language: Literal["English", "Chinese", "Japanese"] = "English"
    """Language of the six built-in prompts used without --prompts or --prompts_file."""
    num_return_sequences: int = 1
    """Answers per prompt and model (more than 1 needs --do_sample or --num_beams at least as large)."""
    num_beams: int = 1
    """Beam search with this many beams (1: off)."""
    num_beam_groups: int = 1
    """Diverse beam search groups: only 1 (transformers runs group beam search as code fetched from the Hub, which
    chatrlhf does not run)."""
    penalty_alpha: float = 0.0
    """Contrastive search: the degeneration penalty, with --top_k candidates (4 if --top_k is not set); 0: off."""
    add_eot_token: bool = False
    """DeepSpeed-Chat's flag; no effect: answers end at the tokenizer's EOS token."""
    generation_backend: GenerationBackend = "hf"
    """What generates: hf (Hugging Face generate through training's generation mode) or vllm (a vLLM engine given
    each model's weights; greedy or sampling only; the `[vllm]` extra)."""
    gen: GenerationArgs = group(GenerationArgs, do_sample=False)

    def __post_init__(self):
        if self.prompts and self.prompts_file:
            raise ValueError("give either --prompts or --prompts_file, not both")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("--max_new_tokens and --batch_size must be >= 1")
        check_decoding(self.gen, num_beams=self.num_beams, num_beam_groups=self.num_beam_groups,
                       penalty_alpha=self.penalty_alpha, num_return_sequences=self.num_return_sequences)
        if self.generation_backend == "vllm":
            if not vllm_installed():
                raise ValueError(f"--generation_backend vllm: the vllm package is not installed; {INSTALL_HINT}")
            if self.num_beams > 1 or self.penalty_alpha > 0:
                raise ValueError("--generation_backend vllm samples or decodes greedily: --num_beams and "
                                 "--penalty_alpha need --generation_backend hf")

    def decoding(self) -> dict:
        """The decoding keywords of generate_answers/compare."""
        return dict(num_beams=self.num_beams, penalty_alpha=self.penalty_alpha,
                    num_return_sequences=self.num_return_sequences, generation_backend=self.generation_backend)


def check_decoding(gen: GenerationArgs, *, num_beams: int = 1, num_beam_groups: int = 1, penalty_alpha: float = 0.0,
                   num_return_sequences: int = 1) -> None:
    """Refuses decoding settings that do not go together, naming the flags."""
    if num_beams < 1 or num_return_sequences < 1:
        raise ValueError("--num_beams and --num_return_sequences must be >= 1")
    if num_beam_groups != 1:
        raise ValueError("--num_beam_groups > 1 (diverse beam search) is not supported: transformers runs it as code "
                         "fetched from the Hub, which chatrlhf does not run; use --num_beams alone")
    if not 0.0 <= penalty_alpha <= 1.0:
        raise ValueError(f"--penalty_alpha must be in [0, 1], got {penalty_alpha}")
    if penalty_alpha > 0 and (gen.do_sample or num_beams > 1 or num_return_sequences > 1):
        raise ValueError("--penalty_alpha (contrastive search) decodes one answer deterministically: not with "
                         "--do_sample, --num_beams > 1 or --num_return_sequences > 1")
    if penalty_alpha > 0 and gen.top_k == 1:
        raise ValueError("--penalty_alpha (contrastive search) needs --top_k of at least 2 candidates")
    if num_return_sequences > 1 and not gen.do_sample and num_return_sequences > num_beams:
        raise ValueError(f"--num_return_sequences {num_return_sequences} needs --do_sample or --num_beams >= "
                         f"{num_return_sequences}: greedy decoding gives one answer")


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
                     dtype: str = "auto", batch_size: int = 8, seed: int = 1234, num_beams: int = 1,
                     penalty_alpha: float = 0.0, num_return_sequences: int = 1, generation_backend: str = "hf") -> list:
    """The answers of the model at `path` to `prompts` (strings or chat messages), through training's generation mode:
    one string per prompt, or a list of `num_return_sequences` strings per prompt when that is above 1.
    `generation_backend="vllm"`: a vLLM engine, handed the model's weights, generates (training/vllm_backend.py)."""
    from transformers import set_seed

    from chatrlhf.training.hybrid_engine import build_engine
    from chatrlhf.training.precision import DTYPES, training_dtype
    from chatrlhf.utils.models import load_model, load_tokenizer

    gen_args = gen_args or GenerationArgs(do_sample=False)
    check_decoding(gen_args, num_beams=num_beams, penalty_alpha=penalty_alpha,
                   num_return_sequences=num_return_sequences)
    sampling = gen_args.sampling()
    if penalty_alpha > 0 and not sampling["top_k"]:
        sampling["top_k"] = CONTRASTIVE_TOP_K
    n = num_return_sequences
    dtype = training_dtype(dtype)
    tokenizer = load_tokenizer(path)
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's start-up prints are not answers
        engine = build_engine(load_model(path, tokenizer, head="causal_lm", dtype=DTYPES[dtype]), zero_stage=0,
                              dtype=dtype, micro_batch_size=1, trainable=False)
        generator = None
        if generation_backend == "vllm":
            from chatrlhf.training.vllm_backend import VLLMGenerator

            generator = VLLMGenerator(engine.module, dtype=DTYPES[dtype], seed=seed)
    set_seed(seed)
    eos, answers = tokenizer.eos_token_id, []
    try:
        with engine.generation(backend=generator) as gen:
            for i in range(0, len(prompts), batch_size):
                rows = encode_prompts(tokenizer, [as_messages(p) for p in prompts[i:i + batch_size]])
                input_ids, attention_mask = pad(rows, tokenizer.pad_token_id, "left")
                sequences = gen(input_ids.to(engine.device), attention_mask.to(engine.device),
                                max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=eos, num_beams=num_beams, penalty_alpha=penalty_alpha,
                                num_return_sequences=n, **sampling)
                texts = []
                for row in sequences[:, input_ids.size(1):].tolist():
                    row = row[:row.index(eos)] if eos in row else row
                    texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
                # generate returns a prompt's n answers next to each other
                answers += texts if n == 1 else [texts[j:j + n] for j in range(0, len(texts), n)]
    finally:
        if generator is not None:
            generator.close()
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
        # An entry is one answer, or a list of answers (--num_return_sequences), which get a list of scores.
        entries = [answers[name][i] for name in answers]
        flat = [a for e in entries for a in ([e] if isinstance(e, str) else e)]
        row = iter(score_texts(model, tokenizer, as_messages(prompt), flat))
        for name, e in zip(answers, entries):
            scores[name].append(next(row) if isinstance(e, str) else [next(row) for _ in e])
    del model
    _release()
    return scores


def _release() -> None:
    from chatrlhf.utils.distributed import accelerator

    gc.collect()
    accelerator().empty_cache()


def compare(baseline: str, finetune: str, prompts: list | None = None, *, reward_model: str | None = None,
            max_new_tokens: int = 100, gen_args: GenerationArgs | None = None, dtype: str = "auto",
            batch_size: int = 8, seed: int = 1234, language: str = "English", num_beams: int = 1,
            penalty_alpha: float = 0.0, num_return_sequences: int = 1, generation_backend: str = "hf") -> list[dict]:
    """One record per prompt: {prompt, baseline, finetune} answers, plus {baseline_score, finetune_score} given a
    reward model (with num_return_sequences > 1 each answer and score is a list). Without prompts: the built-in
    ones of `language`. One model is in memory at a time."""
    prompts = list(prompts) if prompts else list(PROMPTS_BY_LANGUAGE[language])
    kw = dict(max_new_tokens=max_new_tokens, gen_args=gen_args, dtype=dtype, batch_size=batch_size, seed=seed,
              num_beams=num_beams, penalty_alpha=penalty_alpha, num_return_sequences=num_return_sequences,
              generation_backend=generation_backend)
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
    means = {}
    for name in MODELS:
        values = [v for r in records for v in (r[f"{name}_score"] if isinstance(r[f"{name}_score"], list)
                                               else [r[f"{name}_score"]])]
        means[name] = sum(values) / len(values)
    return means


def format_records(records: list[dict], paths: tuple[str, str] = MODELS) -> str:
    """The side-by-side text: per prompt, each model's answer (and score)."""
    out = []
    for i, r in enumerate(records, 1):
        prompt = r["prompt"] if isinstance(r["prompt"], str) else as_messages(r["prompt"])[-1]["content"]
        out.append(f"==== [{i}/{len(records)}] prompt: {prompt}")
        for name, path in zip(MODELS, paths):
            answers = [r[name]] if isinstance(r[name], str) else r[name]
            scores = r.get(name + "_score")
            scores = None if scores is None else [scores] if not isinstance(scores, list) else scores
            for j, answer in enumerate(answers):
                score = f" score {scores[j]:+.4f}" if scores is not None else ""
                which = f" #{j + 1}" if len(answers) > 1 else ""
                out.append(f"---- {name}{which} ({path}){score}:\n{answer or '(empty answer)'}")
    means = mean_scores(records)
    if means:
        out.append("==== mean reward score: " + ", ".join(f"{n} {v:+.4f}" for n, v in means.items())
                   + f" (finetune - baseline {means['finetune'] - means['baseline']:+.4f}, {len(records)} prompts)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[dict]:
    from chatrlhf.training.dschat import print_notice

    cfg = parse_config(PromptEvalConfig, argv)
    print_notice("prompt_eval", PromptEvalConfig, cfg, argv)
    prompts = read_prompts(cfg.prompts_file) if cfg.prompts_file else cfg.prompts
    paths = (cfg.model_name_or_path_baseline, cfg.model_name_or_path_finetune)
    records = compare(*paths, prompts, reward_model=cfg.reward_model_name_or_path, max_new_tokens=cfg.max_new_tokens,
                      gen_args=cfg.gen, dtype=cfg.dtype, batch_size=cfg.batch_size, seed=cfg.seed,
                      language=cfg.language, **cfg.decoding())
    print(format_records(records, paths), flush=True)
    if cfg.output_file:
        Path(cfg.output_file).parent.mkdir(parents=True, exist_ok=True)
        with open(cfg.output_file, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        print(f"wrote {len(records)} records to {cfg.output_file}")
    return records


if __name__ == "__main__":
    main()
