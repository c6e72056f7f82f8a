"""The chatbot: driven through a real pipe, and through its function API (history, rendering, streaming, context)."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch

from chatrlhf.inference.chatbot import Chat, ChatbotConfig, converse, load_chat, main
from chatrlhf.training.config import GenerationArgs
from chatrlhf.training.data.render import encode_prompt, render_prompt
from chatrlhf.utils.config import parse_config
from chatrlhf.utils.models import load_model, load_tokenizer


def words(text: str) -> list[str]:
    return text.split()


def chatbot(path, stdin: str, *args: str, cwd) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "chatrlhf.inference.chatbot", "--path", str(path), "--max_new_tokens", "8", *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def loaded(chatty_model_dir):
    """{chat_template: (model, tokenizer)} in fp32, loaded as the chatbot loads them."""
    out = {}
    for template, family in ((True, "llama"), (False, "gpt2")):
        path = chatty_model_dir(family, chat_template=template)
        tok = load_tokenizer(path)
        out[template] = load_model(path, tok, dtype=torch.float32), tok
    return out


@pytest.mark.slow  # a fresh interpreter imports torch, transformers and deepspeed
def test_pipe_answers_each_turn_then_quit(chatty_model_dir, tmp_path):
    path = chatty_model_dir("llama")
    proc = chatbot(path, "hello\nhow are you?\nquit\nthis line is never read\n", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    chat = load_chat(str(path), dtype="auto", max_new_tokens=8)  # the same default dtype as the subprocess
    first, second = chat.reply("hello"), chat.reply("how are you?")
    assert first and second and first != second
    # stdout is nothing but the two answers (streamed), one per turn; no prompt decorations, no DeepSpeed logs
    assert words(proc.stdout) == words(first) + words(second)
    assert proc.stdout.endswith("\n") and "You:" not in proc.stdout and "Assistant:" not in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # a fresh interpreter imports torch, transformers and deepspeed
def test_eof_without_quit_exits_cleanly(chatty_model_dir, tmp_path):
    proc = chatbot(chatty_model_dir("gpt2", chat_template=False), "hello", "--dtype", "fp32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("\n") >= 1 and proc.stdout.strip() and "Traceback" not in proc.stderr


@pytest.mark.parametrize("template", [True, False], ids=["chat-template", "human-assistant"])
def test_history_is_kept_and_greedy_answers_equal_hf_generate(loaded, template):
    model, tok = loaded[template]
    chat = Chat(model, tok, GenerationArgs(do_sample=False), max_new_tokens=8)
    first = chat.reply("hello")
    second = chat.reply("how are you?")
    assert chat.messages == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                             {"role": "user", "content": "how are you?"}, {"role": "assistant", "content": second}]
    # the second turn's prompt is the whole conversation so far, rendered as in training
    assert chat.last_prompt == render_prompt(tok, chat.messages[:3])
    assert "hello" in chat.last_prompt and first in chat.last_prompt
    assert chat.last_prompt.index("hello") < chat.last_prompt.index(first) < chat.last_prompt.index("how are you?")
    if template:
        assert chat.last_prompt.startswith("<|im_start|>user\nhello<|im_end|>")
    else:
        assert chat.last_prompt.startswith("\n\nHuman: hello\n\nAssistant: ") and chat.last_prompt.endswith("\n\nAssistant:")
    # greedy answers are exactly what plain HF generate gives on the same rendered prompt
    ids = torch.tensor([encode_prompt(tok, chat.messages[:3])])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    assert tok.decode(out[0, ids.size(1):], skip_special_tokens=True).strip() == second


def test_streamed_text_is_the_answer(loaded):
    model, tok = loaded[True]
    stream = io.StringIO()
    answer = Chat(model, tok, max_new_tokens=8).reply("hello", stream=stream)
    assert stream.getvalue().endswith("\n") and words(stream.getvalue()) == words(answer)


def test_generation_stops_at_eos(loaded):
    model, tok = loaded[True]
    chat = Chat(model, tok, max_new_tokens=8)
    first_token = chat._generate(encode_prompt(tok, [{"role": "user", "content": "hello"}]), None)[0]
    with torch.no_grad():  # make the first answer token the EOS: the answer is then empty
        model.get_output_embeddings().bias = torch.nn.Parameter(torch.zeros(len(tok)))
        model.get_output_embeddings().bias[tok.eos_token_id] = 1e4
    try:
        assert chat._generate(encode_prompt(tok, [{"role": "user", "content": "hi"}]), None) == [tok.eos_token_id]
        assert chat.reply("hello") == ""
    finally:
        model.get_output_embeddings().bias = None
    assert chat._generate(encode_prompt(tok, [{"role": "user", "content": "hello"}]), None)[0] == first_token


def test_sampling_uses_the_shared_settings(loaded):
    model, tok = loaded[False]
    args = GenerationArgs(do_sample=True, temperature=0.7, top_p=0.9, top_k=5)
    torch.manual_seed(0)
    a = Chat(model, tok, args, max_new_tokens=8).reply("hello")
    torch.manual_seed(0)
    assert Chat(model, tok, args, max_new_tokens=8).reply("hello") == a


def test_clear_keeps_the_system_prompt(loaded):
    model, tok = loaded[True]
    chat = Chat(model, tok, max_new_tokens=4, system="You are terse.")
    chat.reply("hello")
    assert chat.last_prompt.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nhello")
    chat.clear()
    assert chat.messages == [{"role": "system", "content": "You are terse."}]


def test_oldest_exchanges_are_dropped_to_fit_the_context(loaded):
    model, tok = loaded[True]
    chat = Chat(model, tok, max_new_tokens=4, system="Be brief.", max_context=40)
    for text in ("first question here", "second question here", "third question here"):
        chat.reply(text)
    assert chat.dropped >= 1
    assert chat.messages[0] == {"role": "system", "content": "Be brief."}
    assert chat.messages[-2]["content"] == "third question here"
    assert "first question" not in chat.last_prompt and "Be brief." in chat.last_prompt
    assert len(encode_prompt(tok, chat.messages[:-1])) + 4 <= 40
    with pytest.raises(ValueError, match="max_new_tokens"):
        Chat(model, tok, max_new_tokens=64, max_context=64)


def test_converse_commands(loaded):
    model, tok = loaded[True]
    chat = Chat(model, tok, max_new_tokens=4)
    out, err = io.StringIO(), io.StringIO()
    converse(chat, ["hello\n", "\n", "clear\n", "again\n", "EXIT\n", "never read\n"], out, err)
    assert chat.messages[0] == {"role": "user", "content": "again"} and len(chat.messages) == 2
    assert out.getvalue().count("\n") == 2 and "cleared" in err.getvalue()
    converse(chat, ["one more"], out := io.StringIO(), err, interactive=True)
    assert out.getvalue().startswith("Assistant: ")


def test_flags_and_defaults():
    cfg = parse_config(ChatbotConfig, ["--path", "x"])
    assert (cfg.max_new_tokens, cfg.gen.do_sample, cfg.dtype, cfg.system) == (128, False, "auto", None)
    cfg = parse_config(ChatbotConfig, ["--path", "x", "--do_sample", "--temperature", "0.5", "--top_p", "0.8",
                                       "--top_k", "5", "--system", "Be kind.", "--dtype", "fp32"])
    assert cfg.gen.sampling() == dict(do_sample=True, temperature=0.5, top_p=0.8, top_k=5)
    assert (cfg.system, cfg.dtype) == ("Be kind.", "fp32")
    with pytest.raises(SystemExit):
        parse_config(ChatbotConfig, ["--path", "x", "--max_new_tokens", "0"])


def test_missing_model_path_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    with pytest.raises(SystemExit, match="no-such-model"):
        main(["--path", str(tmp_path / "no-such-model")])
