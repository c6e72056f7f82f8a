"""The one entry point the steps call: sources -> normalised examples -> the step's share -> tokens (cached).

The layer is generic: what a step needs (its --data_split share, its tokenize function and columns) comes in a
`StepData` that the step's own `data.py` defines, so adding a step edits nothing here.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

from chatrlhf.training.data import cache, split, tokenize
from chatrlhf.training.data.sources import DEFAULT_EVAL_FRACTION, is_local, load_source, resolve
from chatrlhf.utils.distributed import get_rank

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepData:
    """A step's contract with the data layer (one per step, in its data.py)."""

    name: str
    """Short name, in logs and the cache key (e.g. "sft")."""
    share: int
    """Which --data_split share the step takes: 0, 1 or 2 (DeepSpeed-Chat's SFT, reward model, RL shares)."""
    tokenize: Callable
    """Batched (batch, tokenizer, max_seq_len, max_prompt_len, overlength, **options) -> columns (tokenize.py)."""
    columns: dict
    """Output columns besides `length`: {name: "ids" | "int" | "string"}; "ids" and "int" (one number per record)
    columns come out as torch tensors."""
    takes_sft_only: bool = False
    """--sft_only_data_path sources go to this step whole (other steps ignore them)."""
    needs_pairs: bool = False
    """Every record must carry a rejected answer (learning from preferences)."""

    @property
    def tensor_columns(self) -> list[str]:
        return [c for c, kind in self.columns.items() if kind in ("ids", "int")] + ["length"]


@dataclass
class PhaseData:
    """Tokenised `train` and `eval` Datasets (torch format) and `stats`."""
    train: "datasets.Dataset"  # noqa: F821
    eval: "datasets.Dataset"  # noqa: F821
    stats: dict


def _as_list(paths) -> list[str]:
    return [str(paths)] if isinstance(paths, (str, os.PathLike)) else [str(p) for p in paths]


def _key_source(p: str) -> tuple[str, str]:
    """(where, content fingerprint) of a source for the cache key."""
    p = resolve(p)
    return (os.path.abspath(os.path.expanduser(p)) if is_local(p) else p), cache.source_fingerprint(p)


def load_phase_data(data, spec: StepData, tokenizer, *, seed: int, num_proc: int | None = None,
                    **options) -> PhaseData:
    """Train/eval data of the step `spec` from a `DataArgs` group; `options` go to the step's tokenize function
    (max_seq_len, max_prompt_len, train_on_prompt, ...)."""
    return load_data(data.data_path, spec, tokenizer, data_split=data.data_split,
                     sft_only_paths=data.sft_only_data_path, seed=seed, cache_dir=data.data_output_path,
                     overlength=data.overlength, skip_malformed=data.skip_malformed,
                     eval_fraction=data.eval_fraction, data_format=data.data_format, num_proc=num_proc, **options)


def load_data(paths, spec: StepData, tokenizer, *, data_split: str = "2,4,4", sft_only_paths=(), seed: int = 1234,
              cache_dir=None, overlength: str = "truncate", skip_malformed: bool = False,
              eval_fraction: float = DEFAULT_EVAL_FRACTION, data_format: str | dict | None = None,
              num_proc: int | None = None, max_seq_len: int = 512, max_prompt_len: int = 256,
              **options) -> PhaseData:
    """Train/eval data of the step `spec` from `paths` blended.

    `data_split` gives each step's share a disjoint seeded part of every source (DeepSpeed-Chat's --data_split);
    `sft_only_paths` go wholly to the step that takes them (step 1). `data_format` forces one format for all
    sources or, as a dict, per path. stats: {"step", "sources": {name: {"format", "records", "skipped_malformed",
    "train", "eval", "eval_from", "sft_only", "phase_train", "phase_eval"}}, "skipped_malformed",
    "train"/"eval": {"records", "kept", "truncated", "dropped", "eos_cut"}, "truncated", "dropped", "eos_cut",
    "cache", "cache_path"}.
    """
    paths, sft_only = _as_list(paths), (_as_list(sft_only_paths) if spec.takes_sft_only else [])
    if not paths and not sft_only:
        raise ValueError(f"{spec.name} data needs at least one --data_path"
                         + ("" if spec.takes_sft_only else " (SFT-only data is used by step 1 only)"))
    if len(set(paths + sft_only)) < len(paths + sft_only):
        raise ValueError(f"a data path is listed twice: {paths + sft_only}")
    proportions = split.parse_split(data_split)
    tokenize.check_lengths(max_seq_len, max_prompt_len, overlength)
    fmt = (lambda p: data_format.get(p)) if isinstance(data_format, dict) else (lambda p: data_format)
    lengths = dict(max_seq_len=max_seq_len, max_prompt_len=max_prompt_len, overlength=overlength, **options)

    def build():
        from datasets import DatasetDict

        sources, train_parts, eval_parts = {}, [], []
        for path, is_sft in [(p, False) for p in paths] + [(p, True) for p in sft_only]:
            src = load_source(path, data_format=fmt(path), skip_malformed=skip_malformed,
                              eval_fraction=eval_fraction, seed=seed)
            tr, ev = split.share_subset(src, spec.share, data_split, seed, whole=is_sft)
            if spec.needs_pairs:
                for split_name, ds in (("train", tr), ("eval", ev)):
                    split.require_pairs(ds, src.name, split_name, spec.name)
            sources[src.name] = dict(src.stats, sft_only=is_sft, phase_train=len(tr), phase_eval=len(ev))
            train_parts.append(tr)
            eval_parts.append(ev)
        out, stats = {}, {"step": spec.name, "sources": sources,
                          "skipped_malformed": sum(s["skipped_malformed"] for s in sources.values())}
        for name, parts in (("train", train_parts), ("eval", eval_parts)):
            out[name], stats[name] = tokenize.tokenize_step(split.blend(parts, seed), spec, tokenizer,
                                                            num_proc=num_proc, **lengths)
        for k in ("truncated", "dropped", "eos_cut"):
            stats[k] = stats["train"][k] + stats["eval"][k]
        return DatasetDict(out), stats

    key = None
    if cache_dir is not None:
        key = f"{spec.name}-" + cache.cache_key(
            sources=[_key_source(p) for p in paths], sft_only=[_key_source(p) for p in sft_only],
            data_format=data_format, skip_malformed=skip_malformed, split=proportions, step=spec.name,
            share=spec.share, columns=spec.columns, seed=seed, eval_fraction=eval_fraction,
            tokenizer=cache.tokenizer_fingerprint(tokenizer), **lengths)
    data, stats, status = cache.cached(cache_dir, key, build)
    stats.update(cache=status, cache_path=str(os.path.join(os.path.expanduser(str(cache_dir)), key)) if key else None)
    for name in ("train", "eval"):
        # Non-tensor columns (step 3's prompt_messages) come through as Python values.
        data[name].set_format("torch", columns=spec.tensor_columns, output_all_columns=True)
    if get_rank() == 0:
        _log_summary(stats)
    return PhaseData(data["train"], data["eval"], stats)


def _log_summary(stats: dict) -> None:
    step = stats["step"]
    for name, s in stats["sources"].items():
        level = logging.WARNING if s["skipped_malformed"] else logging.INFO
        logger.log(level, "data %s [%s]: %d records, %d malformed skipped, %d/%d train/eval (eval: %s)%s "
                   "-> %s: %d train, %d eval", name, s["format"], s["records"], s["skipped_malformed"],
                   s["train"], s["eval"], s["eval_from"], " sft-only" if s["sft_only"] else "", step,
                   s["phase_train"], s["phase_eval"])
    for split_name in ("train", "eval"):
        s = stats[split_name]
        level = logging.WARNING if s["dropped"] or s["eos_cut"] else logging.INFO
        logger.log(level, "data %s %s: %d of %d records kept; %d truncated (%d lost their eos), %d dropped "
                   "as over-length (cache: %s)", step, split_name, s["kept"], s["records"], s["truncated"],
                   s["eos_cut"], s["dropped"], stats["cache"])
