"""Loading one data source (a file, a folder or a hub dataset) into normalised train and eval Datasets.

Local files are read record by record in Python so that a bad record is reported by its line (JSONL) or
position; hub and `save_to_disk` datasets are iterated the same way. A source without an eval split gets a
deterministic held-out `eval_fraction` (DEFAULT_EVAL_FRACTION, at least one record) chosen by `seed`.
Pairs whose chosen and rejected answers are identical carry no preference: they are dropped and counted, and a
source made mostly of them is refused.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from chatrlhf.training.data.formats import DataFormatError, Located, Unreadable, normalize

logger = logging.getLogger(__name__)

# 5% is plenty for large sets and still leaves e.g. 100 held-out pairs of a 2,000-record file.
DEFAULT_EVAL_FRACTION = 0.05
FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
EVAL_SPLITS = ("test", "eval", "validation")
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
# Names for data shipped with chatrlhf. The files are unchanged upstream data, so their few malformed records
# (HH-RLHF demo: 8 of 2,000 - empty answers, pairs whose transcripts differ) are always skipped and counted.
BUNDLED = {"hh-rlhf-demo": "hh_rlhf_harmless_base.jsonl.gz"}


def example_features():
    from datasets import Features, List, Value

    return Features({"prompt": List({"role": Value("string"), "content": Value("string")}),
                     "chosen": Value("string"), "rejected": Value("string"), "metadata": Value("string")})


@dataclass
class Source:
    """One normalised source: `train`/`eval` Datasets with columns prompt, chosen, rejected."""
    name: str
    train: "datasets.Dataset"  # noqa: F821
    eval: "datasets.Dataset"  # noqa: F821
    stats: dict = field(default_factory=dict)


def resolve(path_or_name: str) -> str:
    """A bundled data name -> its file; anything else unchanged."""
    name = str(path_or_name)
    return str(BUNDLED_DIR / BUNDLED[name]) if name in BUNDLED else name


def is_local(path_or_name: str) -> bool:
    """Local if it exists, or if it clearly means a path (so a typo is not sent to the hub)."""
    p = str(path_or_name)
    return os.path.exists(p) or p.startswith((".", "/", "~")) or p.endswith(FILE_SUFFIXES)


def read_records(path: Path) -> Iterator[dict]:
    """Raw records of a .json (list), .jsonl, .json.gz, .jsonl.gz or .parquet file; a line that is not JSON
    raises DataFormatError naming the file and line."""
    for where, record in read_located(path):
        if isinstance(record, Unreadable):
            raise DataFormatError(f"{path}: {where}: {record.what}")
        yield record


def read_located(path: Path) -> Located:
    """(where, record) pairs of a file, for `normalize`: "line <n>" (1-based) for JSONL, "record <i> of the array"
    for a .json list, "row <i>" for Parquet. A JSONL line that is not JSON comes as an `Unreadable` record
    (skippable); an unreadable file (corrupt or truncated gzip, not UTF-8, not Parquet) raises DataFormatError."""
    name = path.name
    if name.endswith(".parquet"):
        return Located(_parquet_records(path))
    if name.endswith((".jsonl", ".jsonl.gz")):
        return Located(_jsonl_records(path))
    if name.endswith((".json", ".json.gz")):
        return Located(_json_records(path))
    raise DataFormatError(f"{path}: unsupported file type (expected one of {', '.join(FILE_SUFFIXES)})")


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _gzip_error(path: Path, lines_read: int | None, e: Exception) -> DataFormatError:
    """gzip's EOFError / zlib.error / BadGzipFile -> an error naming the file (and how far it was readable)."""
    after = f" after line {lines_read}" if lines_read else ""
    with open(path, "rb") as f:
        plain = f.read(2) != b"\x1f\x8b"  # gzip's magic number
    if plain:
        what = "not a gzip file (rename it without .gz if it is plain text)"
    elif isinstance(e, EOFError):
        what = f"truncated gzip file: it ends{after} before the end of its compressed stream"
    else:
        what = f"corrupt gzip data{after}"
    return DataFormatError(f"{path}: {what} ({type(e).__name__}: {e})")


def _not_utf8(path: Path, line: int, e: UnicodeDecodeError) -> DataFormatError:
    return DataFormatError(f"{path}: line {line}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r}); "
                           "convert the file to UTF-8")


def _jsonl_records(path: Path):
    # Bytes, decoded per line: an encoding error then names its line, and gzip's errors surface here, named.
    n = 0
    with _open(path) as f:
        lines = iter(f)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except (EOFError, zlib.error, gzip.BadGzipFile) as e:
                raise _gzip_error(path, n, e) from None
            n += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, n, e) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                record = Unreadable(f"invalid JSON ({e})")
            yield f"line {n}", record


def _json_records(path: Path):
    try:
        with _open(path) as f:
            raw = f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise _gzip_error(path, None, e) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, raw.count(b"\n", 0, e.start) + 1, e) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}: line {e.lineno}: invalid JSON ({e})") from None
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: a .json file must hold a list of records, got {type(data).__name__}")
    for i, record in enumerate(data):
        yield f"record {i} of the array", record


def _parquet_records(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def batches():
        try:
            yield from pq.ParquetFile(path).iter_batches(batch_size=4096)
        except (pa.ArrowException, OSError) as e:
            raise DataFormatError(f"{path}: cannot read it as Parquet ({type(e).__name__}: {e})") from None

    i = 0
    for batch in batches():
        for record in batch.to_pylist():
            yield f"row {i}", record
            i += 1


def _split_files(folder: Path, split: str) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(FILE_SUFFIXES)
                  and (p.name.startswith(split + ".") or p.name.startswith(split + "-")))


def _raw_splits(path_or_name: str) -> tuple[list, list | None]:
    """([(label, records iterable)], same for eval or None) for any kind of source."""
    p = Path(path_or_name).expanduser()
    if is_local(path_or_name) and not p.exists():
        raise FileNotFoundError(f"data source {path_or_name!r} does not exist")
    if p.is_file():
        return [(str(p), read_located(p))], None
    if p.is_dir():
        if (p / "dataset_dict.json").exists() or (p / "state.json").exists():
            import datasets

            return _from_hf(datasets.load_from_disk(str(p)), str(p))
        train = _split_files(p, "train")
        if not train:
            raise FileNotFoundError(f"data folder {p} has no train.* / train-*.* file ({', '.join(FILE_SUFFIXES)}) "
                                    "and is not a datasets.save_to_disk folder")
        evals = next((files for s in EVAL_SPLITS if (files := _split_files(p, s))), [])
        return ([(str(f), read_located(f)) for f in train],
                [(str(f), read_located(f)) for f in evals] or None)
    import datasets

    return _from_hf(datasets.load_dataset(path_or_name), path_or_name)


def _from_hf(ds, label: str):
    """A loaded Dataset or DatasetDict -> (train parts, eval parts or None)."""
    if not hasattr(ds, "keys"):  # a single Dataset
        return [(label, iter(ds))], None
    if "train" not in ds:
        raise DataFormatError(f"{label}: no 'train' split (has {sorted(ds)})")
    ev = next((s for s in EVAL_SPLITS if s in ds), None)
    return [(f"{label}[train]", iter(ds["train"]))], ([(f"{label}[{ev}]", iter(ds[ev]))] if ev else None)


def _normalize_parts(parts, data_format, skip_malformed, require_pairs):
    """(one Dataset of all parts, stats, number of pairs before dropping identical ones)."""
    from datasets import Dataset, concatenate_datasets

    sets, pairs = [], 0
    stats = {"format": data_format, "records": 0, "skipped_malformed": 0, "identical_pairs": 0}
    for label, records in parts:
        columns, st = normalize(records, label, data_format, skip_malformed, require_pairs)
        data_format = data_format or st["format"]  # later files of one split must match the first
        # Single-response (SFT) records have rejected None and are not pairs.
        same = [r is not None and c == r for c, r in zip(columns["chosen"], columns["rejected"])]
        pairs += sum(r is not None for r in columns["rejected"])
        if any(same):
            columns = {k: [v for v, drop in zip(col, same) if not drop] for k, col in columns.items()}
        sets.append(Dataset.from_dict(columns, features=example_features()))
        stats.update(format=st["format"], records=stats["records"] + st["records"],
                     skipped_malformed=stats["skipped_malformed"] + st["skipped_malformed"],
                     identical_pairs=stats["identical_pairs"] + sum(same))
    return concatenate_datasets(sets) if len(sets) > 1 else sets[0], stats, pairs


def holdout_indices(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) index arrays: a seeded random `eval_fraction` of range(n), at least one record
    when 0 < eval_fraction and n >= 2; both sorted."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n_eval = 0 if eval_fraction == 0 or n < 2 else min(n - 1, max(1, round(n * eval_fraction)))
    perm = np.random.RandomState(seed).permutation(n)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


def load_source(path_or_name: str, *, data_format: str | None = None, skip_malformed: bool = False,
                eval_fraction: float = DEFAULT_EVAL_FRACTION, seed: int = 1234, require_pairs: bool = False) -> Source:
    """Loads and normalises one source.

    path_or_name: a .json/.jsonl/.json.gz/.jsonl.gz/.parquet file; a folder with train.* and optionally
    test.*|eval.*|validation.* files (or train-*.* shards); a `datasets.save_to_disk` folder; or a hub dataset
    name (`datasets.load_dataset(name)`), or a BUNDLED name. Its own eval split is used when it has one, else a
    seeded holdout. Pairs with identical chosen and rejected answers are dropped (counted in `identical_pairs`);
    a source where they are the majority of its pairs raises DataFormatError. require_pairs: a record without a
    rejected answer is malformed (see `normalize`). stats: {"format", "records", "skipped_malformed",
    "identical_pairs", "train", "eval", "eval_from"}.
    """
    skip_malformed = skip_malformed or str(path_or_name) in BUNDLED
    train_parts, eval_parts = _raw_splits(resolve(path_or_name))
    train, stats, pairs = _normalize_parts(train_parts, data_format, skip_malformed, require_pairs)
    if eval_parts:
        ev, ev_stats, ev_pairs = _normalize_parts(eval_parts, data_format or stats["format"], skip_malformed,
                                                  require_pairs)
        for key in ("records", "skipped_malformed", "identical_pairs"):
            stats[key] += ev_stats[key]
        pairs += ev_pairs
        stats["eval_from"] = "split"
    else:
        train_idx, eval_idx = holdout_indices(len(train), eval_fraction, seed)
        train, ev = train.select(train_idx), train.select(eval_idx)
        stats["eval_from"] = f"holdout {eval_fraction:g}"
    identical = stats["identical_pairs"]
    if identical and 2 * identical > pairs:
        # Most answers equal their alternative: a layout read wrongly (or a broken export), not preference data.
        raise DataFormatError(f"{path_or_name}: {identical} of its {pairs} pairs have identical chosen and rejected "
                              f"answers (format {stats['format']}); is the format or the file right?")
    if identical:
        logger.warning("%s: dropped %d of %d pairs whose chosen and rejected answers are identical",
                       path_or_name, identical, pairs)
    if len(train) == 0:
        raise DataFormatError(f"{path_or_name}: no usable training records")
    stats.update(train=len(train), eval=len(ev))
    return Source(str(path_or_name), train, ev, stats)
