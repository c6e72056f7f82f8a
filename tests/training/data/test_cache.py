import copy
import os

import pytest
from datasets import Dataset, DatasetDict

from chatrlhf.training.data import cache, tokenize
from chatrlhf.training.data.pipeline import load_data
from chatrlhf.training.step1_sft.data import SFT_DATA


@pytest.fixture
def counted(monkeypatch):
    """Counts tokenisation calls (two per build: train and eval)."""
    calls = []
    real = tokenize.tokenize_step

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tokenize, "tokenize_step", spy)
    return calls


@pytest.fixture
def data_file(tmp_path, write, make_pairs):
    return write(tmp_path / "pairs.jsonl", make_pairs(50))


def load(path, tok, cache_dir, **kw):
    return load_data([str(path)], SFT_DATA, tok, cache_dir=str(cache_dir), **kw)


def test_second_call_loads_from_cache(tokenizer, data_file, tmp_path, counted):
    first = load(data_file, tokenizer, tmp_path / "c")
    assert first.stats["cache"] == "built" and len(counted) == 2
    second = load(data_file, tokenizer, tmp_path / "c")
    assert second.stats["cache"] == "hit" and len(counted) == 2  # no re-tokenisation
    assert second.stats["cache_path"] == first.stats["cache_path"]
    assert [r.tolist() for r in second.train["input_ids"]] == [r.tolist() for r in first.train["input_ids"]]
    assert {k: v for k, v in second.stats.items() if k != "cache"} == {k: v for k, v in first.stats.items()
                                                                        if k != "cache"}
    entries = os.listdir(tmp_path / "c")
    assert len(entries) == 1 and not any(e.startswith(".tmp") for e in entries)


def test_changed_file_content_invalidates(tokenizer, tmp_path, write, make_pairs, counted):
    path = write(tmp_path / "d.jsonl", make_pairs(50))
    stat = path.stat()
    load(path, tokenizer, tmp_path / "c")
    records = make_pairs(50)
    records[0]["chosen"] = "good answer X"  # same length, same path
    write(path, records)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime
    assert path.stat().st_size == stat.st_size
    again = load(path, tokenizer, tmp_path / "c")
    assert again.stats["cache"] == "built" and len(counted) == 4


def test_changed_settings_invalidate(tokenizer, data_file, tmp_path, counted):
    base = load(data_file, tokenizer, tmp_path / "c")
    paths = {base.stats["cache_path"]}
    for kw in (dict(max_seq_len=256), dict(train_on_prompt=True), dict(seed=1), dict(data_split="1,1,1"),
               dict(overlength="drop")):
        out = load(data_file, tokenizer, tmp_path / "c", **kw)
        assert out.stats["cache"] == "built", kw
        paths.add(out.stats["cache_path"])
    assert len(paths) == 6


def test_changed_chat_template_invalidates(tokenizer, data_file, tmp_path, counted):
    load(data_file, tokenizer, tmp_path / "c")
    tok = copy.deepcopy(tokenizer)
    assert load(data_file, tok, tmp_path / "c").stats["cache"] == "hit"  # an identical copy hits
    tok.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert load(data_file, tok, tmp_path / "c").stats["cache"] == "built"


def test_tokenizer_fingerprint(tokenizer, plain_tokenizer, pad_tokenizer):
    fp = cache.tokenizer_fingerprint(tokenizer)
    assert fp == cache.tokenizer_fingerprint(copy.deepcopy(tokenizer))
    assert fp != cache.tokenizer_fingerprint(plain_tokenizer)
    assert fp != cache.tokenizer_fingerprint(pad_tokenizer)  # special tokens count
    tok = copy.deepcopy(pad_tokenizer)
    before = cache.tokenizer_fingerprint(tok)
    tok(["a", "a b c"], padding=True, truncation=True, max_length=8)  # leaves padding state in the backend
    assert cache.tokenizer_fingerprint(tok) == before


def test_save_atomic_keeps_an_existing_entry(tmp_path):
    final = tmp_path / "key"
    cache.save_atomic(DatasetDict(train=Dataset.from_dict({"x": [1]})), {"who": "first"}, final)
    cache.save_atomic(DatasetDict(train=Dataset.from_dict({"x": [2]})), {"who": "second"}, final)
    data, stats = cache.load_entry(final)
    assert stats == {"who": "first"} and data["train"]["x"][:] == [1]
    assert os.listdir(tmp_path) == ["key"]  # the loser's temp folder is gone


def test_non_main_rank_builds_when_entry_is_missing(tmp_path, monkeypatch):
    # Node-local storage on a node whose local rank 0 did not produce this key: the rank builds it itself.
    monkeypatch.setenv("LOCAL_RANK", "1")
    built = []

    def build():
        built.append(1)
        return DatasetDict(train=Dataset.from_dict({"x": [1, 2]})), {"n": 2}

    data, stats, status = cache.cached(tmp_path, "k", build)
    assert built == [1] and stats == {"n": 2} and len(data["train"]) == 2
    monkeypatch.setenv("LOCAL_RANK", "0")
    data, stats, status = cache.cached(tmp_path, "k", build)
    assert built == [1] and status == "hit"


def test_no_cache_dir_builds_in_memory(tokenizer, data_file, counted):
    out = load_data([str(data_file)], SFT_DATA, tokenizer)
    assert out.stats["cache"] == "off" and out.stats["cache_path"] is None and len(counted) == 2


def test_source_fingerprint_of_folder_changes_with_content(tmp_path, write, make_pairs):
    write(tmp_path / "d" / "train.jsonl", make_pairs(5))
    before = cache.source_fingerprint(str(tmp_path / "d"))
    write(tmp_path / "d" / "test.jsonl", make_pairs(2))
    assert cache.source_fingerprint(str(tmp_path / "d")) != before
    assert cache.source_fingerprint("some-org/some-dataset").startswith("hub:some-org/some-dataset@")
