"""Tokenisation shared by every step: the over-length rule, and the one `datasets.map` that applies a step's
tokenize function with its counts.

A step's tokenize function (its `data.py`) is batched: (batch of normalised columns, tokenizer, **options) ->
its token columns plus `length` (for length-aware batching), `_truncated` and `_eos_cut` (one bool per kept
record). Over max_seq_len, overlength="drop" drops the record and "truncate" cuts it: the prompt loses tokens
from the LEFT (its end, next to the answer, matters most) down to what the response leaves room for, but keeps
at least min(prompt length, max_prompt_len, max_seq_len // 2) tokens; then the response is cut from the right,
which loses its eos (counted as `eos_cut`). All counts are returned and logged by the caller; nothing is silent.
"""
from __future__ import annotations

import hashlib

OVERLENGTH = ("truncate", "drop")
IGNORE_INDEX = -100
COUNT_COLUMNS = ("_truncated", "_eos_cut")


def budget(prompt_len: int, response_len: int, max_seq_len: int, max_prompt_len: int) -> tuple[int, int]:
    """(prompt tokens kept, response tokens kept) under the truncation rule in the module docstring."""
    if prompt_len + response_len <= max_seq_len:
        return prompt_len, response_len
    keep_prompt = max(max_seq_len - response_len, min(prompt_len, max_prompt_len, max_seq_len // 2))
    return keep_prompt, max_seq_len - keep_prompt


def check_lengths(max_seq_len: int, max_prompt_len: int, overlength: str) -> None:
    if overlength not in OVERLENGTH:
        raise ValueError(f"--overlength must be one of {OVERLENGTH}, got {overlength!r}")
    if max_seq_len < 2 or max_prompt_len < 1:
        raise ValueError(f"--max_seq_len ({max_seq_len}) must be >= 2 and --max_prompt_len ({max_prompt_len}) >= 1")


def features(columns: dict[str, str]):
    """A step's output columns ({name: "ids" | "int" | "string"}) plus the bookkeeping ones -> datasets Features."""
    from datasets import Features, List, Value

    kinds = {"ids": List(Value("int32")), "int": Value("int32"), "string": Value("string")}
    return Features({**{c: kinds[k] for c, k in columns.items()}, "length": Value("int32"),
                     **{c: Value("bool") for c in COUNT_COLUMNS}})


def tokenize_step(ds, spec, tokenizer, *, max_seq_len: int = 512, max_prompt_len: int = 256,
                  overlength: str = "truncate", num_proc: int | None = None, **options):
    """Normalised examples -> (Dataset of `spec`'s columns, stats {"records", "kept", "truncated", "dropped",
    "eos_cut"}). `spec` is a step's `StepData`; `options` are its tokenize function's own (train_on_prompt, ...)."""
    from datasets import Dataset

    from chatrlhf.training.data.cache import tokenizer_fingerprint

    check_lengths(max_seq_len, max_prompt_len, overlength)
    feats = features(spec.columns)
    if len(ds) == 0:
        out = Dataset.from_dict({k: [] for k in feats}, features=feats)
    else:
        args = dict(max_seq_len=max_seq_len, max_prompt_len=max_prompt_len, overlength=overlength, **options)
        # An explicit fingerprint spares `datasets` from pickling the tokenizer to hash the function.
        fingerprint = hashlib.sha256(repr((ds._fingerprint, spec.name, sorted(args.items()),
                                           tokenizer_fingerprint(tokenizer))).encode()).hexdigest()[:32]
        out = ds.map(spec.tokenize, fn_kwargs=dict(args, tokenizer=tokenizer), batched=True, batch_size=1000,
                     remove_columns=ds.column_names, features=feats, new_fingerprint=fingerprint,
                     num_proc=num_proc if num_proc and len(ds) > 1000 else None, desc=f"tokenizing {spec.name}")
    flags = out.select_columns(list(COUNT_COLUMNS)).to_dict()
    stats = {"records": len(ds), "kept": len(out), "dropped": len(ds) - len(out),
             "truncated": sum(flags["_truncated"]), "eos_cut": sum(flags["_eos_cut"])}
    return out.remove_columns(list(COUNT_COLUMNS)), stats
