"""Per-phase tokenisation with explicit over-length policies.

  phase 1 (SFT)     input_ids = prompt + response + eos; labels = -100 on prompt tokens (unless train_on_prompt)
  phase 2 (reward)  chosen_input_ids, rejected_input_ids = prompt + answer + eos, sharing the same prompt tokens
  phase 3 (PPO)     input_ids = prompt tokens only
Every phase adds `length` (phase 2: the longer of the pair) for length-aware batching.

Over max_seq_len (phases 1-2) or max_prompt_len (phase 3), overlength="drop" drops the record and
"truncate" cuts it: the prompt loses tokens from the LEFT (its end, next to the answer, matters most) down to
what the response leaves room for, but keeps at least min(prompt length, max_prompt_len, max_seq_len // 2)
tokens; then the response is cut from the right, which loses its eos (counted as `eos_cut`). Phase 3 keeps the
last max_prompt_len prompt tokens. All counts are returned and logged by the caller; nothing is silent.
"""
from __future__ import annotations

import hashlib
import json

from chatrlhf.training.data.render import encode_prompts, encode_responses

OVERLENGTH = ("truncate", "drop")
IGNORE_INDEX = -100


def budget(prompt_len: int, response_len: int, max_seq_len: int, max_prompt_len: int) -> tuple[int, int]:
    """(prompt tokens kept, response tokens kept) under the truncation rule in the module docstring."""
    if prompt_len + response_len <= max_seq_len:
        return prompt_len, response_len
    keep_prompt = max(max_seq_len - response_len, min(prompt_len, max_prompt_len, max_seq_len // 2))
    return keep_prompt, max_seq_len - keep_prompt


def _sft(batch, tokenizer, max_seq_len, max_prompt_len, overlength, train_on_prompt):
    out = {k: [] for k in ("input_ids", "labels", "length", "_truncated", "_eos_cut")}
    prompts, responses = encode_prompts(tokenizer, batch["prompt"]), encode_responses(tokenizer, batch["chosen"])
    for p, r in zip(prompts, responses):
        kp, kr = budget(len(p), len(r), max_seq_len, max_prompt_len)
        cut = kp < len(p) or kr < len(r)
        if cut and overlength == "drop":
            continue
        p, r_kept = p[len(p) - kp:], r[:kr]
        ids = p + r_kept
        out["input_ids"].append(ids)
        out["labels"].append(list(ids) if train_on_prompt else [IGNORE_INDEX] * len(p) + r_kept)
        out["length"].append(len(ids))
        out["_truncated"].append(cut)
        out["_eos_cut"].append(kr < len(r))
    return out


def _pairs(batch, tokenizer, max_seq_len, max_prompt_len, overlength, train_on_prompt):
    out = {k: [] for k in ("chosen_input_ids", "rejected_input_ids", "length", "_truncated", "_eos_cut")}
    prompts = encode_prompts(tokenizer, batch["prompt"])
    chosen, rejected = encode_responses(tokenizer, batch["chosen"]), encode_responses(tokenizer, batch["rejected"])
    for p, c, r in zip(prompts, chosen, rejected):
        # One budget for both answers keeps the prompt tokens identical in the pair.
        kp, kr = budget(len(p), max(len(c), len(r)), max_seq_len, max_prompt_len)
        cut = kp < len(p) or kr < max(len(c), len(r))
        if cut and overlength == "drop":
            continue
        p = p[len(p) - kp:]
        out["chosen_input_ids"].append(p + c[:kr])
        out["rejected_input_ids"].append(p + r[:kr])
        out["length"].append(len(p) + min(kr, max(len(c), len(r))))
        out["_truncated"].append(cut)
        out["_eos_cut"].append(kr < len(c) or kr < len(r))
    return out


def _prompts(batch, tokenizer, max_seq_len, max_prompt_len, overlength, train_on_prompt):
    out = {k: [] for k in ("input_ids", "prompt_messages", "length", "_truncated", "_eos_cut")}
    for p, messages in zip(encode_prompts(tokenizer, batch["prompt"]), batch["prompt"]):
        cut = len(p) > max_prompt_len
        if cut and overlength == "drop":
            continue
        p = p[-max_prompt_len:] if cut else p
        out["input_ids"].append(p)
        # The messages travel with the tokens: a reward model with another tokenizer renders them its own way.
        out["prompt_messages"].append(json.dumps(messages))
        out["length"].append(len(p))
        out["_truncated"].append(cut)
        out["_eos_cut"].append(False)
    return out


PHASE_FN = {1: _sft, 2: _pairs, 3: _prompts}


def check_lengths(max_seq_len: int, max_prompt_len: int, overlength: str) -> None:
    if overlength not in OVERLENGTH:
        raise ValueError(f"--overlength must be one of {OVERLENGTH}, got {overlength!r}")
    if max_seq_len < 2 or max_prompt_len < 1:
        raise ValueError(f"--max_seq_len ({max_seq_len}) must be >= 2 and --max_prompt_len ({max_prompt_len}) >= 1")


def features(phase: int):
    from datasets import Features, List, Value

    ids = List(Value("int32"))
    cols = {1: ("input_ids", "labels"), 2: ("chosen_input_ids", "rejected_input_ids"), 3: ("input_ids",)}[phase]
    extra = {"prompt_messages": Value("string")} if phase == 3 else {}
    return Features({**{c: ids for c in cols}, **extra, "length": Value("int32"),
                     "_truncated": Value("bool"), "_eos_cut": Value("bool")})


def tokenize_phase(ds, phase: int, tokenizer, *, max_seq_len: int = 512, max_prompt_len: int = 256,
                   overlength: str = "truncate", train_on_prompt: bool = False, num_proc: int | None = None):
    """Normalised examples -> (tokenised Dataset, stats {"records", "kept", "truncated", "dropped", "eos_cut"})."""
    from datasets import Dataset

    from chatrlhf.training.data.cache import tokenizer_fingerprint

    check_lengths(max_seq_len, max_prompt_len, overlength)
    feats = features(phase)
    if len(ds) == 0:
        out = Dataset.from_dict({k: [] for k in feats}, features=feats)
    else:
        args = dict(max_seq_len=max_seq_len, max_prompt_len=max_prompt_len, overlength=overlength,
                    train_on_prompt=train_on_prompt)
        # An explicit fingerprint spares `datasets` from pickling the tokenizer to hash the function.
        fingerprint = hashlib.sha256(repr((ds._fingerprint, phase, sorted(args.items()),
                                           tokenizer_fingerprint(tokenizer))).encode()).hexdigest()[:32]
        out = ds.map(PHASE_FN[phase], fn_kwargs=dict(args, tokenizer=tokenizer), batched=True, batch_size=1000,
                     remove_columns=ds.column_names, features=feats, new_fingerprint=fingerprint,
                     num_proc=num_proc if num_proc and len(ds) > 1000 else None, desc=f"tokenizing phase {phase}")
    flags = out.select_columns(["_truncated", "_eos_cut"]).to_dict()
    stats = {"records": len(ds), "kept": len(out), "dropped": len(ds) - len(out),
             "truncated": sum(flags["_truncated"]), "eos_cut": sum(flags["_eos_cut"])}
    return out.remove_columns(["_truncated", "_eos_cut"]), stats
