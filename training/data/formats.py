"""Record adapters: every supported dataset layout -> one normalised example.

A normalised example has three columns:
  prompt    list of chat messages [{"role": "system"|"user"|"assistant", "content": str}], ending with a user turn
  chosen    str, the preferred (or only) assistant response
  rejected  str, or None for SFT-only data

Adding a layout is one function and a decorator:

    @register_format("my_format", detect=lambda r: "question" in r and "answer" in r)
    def _my_format(record):
        return example([user(record["question"])], text_field(record, "answer"))

Detection runs the formats' `detect` in registration order on a source's first record and picks the first
match; `normalize(..., data_format=name)` forces one. Converters raise `Malformed("what is wrong")`; `normalize`
turns that into a `DataFormatError` naming the source and record, or skips and counts it (--skip_malformed).
Records are named as their file numbers them: "line 7" (1-based) in JSONL, "record 3 of the array" (0-based) in a
JSON list, "row 3" in Parquet, "record 3" (0-based) for anything else.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
_ONE_TURN = re.compile(r"^\s*Human:\s*((?:(?!\n\nHuman:|Assistant:).)+?)\s*Assistant:\s*$", re.DOTALL)


class DataFormatError(ValueError):
    """A record that no adapter can turn into an example; the message names the source and record."""


class Malformed(Exception):
    """Raised by converters with what is wrong; `normalize` adds where."""


class Unreadable:
    """Stands in for a record its file reader could not parse (a non-JSON line): `normalize` reports it like a
    malformed record, so --skip_malformed skips and counts it too."""

    def __init__(self, what: str):
        self.what = what


class Located:
    """Records paired with where each came from: an iterable of (where, record), `where` as the file numbers it
    ("line 7"). File readers return these so that errors use the file's own numbering."""

    def __init__(self, pairs: Iterable[tuple[str, Any]]):
        self.pairs = pairs

    def __iter__(self):
        return iter(self.pairs)


@dataclass(frozen=True)
class Format:
    name: str
    detect: Callable[[dict], bool]
    convert: Callable[[dict], dict]


FORMATS: dict[str, Format] = {}


def register_format(name: str, detect: Callable[[dict], bool]):
    """Decorator registering `convert(record) -> example` under `name`; `detect(record)` claims a source."""
    def wrap(convert):
        if name in FORMATS:
            raise ValueError(f"data format {name!r} is already registered")
        FORMATS[name] = Format(name, detect, convert)
        return convert
    return wrap


# ---------------------------------------------------------------- helpers for converters

def message(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def user(content: str) -> dict:
    return message("user", content)


def example(prompt: list[dict], chosen: str, rejected: str | None = None) -> dict:
    """Checks and returns a normalised example (see the module docstring)."""
    if not prompt:
        raise Malformed("the prompt has no messages")
    if prompt[-1]["role"] != "user":
        raise Malformed(f"the prompt must end with a user turn, not {prompt[-1]['role']!r}")
    for m in prompt:
        if m["role"] not in ROLES:
            raise Malformed(f"unknown role {m['role']!r} (expected one of {ROLES})")
        if not isinstance(m["content"], str):
            raise Malformed(f"a {m['role']} message's content must be a string, got {type(m['content']).__name__}")
    # Responses are stored stripped: renderers add the separator (DS-Chat's leading space) themselves.
    if not isinstance(chosen, str) or not chosen.strip():
        raise Malformed("the chosen response is empty or not a string")
    if rejected is not None and (not isinstance(rejected, str) or not rejected.strip()):
        raise Malformed("the rejected response is empty or not a string")
    return {"prompt": prompt, "chosen": chosen.strip(), "rejected": rejected.strip() if rejected else None}


def text_field(record: dict, key: str, optional: bool = False) -> str | None:
    """record[key] as a non-empty string (None when optional and missing/None)."""
    value = record.get(key)
    if value is None:
        if optional:
            return None
        raise Malformed(f"missing field {key!r}")
    if not isinstance(value, str):
        raise Malformed(f"field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise Malformed(f"field {key!r} is empty")
    return value


def _messages(value: Any, key: str, role_key: str = "role", content_key: str = "content",
              roles: dict | None = None) -> list[dict]:
    """A list of {role, content} dicts checked and mapped to our roles."""
    if not isinstance(value, list) or not value:
        raise Malformed(f"field {key!r} must be a non-empty list of messages")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get(role_key), str) or not isinstance(m.get(content_key), str):
            raise Malformed(f"{key}[{j}] must be a dict with string {role_key!r} and {content_key!r}")
        role = (roles or {}).get(m[role_key], m[role_key])
        if role not in ROLES:
            raise Malformed(f"{key}[{j}] has unknown role {m[role_key]!r}")
        out.append(message(role, m[content_key]))
    return out


def _split_last_assistant(msgs: list[dict], key: str) -> tuple[list[dict], str]:
    """(turns before the last assistant turn, its content); the conversation must end with that turn."""
    if msgs[-1]["role"] != "assistant":
        raise Malformed(f"{key!r} must end with an assistant turn, not {msgs[-1]['role']!r}")
    return msgs[:-1], msgs[-1]["content"]


def parse_transcript(text: str) -> list[dict]:
    """"\\n\\nHuman: q\\n\\nAssistant: a\\n\\nHuman: q2" -> messages. A trailing empty "Assistant:" is dropped;
    consecutive turns of one speaker (a few HH records) are merged so roles alternate."""
    if not text.startswith(HUMAN):
        if text.lstrip().startswith("Human:"):
            text = "\n\n" + text.lstrip()
        else:
            raise Malformed(f"transcript does not start with {HUMAN!r}: {text[:40]!r}")
    parts = _TURN.split(text)[1:]  # [speaker, content, speaker, content, ...]
    msgs: list[dict] = []
    for speaker, content in zip(parts[::2], parts[1::2]):
        role, content = ("user" if speaker == "Human" else "assistant"), content.strip()
        if msgs and msgs[-1]["role"] == role:
            msgs[-1]["content"] = f"{msgs[-1]['content']}\n\n{content}".strip()
        else:
            msgs.append(message(role, content))
    if msgs and msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
        msgs.pop()
    if any(not m["content"] for m in msgs):
        raise Malformed("transcript has an empty turn")
    return msgs


# ---------------------------------------------------------------- the formats (detection order = this order)

@register_format("rm_static", detect=lambda r: {"prompt", "response", "chosen", "rejected"} <= r.keys())
def _rm_static(record):
    """Dahoas/rm-static, Dahoas/full-hh-rlhf: prompt is a Human/Assistant transcript, answers start with a space."""
    return example(parse_transcript(text_field(record, "prompt")), text_field(record, "chosen"),
                   text_field(record, "rejected"))


@register_format("hh_rlhf", detect=lambda r: {"chosen", "rejected"} <= r.keys() and "prompt" not in r
                 and isinstance(r["chosen"], str))
def _hh_rlhf(record):
    """Anthropic HH-RLHF: two whole transcripts that differ only after the last "\\n\\nAssistant:"."""
    chosen, rejected = text_field(record, "chosen"), text_field(record, "rejected")
    prefix_c, sep_c, answer_c = chosen.rpartition(ASSISTANT)
    prefix_r, sep_r, answer_r = rejected.rpartition(ASSISTANT)
    if not sep_c or not sep_r:
        raise Malformed(f"a transcript has no {ASSISTANT!r} turn")
    if prefix_c != prefix_r:
        raise Malformed("chosen and rejected transcripts differ before their last Assistant turn")
    return example(parse_transcript(prefix_c), answer_c, answer_r)


@register_format("preference_messages", detect=lambda r: {"chosen", "rejected"} <= r.keys() and "prompt" not in r
                 and isinstance(r["chosen"], list))
def _preference_messages(record):
    """TRL's conversational HH layout: chosen and rejected are whole conversations sharing all but the last turn."""
    prompt, chosen = _split_last_assistant(_messages(record.get("chosen"), "chosen"), "chosen")
    prompt_r, rejected = _split_last_assistant(_messages(record.get("rejected"), "rejected"), "rejected")
    if prompt != prompt_r:
        raise Malformed("chosen and rejected conversations differ before their last assistant turn")
    return example(prompt, chosen, rejected)


def _response(record: dict, key: str, optional: bool = False) -> str | None:
    """A response given as a string or as a conversation whose last turn is the assistant's (UltraFeedback)."""
    if isinstance(record.get(key), list):
        return _split_last_assistant(_messages(record[key], key), key)[1]
    return text_field(record, key, optional)


@register_format("prompt_chosen_rejected", detect=lambda r: {"prompt", "chosen"} <= r.keys())
def _prompt_chosen(record):
    """Local files {prompt, chosen, rejected?}: prompt is a user string, a Human/Assistant transcript
    (DeepSpeed-Chat's local format) or a messages list; rejected is optional (SFT-only data)."""
    prompt = record.get("prompt")
    if isinstance(prompt, list):
        msgs = _messages(prompt, "prompt")
    else:
        text = text_field(record, "prompt")
        one_turn = _ONE_TURN.match(text)
        if one_turn:  # DeepSpeed-Chat's " Human: {q} Assistant:"
            msgs = [user(one_turn.group(1))]
        elif text.lstrip().startswith("Human:") and ASSISTANT in text:
            msgs = parse_transcript(text)
        else:
            msgs = [user(text)]
    return example(msgs, _response(record, "chosen"), _response(record, "rejected", optional=True))


@register_format("alpaca", detect=lambda r: {"instruction", "output"} <= r.keys())
def _alpaca(record):
    """Alpaca {instruction, input, output} (+ LLaMA-Factory's optional system and history [[q, a], ...])."""
    instruction, extra = text_field(record, "instruction"), record.get("input") or ""
    if not isinstance(extra, str):
        raise Malformed(f"field 'input' must be a string, got {type(extra).__name__}")
    msgs = [message("system", record["system"])] if record.get("system") else []
    for j, turn in enumerate(record.get("history") or []):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise Malformed(f"history[{j}] must be a [question, answer] pair of strings")
        msgs += [user(turn[0]), message("assistant", turn[1])]
    msgs.append(user(f"{instruction}\n\n{extra}" if extra.strip() else instruction))
    return example(msgs, text_field(record, "output"))


@register_format("messages", detect=lambda r: "messages" in r)
def _messages_format(record):
    """OpenAI-style {"messages": [{role, content}]}: the last assistant turn is the response."""
    prompt, chosen = _split_last_assistant(_messages(record.get("messages"), "messages"), "messages")
    return example(prompt, chosen, _response(record, "rejected", optional=True))


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}


@register_format("sharegpt", detect=lambda r: "conversations" in r)
def _sharegpt(record):
    """ShareGPT {"conversations": [{from: human|gpt|system, value}]}."""
    msgs = _messages(record.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
    prompt, chosen = _split_last_assistant(msgs, "conversations")
    return example(prompt, chosen)


# ---------------------------------------------------------------- applying them

# The fields the formats above read. A record's other fields travel with its example as `metadata` (a JSON object,
# None when there are none), e.g. a verifiable task's reference answer for step 3's reward functions.
FORMAT_FIELDS = frozenset({"prompt", "response", "chosen", "rejected", "instruction", "input", "output", "system",
                           "history", "messages", "conversations"})


def metadata(record: dict) -> str | None:
    extra = {k: v for k, v in record.items() if k not in FORMAT_FIELDS}
    return json.dumps(extra, ensure_ascii=False, default=str) if extra else None


def _detect(record: Any) -> str:
    if not isinstance(record, dict):
        raise Malformed(f"expected a JSON object, got {type(record).__name__}")
    for fmt in FORMATS.values():
        if fmt.detect(record):
            return fmt.name
    raise Malformed(f"keys {sorted(record)} match no data format ({', '.join(FORMATS)}); "
                    "pass --data_format or register one with @register_format")


def detect_format(record: Any, source: str) -> str:
    """The first registered format whose `detect` accepts `record`."""
    try:
        return _detect(record)
    except Malformed as e:
        raise DataFormatError(f"{source}: record 0: {e}") from None


def normalize(records: Iterable[dict] | Located, source: str, data_format: str | None = None,
              skip_malformed: bool = False, require_pairs: bool = False) -> tuple[dict[str, list], dict]:
    """Converts raw records to example columns {"prompt": [...], "chosen": [...], "rejected": [...],
    "metadata": [...]} (metadata: each record's fields that no format reads, as JSON, or None).

    `records` is a plain iterable (its items named "record <i>", 0-based) or a `Located` one from a file reader.
    Returns (columns, stats) with stats {"format", "records", "skipped_malformed"}. A malformed record (or an
    `Unreadable` one) raises DataFormatError("<source>: <where>: <what>") unless skip_malformed, in which case it
    is counted, the first few are logged, and the count is warned about. require_pairs: a record without a
    rejected response is malformed too (preference data), instead of a single-response example.
    """
    columns: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], "metadata": []}
    fmt, skipped, n = None, 0, 0
    if data_format is not None and data_format not in FORMATS:
        raise DataFormatError(f"{source}: unknown data format {data_format!r}; known: {', '.join(FORMATS)}")
    items = records if isinstance(records, Located) else ((f"record {i}", r) for i, r in enumerate(records))
    for where, record in items:
        n += 1
        try:
            if isinstance(record, Unreadable):
                raise Malformed(record.what)
            if fmt is None:  # detected on the first record (with skip_malformed: the first usable one)
                fmt = FORMATS[data_format or _detect(record)]
            if not isinstance(record, dict):
                raise Malformed(f"expected a JSON object, got {type(record).__name__}")
            ex = dict(fmt.convert(record), metadata=metadata(record))
            if require_pairs and ex["rejected"] is None:
                raise Malformed("missing field 'rejected' (preference data needs a rejected response in every record)")
        except (Malformed, KeyError, TypeError, ValueError, AttributeError) as e:
            # Non-Malformed errors come from converters that trip over an unexpected type.
            e = e if isinstance(e, Malformed) else f"{type(e).__name__}: {e}"
            if not skip_malformed:
                how = f"format {fmt.name}; " if fmt else ""
                raise DataFormatError(f"{source}: {where}: {e} ({how}pass --skip_malformed to skip such records)") \
                    from None
            skipped += 1
            if skipped <= 5:
                logger.info("%s: skipping malformed %s: %s", source, where, e)
            continue
        for key in columns:
            columns[key].append(ex[key])
    if skipped:
        logger.warning("%s: skipped %d malformed of %d records", source, skipped, n)
    return columns, {"format": fmt.name if fmt else data_format, "records": n, "skipped_malformed": skipped}
