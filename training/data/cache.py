"""On-disk cache of tokenised phase data under `cache_dir` (DeepSpeed-Chat's --data_output_path).

The key hashes everything the output depends on: each source's content (sha256 of local bytes), the
split, phase, seed, lengths and policies, the tokenizer (vocab/merges/normalizer, special tokens, chat
template, class) and FORMAT_VERSION. An entry is written with `save_to_disk` into a private temp folder and
renamed into place, so readers only ever see complete entries and concurrent writers (ranks, nodes on
shared storage) cannot clash: the first rename wins and the others discard their copy.
On each node local rank 0 builds a missing entry, then all ranks meet at a barrier and load it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from chatrlhf.utils.distributed import barrier, is_local_main_process

logger = logging.getLogger(__name__)

# Bump when normalisation, rendering or tokenisation changes what a cached entry contains.
FORMAT_VERSION = 3  # 3: identical pairs dropped; step-owned tokenisation
STATS_FILE = "chatrlhf_stats.json"


def _sha256_file(path: Path) -> str:
    # Always the bytes, never size/mtime: copies that keep mtimes (cp -p, rsync -t, tar) must still invalidate.
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hub_revision(name: str) -> str | None:
    """The hub dataset's current commit, when the hub can be asked; else None (keyed by name alone)."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(name, timeout=10).sha
    except Exception:  # offline, private, no huggingface_hub: fall back to the name
        return None


def source_fingerprint(path_or_name: str) -> str:
    """sha256 of a local file's bytes, of a folder's files (relative names + bytes), or the hub revision."""
    p = Path(path_or_name).expanduser()
    if p.is_file():
        return _sha256_file(p)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(f"{f.relative_to(p)}\0{_sha256_file(f)}\0".encode())
        return h.hexdigest()
    return f"hub:{path_or_name}@{_hub_revision(path_or_name)}"


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the tokenizer would encode or render anything differently."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Padding/truncation state is call-time configuration that tokenizer calls leave behind, not encoding.
        model = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
    else:
        model = tokenizer.get_vocab()
    model = json.dumps(model, sort_keys=True)
    parts = [type(tokenizer).__name__, hashlib.sha256(model.encode()).hexdigest(),
             json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
             [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
             getattr(tokenizer, "chat_template", None), getattr(tokenizer, "add_bos_token", None),
             getattr(tokenizer, "add_eos_token", None)]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def cache_key(**parts) -> str:
    """sha256 over FORMAT_VERSION and the given JSON-serialisable parts."""
    blob = json.dumps({"format_version": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_atomic(data, stats: dict, final: Path) -> None:
    """`data.save_to_disk` into a temp folder beside `final`, then rename; if `final` exists, keep it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex}"
    try:
        # An empty split would get zero shards, which `load_from_disk` cannot read back: give it one.
        data.save_to_disk(str(tmp), num_shards={k: 1 for k, d in data.items() if len(d) == 0})
        (tmp / STATS_FILE).write_text(json.dumps(stats, indent=1))
        os.rename(tmp, final)
    except OSError:
        if not (final / STATS_FILE).exists():
            raise
        logger.info("data cache %s was written by another process; using theirs", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_entry(final: Path):
    """(DatasetDict, stats) of a complete cache entry."""
    import datasets

    return datasets.load_from_disk(str(final)), json.loads((final / STATS_FILE).read_text())


def cached(cache_dir: str | os.PathLike | None, key: str, build: Callable[[], tuple]):
    """(data, stats, status): `build() -> (DatasetDict, stats)` run at most once per node, then loaded by
    every rank. status is "off" (no cache_dir: built in memory), "built" or "hit"."""
    if cache_dir is None:
        data, stats = build()
        return data, stats, "off"
    final = Path(cache_dir).expanduser() / key
    complete = lambda: (final / STATS_FILE).exists()  # noqa: E731
    status, error = ("hit" if complete() else "built"), None
    if not complete() and is_local_main_process():
        try:
            save_atomic(*build(), final)
        except Exception as e:  # meet the other ranks at the barrier first, so they fail instead of hanging
            error = e
    barrier()
    if error is not None:
        raise error
    if not complete():  # another node's entry on node-local storage, or local rank 0 failed: build here
        save_atomic(*build(), final)
    data, stats = load_entry(final)
    return data, stats, status
