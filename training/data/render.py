"""Text rendering and THE end-of-text convention shared by all three steps (see CONTRIBUTING.md).

A training sequence is `encode_prompt(messages) + encode_response(text)`, where encode_response ends with
`eos_token_id`. The prompt is the tokenizer's chat template with the generation prompt when it has one, else
DeepSpeed-Chat's "\\n\\nHuman: {q}\\n\\nAssistant:" form (responses then get DS-Chat's leading space).
PPO encodes its prompts with `encode_prompt` too, so the reward model always scores the eos position.
"""
from __future__ import annotations

from chatrlhf.training.data.formats import ASSISTANT, HUMAN


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt text, ending where the assistant's answer starts."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = ""
    for m in messages:
        if m["role"] == "system":
            text += m["content"]
        else:
            text += f"{HUMAN if m['role'] == 'user' else ASSISTANT} {m['content']}"
    return text + ASSISTANT


def render_response(tokenizer, text: str) -> str:
    """The response text as it follows the rendered prompt (without the eos)."""
    return text if has_chat_template(tokenizer) else " " + text


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos token; the end-of-text convention needs one")
    return tokenizer.eos_token_id


def encode_prompts(tokenizer, batch: list[list[dict]]) -> list[list[int]]:
    """Token ids of rendered prompts. A chat template already holds its special tokens (BOS included);
    the plain form gets the tokenizer's own (e.g. Llama's BOS)."""
    texts = [render_prompt(tokenizer, m) for m in batch]
    return tokenizer(texts, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]


def encode_responses(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of responses, each tokenized on its own and ending with eos_token_id."""
    eos = _eos_id(tokenizer)
    ids = tokenizer([render_response(tokenizer, t) for t in texts], add_special_tokens=False)["input_ids"]
    return [x + [eos] for x in ids]


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    return encode_prompts(tokenizer, [messages])[0]


def encode_response(tokenizer, text: str) -> list[int]:
    return encode_responses(tokenizer, [text])[0]
