"""DeepSpeed-Chat's `--data_split` semantics: each source is cut into three disjoint, seeded shares, so the
steps that train on different shares (SFT, the reward model, PPO) see different prompts (as in InstructGPT).

For each source and each of its splits (train, eval): shuffle range(n) with np.random.RandomState(seed),
cut the permutation at round(n * cumulative proportion); share k is chunk k. A step names its share in its
`StepData`. Several sources blend by concatenating their chunks and shuffling with the seed.
"""
from __future__ import annotations

import numpy as np

from chatrlhf.training.data.formats import DataFormatError
from chatrlhf.training.data.sources import Source

SHARES = 3


def parse_split(data_split: str) -> list[float]:
    """"2,4,4" -> [0.2, 0.4, 0.4]."""
    try:
        parts = [float(x) for x in str(data_split).split(",")]
    except ValueError:
        raise ValueError(f"--data_split {data_split!r}: expected three comma-separated numbers such as 2,4,4") from None
    if len(parts) != 3 or any(not np.isfinite(x) or x < 0 for x in parts) or sum(parts) <= 0:
        raise ValueError(f"--data_split {data_split!r}: expected three non-negative numbers with a positive sum, "
                         "one per share (SFT, reward model, RL), such as 2,4,4 or 10,0,0")
    total = sum(parts)
    return [x / total for x in parts]


def shuffle_index(n: int, seed: int) -> np.ndarray:
    """DeepSpeed-Chat's get_shuffle_idx: arange(n) shuffled in place by RandomState(seed)."""
    idx = np.arange(n, dtype=np.uint32 if n < 2**32 - 1 else np.int64)
    np.random.RandomState(seed).shuffle(idx)
    return idx


def chunk_indices(n: int, proportions: list[float], seed: int) -> list[np.ndarray]:
    """Disjoint index chunks covering range(n) exactly once, sized by cumulative rounding."""
    bounds = [0] + [int(round(n * c)) for c in np.cumsum(proportions)]
    bounds[-1] = n  # float cumsum may land at 0.999...
    idx = shuffle_index(n, seed)
    return [idx[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def share_indices(n: int, share: int, data_split: str, seed: int) -> np.ndarray:
    """The indices of range(n) in share `share` (0, 1 or 2) of `data_split`."""
    if share not in range(SHARES):
        raise ValueError(f"a data share must be 0, 1 or 2 (one per --data_split number), got {share}")
    return chunk_indices(n, parse_split(data_split), seed)[share]


def require_pairs(ds, name: str, split: str, step: str) -> None:
    """Every record of `ds` carries a rejected answer (steps that learn from preferences)."""
    missing = sum(r is None for r in ds["rejected"]) if len(ds) else 0
    if missing:
        raise DataFormatError(f"{name}: {missing} of its {len(ds)} {step} {split} records have no 'rejected' "
                              "response; this step needs pairs (pass this source as SFT-only data instead)")


def share_subset(source: Source, share: int, data_split: str, seed: int, whole: bool = False):
    """(train, eval) Datasets of `source` in `share`; `whole` takes all of it (SFT-only data in step 1)."""
    if whole:
        return source.train, source.eval
    return tuple(ds.select(share_indices(len(ds), share, data_split, seed)) for ds in (source.train, source.eval))


def blend(parts: list, seed: int):
    """Concatenates per-source Datasets and shuffles the result with RandomState(seed)."""
    from datasets import concatenate_datasets

    ds = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return ds.select(shuffle_index(len(ds), seed)) if len(parts) > 1 else ds
