"""prompt_eval: two tiny models side by side through training's generation mode, with and without a reward model."""
from __future__ import annotations

import json

import pytest
import torch

from chatrlhf.inference.chatbot import Chat
from chatrlhf.inference.prompt_eval import (DEFAULT_PROMPTS, PromptEvalConfig, compare, format_records, main,
                                            mean_scores, read_prompts)
from chatrlhf.training.reward_model import load_reward_model, score_texts
from chatrlhf.utils.config import parse_config
from chatrlhf.utils.models import load_model, load_tokenizer

PROMPTS = ["hello there", "How do I bake bread?"]


@pytest.fixture(scope="module")
def two_models(chatty_model_dir):
    """A chat-template llama and a Human/Assistant gpt2: different models, tokenizers and renderings."""
    return chatty_model_dir("llama"), chatty_model_dir("gpt2", chat_template=False)


def test_both_answers_for_each_prompt_and_jsonl(two_models, tmp_path, capsys):
    baseline, finetune = two_models
    out_file = tmp_path / "out" / "compare.jsonl"
    records = main(["--model_name_or_path_baseline", baseline, "--model_name_or_path_finetune", finetune,
                    "--prompts", *PROMPTS, "--max_new_tokens", "8", "--dtype", "fp32",
                    "--output_file", str(out_file)])
    stdout = capsys.readouterr().out
    assert [r["prompt"] for r in records] == PROMPTS
    for r in records:
        assert r["baseline"] and r["finetune"] and r["baseline"] != r["finetune"]  # different models, greedy
        assert "baseline_score" not in r
    # side by side: per prompt, the prompt then the baseline's answer then the fine-tuned one's
    pos = 0
    for r in records:
        for text in (f"prompt: {r['prompt']}", f"baseline ({baseline})", r["baseline"], f"finetune ({finetune})",
                     r["finetune"]):
            pos = stdout.index(text, pos)
    assert "mean reward score" not in stdout
    assert [json.loads(line) for line in out_file.read_text().splitlines()] == records


def test_answers_are_the_chatbots_greedy_answers(two_models):
    """Training's generation mode (batched, left-padded) and the chatbot give the same greedy answer."""
    records = compare(*two_models, PROMPTS, max_new_tokens=8, dtype="fp32")
    for name, path in zip(("baseline", "finetune"), two_models):
        tok = load_tokenizer(path)
        model = load_model(path, tok, dtype=torch.float32)
        for r in records:
            assert Chat(model, tok, max_new_tokens=8).reply(r["prompt"]) == r[name]


def test_reward_scores_and_means(two_models, tiny_model_dir, tmp_path, capsys):
    reward = str(tiny_model_dir("llama", head="score"))
    out_file = tmp_path / "scored.jsonl"
    records = main(["--model_name_or_path_baseline", two_models[0], "--model_name_or_path_finetune", two_models[1],
                    "--prompts", *PROMPTS, "--max_new_tokens", "8", "--dtype", "fp32",
                    "--reward_model_name_or_path", reward, "--output_file", str(out_file)])
    stdout = capsys.readouterr().out
    model, tok = load_reward_model(reward, "fp32")
    for r in records:
        expected = score_texts(model, tok, r["prompt"], [r["baseline"], r["finetune"]])
        assert [r["baseline_score"], r["finetune_score"]] == pytest.approx(expected, abs=1e-5)
        assert f"score {r['baseline_score']:+.4f}" in stdout and f"score {r['finetune_score']:+.4f}" in stdout
    means = mean_scores(records)
    assert means["baseline"] == pytest.approx(sum(r["baseline_score"] for r in records) / len(records))
    assert f"mean reward score: baseline {means['baseline']:+.4f}, finetune {means['finetune']:+.4f}" in stdout
    assert json.loads(out_file.read_text().splitlines()[0])["finetune_score"] == records[0]["finetune_score"]


def test_default_prompts_and_sampling(two_models):
    records = compare(*two_models, max_new_tokens=2, dtype="fp32")
    assert [r["prompt"] for r in records] == DEFAULT_PROMPTS
    args = parse_config(PromptEvalConfig, ["--model_name_or_path_baseline", "a", "--model_name_or_path_finetune", "b",
                                           "--do_sample", "--top_k", "5"]).gen
    first = compare(*two_models, PROMPTS[:1], max_new_tokens=6, gen_args=args, dtype="fp32", seed=3)
    assert first == compare(*two_models, PROMPTS[:1], max_new_tokens=6, gen_args=args, dtype="fp32", seed=3)


def test_prompts_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n  second prompt  \n")
    assert read_prompts(str(txt)) == ["first prompt", "second prompt"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in (
        {"prompt": "plain"}, "bare string", {"prompt": messages}, {"prompt": "\n\nHuman: hey\n\nAssistant:"})) + "\n")
    prompts = read_prompts(str(jsonl))
    assert prompts == ["plain", "bare string", messages, "\n\nHuman: hey\n\nAssistant:"]
    text = format_records([{"prompt": messages, "baseline": "a", "finetune": ""}])
    assert "prompt: hi" in text and "(empty answer)" in text
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2"):
        read_prompts(str(bad))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_prompts(str(tmp_path / "missing.txt"))


def test_flags():
    base = ["--model_name_or_path_baseline", "a", "--model_name_or_path_finetune", "b"]
    cfg = parse_config(PromptEvalConfig, base)
    assert (cfg.gen.do_sample, cfg.max_new_tokens, cfg.prompts, cfg.reward_model_name_or_path) == (False, 100, [], None)
    with pytest.raises(SystemExit):
        parse_config(PromptEvalConfig, base + ["--prompts", "x", "--prompts_file", "p.txt"])
    with pytest.raises(SystemExit):
        parse_config(PromptEvalConfig, ["--model_name_or_path_baseline", "a"])


def test_language_prompt_sets(two_models):
    from chatrlhf.inference.prompt_eval import PROMPTS_BY_LANGUAGE

    records = compare(*two_models, max_new_tokens=2, dtype="fp32", language="Japanese")
    assert [r["prompt"] for r in records] == PROMPTS_BY_LANGUAGE["Japanese"]
    assert len(PROMPTS_BY_LANGUAGE["Chinese"]) == len(DEFAULT_PROMPTS)


def test_beam_search_returns_several_answers_with_scores(two_models, tiny_model_dir, capsys):
    reward = str(tiny_model_dir("llama", head="score"))
    records = main(["--model_name_or_path_baseline", two_models[0], "--model_name_or_path_finetune", two_models[1],
                    "--prompts", PROMPTS[0], "--max_new_tokens", "4", "--dtype", "fp32", "--num_beams", "3",
                    "--num_return_sequences", "2", "--reward_model_name_or_path", reward])
    out = capsys.readouterr().out
    for name in ("baseline", "finetune"):
        answers, scores = records[0][name], records[0][f"{name}_score"]
        assert isinstance(answers, list) and len(answers) == 2 and len(scores) == 2
        assert f"---- {name} #2" in out
    assert "--num_beams: beam search" in out  # the start-up notice: DeepSpeed-Chat's prompt_eval ignored it
    assert set(mean_scores(records)) == {"baseline", "finetune"}


def test_contrastive_search_through_prompt_eval(two_models):
    greedy = compare(*two_models, PROMPTS, max_new_tokens=5, dtype="fp32")
    almost_greedy = compare(*two_models, PROMPTS, max_new_tokens=5, dtype="fp32", penalty_alpha=1e-9)
    assert almost_greedy == greedy  # a vanishing penalty picks the most likely token
    contrastive = compare(*two_models, PROMPTS, max_new_tokens=5, dtype="fp32", penalty_alpha=0.9)
    assert [r["prompt"] for r in contrastive] == PROMPTS and all(isinstance(r["baseline"], str) for r in contrastive)
