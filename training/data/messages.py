"""Prompts as users give them (a user string, a Human/Assistant transcript, chat messages) -> chat messages."""
from __future__ import annotations

from chatrlhf.training.data.formats import parse_transcript, user


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
