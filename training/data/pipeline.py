"""The one entry point the steps call: sources -> normalised examples -> phase split -> tokens (cached)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from chatrlhf.training.data import cache, split, tokenize
from chatrlhf.training.data.sources import DEFAULT_EVAL_FRACTION, is_local, load_source, resolve
from chatrlhf.utils.distributed import get_rank

logger = logging.getLogger(__name__)

COLUMNS = {1: ["input_ids", "labels", "length"], 2: ["chosen_input_ids", "rejected_input_ids", "length"],
           3: ["input_ids", "length"]}


@dataclass
class PhaseData:
    """Tokenised `train` and `eval` Datasets (torch format; columns COLUMNS[phase]) and `stats`."""
    train: "datasets.Dataset"  # noqa: F821
    eval: "datasets.Dataset"  # noqa: F821
    stats: dict


def _as_list(paths) -> list[str]:
    return [str(paths)] if isinstance(paths, (str, os.PathLike)) else [str(p) for p in paths]


def _key_source(p: str) -> tuple[str, str]:
    """(where, content fingerprint) of a source for the cache key."""
    p = resolve(p)
    return (os.path.abspath(os.path.expanduser(p)) if is_local(p) else p), cache.source_fingerprint(p)


def load_phase_data(paths, phase: int, tokenizer, *, data_split: str = "2,4,4", sft_only_paths=(), seed: int = 1234,
                    cache_dir=None, max_seq_len: int = 512, max_prompt_len: int = 256, overlength: str = "truncate",
                    train_on_prompt: bool = False, skip_malformed: bool = False,
                    eval_fraction: float = DEFAULT_EVAL_FRACTION, data_format: str | dict | None = None,
                    num_proc: int | None = None) -> PhaseData:
    """Train/eval data of `phase` (1 SFT, 2 reward model, 3 PPO prompts) from `paths` blended.

    `data_split` gives each phase a disjoint seeded share of every source (DeepSpeed-Chat's --data_split);
    `sft_only_paths` go wholly to phase 1. `data_format` forces one format for all sources or, as a dict,
    per path. stats: {"phase", "sources": {name: {"format", "records", "skipped_malformed", "train", "eval",
    "eval_from", "sft_only", "phase_train", "phase_eval"}}, "skipped_malformed", "train"/"eval": {"records",
    "kept", "truncated", "dropped", "eos_cut"}, "truncated", "dropped", "eos_cut", "cache", "cache_path"}.
    """
    paths, sft_only = _as_list(paths), (_as_list(sft_only_paths) if phase == 1 else [])
    if phase not in split.PHASES:
        raise ValueError(f"phase must be one of {split.PHASES}, got {phase}")
    if not paths and not sft_only:
        raise ValueError(f"phase {phase} needs at least one --data_path (SFT-only data is used by phase 1 only)")
    if len(set(paths + sft_only)) < len(paths + sft_only):
        raise ValueError(f"a data path is listed twice: {paths + sft_only}")
    proportions = split.parse_split(data_split)
    tokenize.check_lengths(max_seq_len, max_prompt_len, overlength)
    fmt = (lambda p: data_format.get(p)) if isinstance(data_format, dict) else (lambda p: data_format)
    lengths = dict(max_seq_len=max_seq_len, max_prompt_len=max_prompt_len, overlength=overlength,
                   train_on_prompt=train_on_prompt)

    def build():
        from datasets import DatasetDict

        sources, train_parts, eval_parts = {}, [], []
        for path, is_sft in [(p, False) for p in paths] + [(p, True) for p in sft_only]:
            src = load_source(path, data_format=fmt(path), skip_malformed=skip_malformed,
                              eval_fraction=eval_fraction, seed=seed)
            tr, ev = split.phase_subset(src, phase, data_split, seed, sft_only=is_sft)
            sources[src.name] = dict(src.stats, sft_only=is_sft, phase_train=len(tr), phase_eval=len(ev))
            train_parts.append(tr)
            eval_parts.append(ev)
        out, stats = {}, {"phase": phase, "sources": sources,
                          "skipped_malformed": sum(s["skipped_malformed"] for s in sources.values())}
        for name, parts in (("train", train_parts), ("eval", eval_parts)):
            out[name], stats[name] = tokenize.tokenize_phase(split.blend(parts, seed), phase, tokenizer,
                                                             num_proc=num_proc, **lengths)
        for k in ("truncated", "dropped", "eos_cut"):
            stats[k] = stats["train"][k] + stats["eval"][k]
        return DatasetDict(out), stats

    key = None
    if cache_dir is not None:
        key = f"phase{phase}-" + cache.cache_key(
            sources=[_key_source(p) for p in paths], sft_only=[_key_source(p) for p in sft_only],
            data_format=data_format, skip_malformed=skip_malformed, split=proportions, phase=phase, seed=seed,
            eval_fraction=eval_fraction, tokenizer=cache.tokenizer_fingerprint(tokenizer), **lengths)
    data, stats, status = cache.cached(cache_dir, key, build)
    stats.update(cache=status, cache_path=str(os.path.join(os.path.expanduser(str(cache_dir)), key)) if key else None)
    for name in ("train", "eval"):
        # Non-tensor columns (phase 3's prompt_messages) come through as Python values.
        data[name].set_format("torch", columns=COLUMNS[phase], output_all_columns=True)
    if get_rank() == 0:
        _log_summary(stats)
    return PhaseData(data["train"], data["eval"], stats)


def _log_summary(stats: dict) -> None:
    phase = stats["phase"]
    for name, s in stats["sources"].items():
        level = logging.WARNING if s["skipped_malformed"] else logging.INFO
        logger.log(level, "data %s [%s]: %d records, %d malformed skipped, %d/%d train/eval (eval: %s)%s "
                   "-> phase %d: %d train, %d eval", name, s["format"], s["records"], s["skipped_malformed"],
                   s["train"], s["eval"], s["eval_from"], " sft-only" if s["sft_only"] else "", phase,
                   s["phase_train"], s["phase_eval"])
    for split_name in ("train", "eval"):
        s = stats[split_name]
        level = logging.WARNING if s["dropped"] or s["eos_cut"] else logging.INFO
        logger.log(level, "data phase %d %s: %d of %d records kept; %d truncated (%d lost their eos), %d dropped "
                   "as over-length (cache: %s)", phase, split_name, s["kept"], s["records"], s["truncated"],
                   s["eos_cut"], s["dropped"], stats["cache"])
