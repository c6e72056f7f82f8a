"""Chat with any saved model, in a terminal or through a pipe.

  python -m chatrlhf.inference.chatbot --path output/actor
  python -m chatrlhf.inference.chatbot --path smollm2-135m-instruct --do_sample --temperature 0.7 --top_p 0.9
  printf 'hello\\nhow are you?\\nquit\\n' | python -m chatrlhf.inference.chatbot --path output/actor --max_new_tokens 64

The conversation is kept as chat messages and rendered exactly as in training (chatrlhf.training.data.render: the
tokenizer's chat template, else DeepSpeed-Chat's "\\n\\nHuman: ...\\n\\nAssistant:" form). Answers stream as they are
generated and end at the EOS token or after --max_new_tokens. Greedy by default; --do_sample samples with
--temperature/--top_p/--top_k. `clear` starts over (the --system prompt stays), `quit`, `exit` or EOF leaves.
When stdin is not a terminal, stdout carries nothing but the answers, one per turn; notices go to stderr.
When the conversation outgrows the model's context, the oldest exchanges are dropped (said on stderr).
The function API: `Chat(model, tokenizer, gen_args).reply(text) -> str`, or `load_chat(path)`.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from functools import partial
from typing import Iterable, Optional, TextIO

import torch
from transformers import TextStreamer

from chatrlhf.training.config import Dtype, GenerationArgs
from chatrlhf.training.data.render import encode_prompt, render_prompt
from chatrlhf.training.generation import generate
from chatrlhf.training.vllm_backend import INSTALL_HINT, GenerationBackend, vllm_installed
from chatrlhf.utils.config import group, parse_config

QUIT, CLEAR = ("quit", "exit"), "clear"


@dataclass
class ChatbotConfig:
    """Multi-turn chat with a saved model: streamed answers; reads a pipe too."""

    path: str
    """A saved model folder (e.g. a step-1 or step-3 output), a Hugging Face hub id, or `smollm2-135m-instruct`."""
    max_new_tokens: int = 128
    """Most tokens per answer; an answer ends earlier at the EOS token."""
    system: Optional[str] = None
    """A system prompt put before the conversation (kept by `clear`)."""
    dtype: Dtype = "auto"
    """Precision: fp32, bf16, fp16, or auto (bf16 where the accelerator supports it, else fp32)."""
    seed: Optional[int] = None
    """Seed for sampling (with --do_sample)."""
    generation_backend: GenerationBackend = "hf"
    """What generates: hf (Hugging Face generate) or vllm (a vLLM engine given the model's weights; each answer
    appears whole when it is done; the `[vllm]` extra)."""
    gen: GenerationArgs = group(GenerationArgs, do_sample=False, temperature=0.7, top_p=0.9)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.generation_backend == "vllm" and not vllm_installed():
            raise ValueError(f"--generation_backend vllm: the vllm package is not installed; {INSTALL_HINT}")


def context_length(config) -> int | None:
    """The longest sequence the model takes (None for families without a limit, e.g. ALiBi)."""
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


class _Printer(TextStreamer):
    """Writes the answer to `out` as its words are decoded (no prompt, no special tokens), then a newline."""

    def __init__(self, tokenizer, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out, self.started = out, False

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if not self.started:  # the Human/Assistant form answers with a leading space
            text = text.lstrip()
            self.started = bool(text)
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


class Chat:
    """One conversation with one model: messages in, rendered as in training, answers out (streamed if asked).

    `model` is a plain Hugging Face causal LM on its device; `gen_args` the shared sampling settings
    (default: greedy). `max_context` defaults to the model's own limit. `generator`: a vLLM engine holding the
    model's weights (training/vllm_backend.py) generates instead of `model`.
    """

    def __init__(self, model, tokenizer, gen_args: GenerationArgs | None = None, *, max_new_tokens: int = 128,
                 system: str | None = None, max_context: int | None = None, generator=None):
        self.model, self.tokenizer, self.generator = model.eval(), tokenizer, generator
        self.gen_args = gen_args or GenerationArgs(do_sample=False)
        self.max_new_tokens, self.system = max_new_tokens, system
        self.max_context = max_context or context_length(model.config)
        if self.max_context is not None and self.max_context <= max_new_tokens:
            raise ValueError(f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's "
                             f"context of {self.max_context} tokens")
        self.last_prompt = ""  # the rendered text of the latest turn's prompt
        self.dropped = 0       # exchanges dropped so far to fit the context
        self.clear()

    def clear(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text: str, stream: TextIO | None = None) -> str:
        """Adds the user's `text`, generates the answer (written to `stream` as it comes), keeps and returns it."""
        self.messages.append({"role": "user", "content": text})
        ids = self._prompt_ids()
        self.last_prompt = render_prompt(self.tokenizer, self.messages)
        new = self._generate(ids, stream)
        eos = self.tokenizer.eos_token_id
        new = new[:new.index(eos)] if eos in new else new
        answer = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer

    def _prompt_ids(self) -> list[int]:
        """The rendered conversation's ids, the oldest exchanges dropped until prompt + answer fit the context."""
        first = 1 if self.system else 0
        while True:
            ids = encode_prompt(self.tokenizer, self.messages)
            if self.max_context is None or len(ids) + self.max_new_tokens <= self.max_context:
                return ids
            if len(self.messages) - first <= 1:  # one over-long message: keep its end
                return ids[len(ids) + self.max_new_tokens - self.max_context:]
            del self.messages[first:first + 2]  # a user turn and its answer
            self.dropped += 1

    @torch.no_grad()
    def _generate(self, ids: list[int], stream: TextIO | None) -> list[int]:
        """The new token ids. Sampling settings only from `gen_args` (as in training's generation mode), so a
        checkpoint's generation_config cannot change them; stops at EOS."""
        tok = self.tokenizer
        input_ids = torch.tensor([ids], device=next(self.model.parameters()).device)
        run = self.generator.generate if self.generator is not None else partial(generate, self.model)
        out = run(input_ids, torch.ones_like(input_ids), max_new_tokens=self.max_new_tokens,
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                  streamer=_Printer(tok, stream) if stream else None, **self.gen_args.sampling())
        return out[0, len(ids):].tolist()


def load_chat(path: str, gen_args: GenerationArgs | None = None, *, dtype: str = "auto", max_new_tokens: int = 128,
              system: str | None = None, generation_backend: str = "hf") -> Chat:
    """A Chat with the model and tokenizer saved at `path`, loaded as training loads them, on this accelerator
    (`generation_backend="vllm"`: and a vLLM engine given its weights, which generates)."""
    from chatrlhf.training.precision import DTYPES, training_dtype
    from chatrlhf.utils.distributed import device
    from chatrlhf.utils.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(path)
    model = load_model(path, tokenizer, head="causal_lm", dtype=DTYPES[training_dtype(dtype)]).to(device())
    generator = None
    if generation_backend == "vllm":
        from chatrlhf.training.vllm_backend import generator_for

        generator = generator_for(model, dtype=DTYPES[training_dtype(dtype)])
    return Chat(model, tokenizer, gen_args, max_new_tokens=max_new_tokens, system=system, generator=generator)


def converse(chat: Chat, lines: Iterable[str], out: TextIO, err: TextIO, interactive: bool = False) -> None:
    """The chat loop over input `lines`: answers to `out`; decorations only when `interactive`."""
    for line in lines:
        text = line.strip()
        if text.lower() in QUIT:
            return
        if text.lower() == CLEAR:
            chat.clear()
            err.write("(conversation cleared)\n")
        elif text:
            dropped = chat.dropped
            if interactive:
                out.write("Assistant: ")
            chat.reply(text, stream=out)
            if chat.dropped > dropped:
                err.write(f"(dropped {chat.dropped - dropped} old exchange(s) to fit the model's context)\n")


def _terminal_lines(prompt: str = "You: "):
    while True:
        try:
            yield input(prompt)
        except EOFError:
            print()
            return


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(ChatbotConfig, argv)
    interactive = sys.stdin.isatty()
    # DeepSpeed's logger prints to stdout; loading under this redirect keeps stdout for answers only.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            chat = load_chat(cfg.path, cfg.gen, dtype=cfg.dtype, max_new_tokens=cfg.max_new_tokens, system=cfg.system,
                             generation_backend=cfg.generation_backend)
        except (OSError, ValueError) as e:
            raise SystemExit(f"chatbot: cannot load --path {cfg.path!r}: {e}") from None
    if cfg.seed is not None:
        from transformers import set_seed

        set_seed(cfg.seed)
    if interactive:
        print(f"Chatting with {cfg.path}. 'clear' starts over, 'quit' or Ctrl-D leaves.", file=sys.stderr)
    try:
        converse(chat, _terminal_lines() if interactive else sys.stdin, sys.stdout, sys.stderr, interactive)
    except KeyboardInterrupt:
        print(file=sys.stderr)


if __name__ == "__main__":
    main()
