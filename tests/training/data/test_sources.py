import re

import numpy as np
import pytest

from chatrlhf.training.data.formats import DataFormatError
from chatrlhf.training.data.sources import BUNDLED, BUNDLED_DIR, holdout_indices, load_source


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".jsonl.gz", ".json.gz", ".parquet"])
def test_local_file_types_load_the_same(tmp_path, write, make_pairs, suffix):
    records = make_pairs(40)
    records[3] = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "q3"}],
                  "chosen": "good answer 3", "rejected": "bad answer 3"}
    if suffix == ".parquet":  # one Arrow schema per column: keep the prompt type uniform
        records[3]["prompt"] = "q3"
    else:
        records[4]["rejected"] = None  # SFT-only records may sit beside pairs
    src = load_source(str(write(tmp_path / f"d{suffix}", records)), eval_fraction=0.1, seed=0)
    assert src.stats["format"] == "prompt_chosen_rejected" and src.stats["records"] == 40
    assert (len(src.train), len(src.eval)) == (36, 4)
    got = sorted(list(src.train["chosen"]) + list(src.eval["chosen"]), key=lambda s: int(s.split()[-1]))
    assert got == [r["chosen"] for r in records]
    assert set(src.train.column_names) == {"prompt", "chosen", "rejected", "metadata"}
    by_chosen = {ex["chosen"]: ex for ex in list(src.train) + list(src.eval)}
    if suffix != ".parquet":
        assert by_chosen["good answer 3"]["prompt"][0] == {"role": "system", "content": "S"}
        assert by_chosen["good answer 4"]["rejected"] is None


def test_holdout_is_deterministic_disjoint_and_at_least_one():
    train, ev = holdout_indices(100, 0.05, seed=7)
    assert len(ev) == 5 and len(train) == 95
    assert set(train) | set(ev) == set(range(100)) and not set(train) & set(ev)
    t2, e2 = holdout_indices(100, 0.05, seed=7)
    assert np.array_equal(train, t2) and np.array_equal(ev, e2)
    assert not np.array_equal(ev, holdout_indices(100, 0.05, seed=8)[1])
    assert len(holdout_indices(10, 0.01, seed=0)[1]) == 1  # rounds to 0, kept at 1
    assert len(holdout_indices(10, 0.0, seed=0)[1]) == 0
    with pytest.raises(ValueError, match="eval_fraction"):
        holdout_indices(10, 1.0, seed=0)


def test_folder_with_train_and_test_files_uses_its_eval_split(tmp_path, write, make_pairs):
    write(tmp_path / "train.jsonl", make_pairs(30))
    write(tmp_path / "test.json", make_pairs(7, start=100))
    src = load_source(str(tmp_path))
    assert (len(src.train), len(src.eval)) == (30, 7)
    assert src.stats["eval_from"] == "split" and src.stats["records"] == 37


def test_folder_with_train_shards_only(tmp_path, write, make_pairs):
    write(tmp_path / "train-00000-of-00002.jsonl", make_pairs(10))
    write(tmp_path / "train-00001-of-00002.jsonl", make_pairs(10, start=10))
    src = load_source(str(tmp_path), eval_fraction=0.1)
    assert (len(src.train), len(src.eval)) == (18, 2)


def test_save_to_disk_folder(tmp_path, make_pairs):
    from datasets import Dataset, DatasetDict

    DatasetDict(train=Dataset.from_list(make_pairs(20)),
                validation=Dataset.from_list(make_pairs(5, 50))).save_to_disk(str(tmp_path / "dd"))
    src = load_source(str(tmp_path / "dd"))
    assert (len(src.train), len(src.eval)) == (20, 5)
    Dataset.from_list(make_pairs(20)).save_to_disk(str(tmp_path / "ds"))
    src = load_source(str(tmp_path / "ds"), eval_fraction=0.25)
    assert (len(src.train), len(src.eval)) == (15, 5)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_source(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no train"):
        load_source(str(tmp_path / "empty"))


def test_malformed_record_in_file_names_file_and_record(tmp_path, write, make_pairs):
    records = make_pairs(5)
    records[3] = {"prompt": "q", "chosen": ""}
    path = write(tmp_path / "bad.jsonl.gz", records)
    with pytest.raises(DataFormatError, match=rf"{path}: line 4: field 'chosen' is empty"):  # 1-based lines
        load_source(str(path))
    src = load_source(str(path), skip_malformed=True)
    assert src.stats["skipped_malformed"] == 1 and len(src.train) + len(src.eval) == 4


def test_invalid_json_line_is_named(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a"}\n{oops\n')
    with pytest.raises(DataFormatError, match=rf"{path}: line 2: invalid JSON"):
        load_source(str(path))


def test_real_hh_rlhf_records(hh50):
    import gzip
    import json

    raw = {json.loads(line)["chosen"].rpartition("\n\nAssistant:")[2].strip() for line in gzip.open(hh50, "rt")}
    src = load_source(str(hh50), eval_fraction=0)
    assert src.stats["format"] == "hh_rlhf" and src.stats["records"] == 50 and src.stats["skipped_malformed"] == 0
    assert len(src.train) == 50 and set(src.train["chosen"]) == raw
    for ex in src.train:
        assert ex["prompt"][-1]["role"] == "user" and ex["prompt"][0]["role"] == "user"
        roles = [m["role"] for m in ex["prompt"]]
        assert all(a != b for a, b in zip(roles, roles[1:]))
        assert all(m["content"] and "\n\nHuman:" not in m["content"] for m in ex["prompt"])
        assert ex["rejected"]


def test_real_hh_rlhf_full_file_has_known_malformed_records(hh_rlhf_path):
    with pytest.raises(DataFormatError, match=rf"{hh_rlhf_path}: line 87: the chosen response is empty"):
        load_source(str(hh_rlhf_path))
    src = load_source(str(hh_rlhf_path), skip_malformed=True)
    assert src.stats["skipped_malformed"] == 8 and len(src.train) + len(src.eval) == 1992


def test_real_alpaca(alpaca_path):
    src = load_source(str(alpaca_path))
    assert src.stats["format"] == "alpaca" and src.stats["records"] == 999
    assert len(src.eval) == 50 and len(src.train) == 949
    ex = src.train[0]
    assert ex["rejected"] is None and ex["prompt"][-1]["role"] == "user"


@pytest.mark.skipif(not (BUNDLED_DIR / BUNDLED["hh-rlhf-demo"]).exists(), reason="bundled demo data not present")
def test_bundled_demo_name():
    src = load_source("hh-rlhf-demo")
    assert src.name == "hh-rlhf-demo" and src.stats["format"] == "hh_rlhf"
    assert src.stats["skipped_malformed"] == 8  # the unchanged upstream file's known bad records, counted


def test_hub_name_goes_to_load_dataset(monkeypatch, make_pairs):
    import datasets
    from datasets import Dataset, DatasetDict

    asked = []

    def fake_load_dataset(name):
        asked.append(name)
        return DatasetDict(train=Dataset.from_list(make_pairs(12)), test=Dataset.from_list(make_pairs(3, 100)))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    src = load_source("Dahoas/rm-static-like")
    assert asked == ["Dahoas/rm-static-like"] and (len(src.train), len(src.eval)) == (12, 3)


# ------------------------------------------------------------------------------------------ data problems, named

def test_non_json_lines_are_named_or_skipped_and_counted(tmp_path, caplog):
    import json
    import logging

    good = [json.dumps({"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"}) for i in range(6)]
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join([good[0], "{oops", "", good[1], good[2], "not json at all", good[3], good[4],
                               good[5]]) + "\n")
    with pytest.raises(DataFormatError, match=rf"^{path}: line 2: invalid JSON .*pass --skip_malformed"):
        load_source(str(path))
    with caplog.at_level(logging.WARNING):
        src = load_source(str(path), skip_malformed=True, eval_fraction=0)
    assert src.stats["skipped_malformed"] == 2 and src.stats["records"] == 8  # blank lines are not records
    assert sorted(src.train["chosen"]) == [f"a{i}" for i in range(6)]
    assert f"{path}: skipped 2 malformed of 8 records" in caplog.text


@pytest.mark.parametrize("suffix, where", [(".jsonl", "line 5"), (".json", "record 4 of the array"),
                                           (".json.gz", "record 4 of the array"), (".parquet", "row 4")])
def test_records_are_named_as_their_file_numbers_them(tmp_path, write, make_pairs, suffix, where):
    records = make_pairs(8)
    records[4]["chosen"] = "   "
    path = write(tmp_path / f"d{suffix}", records)
    with pytest.raises(DataFormatError, match=rf"^{path}: {where}: field 'chosen' is empty"):
        load_source(str(path))


def _gz_bytes(records) -> bytes:
    import gzip
    import json

    return gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())


def _flip(data: bytes, start: int, end: int) -> bytes:
    return data[:start] + bytes(x ^ 0xFF for x in data[start:end]) + data[end:]


@pytest.mark.parametrize("name, content, what", [
    ("cut.jsonl.gz", lambda recs: _gz_bytes(recs)[:-200], r"truncated gzip file: it ends after line \d+"),
    ("cut.json.gz", lambda recs: _gz_bytes(recs)[:-200], "truncated gzip file"),
    ("corrupt.jsonl.gz", lambda recs: _flip(_gz_bytes(recs), 40, 80), "corrupt gzip data"),
    ("plain.jsonl.gz", lambda recs: b'{"prompt": "q", "chosen": "a"}\n', r"not a gzip file \(rename it"),
    ("trailing.jsonl.gz", lambda recs: _gz_bytes(recs) + b"garbage", r"corrupt gzip data after line \d+"),
    ("latin1.jsonl", lambda recs: b'{"prompt": "q", "chosen": "a"}\n{"prompt": "caf\xe9", "chosen": "a"}\n',
     r"line 2: not UTF-8 text \(byte b'\\xe9'\)"),
    ("latin1.json", lambda recs: b'[{"prompt": "q", "chosen": "a"},\n {"prompt": "caf\xe9", "chosen": "a"}]',
     "line 2: not UTF-8 text"),
    ("junk.parquet", lambda recs: b"this is not parquet", "cannot read it as Parquet"),
])
def test_unreadable_files_raise_a_named_data_error(tmp_path, make_pairs, name, content, what):
    path = tmp_path / name
    path.write_bytes(content(make_pairs(300)))
    for skip in (False, True):  # a broken file is not a malformed record: --skip_malformed does not hide it
        with pytest.raises(DataFormatError, match=rf"^{re.escape(str(path))}: {what}"):
            load_source(str(path), skip_malformed=skip)


def test_identical_pairs_are_dropped_counted_and_warned(tmp_path, write, make_pairs, caplog):
    import logging

    records = make_pairs(20)
    for i in (2, 5, 11):
        records[i]["rejected"] = records[i]["chosen"]
    records[7]["rejected"] = " " + records[7]["chosen"] + "\n"  # identical once stripped, as stored
    records[9]["rejected"] = records[12]["rejected"] = None  # single responses are not pairs
    path = write(tmp_path / "d.jsonl", records)
    with caplog.at_level(logging.WARNING):
        src = load_source(str(path), eval_fraction=0.1)
    assert src.stats["identical_pairs"] == 4 and src.stats["records"] == 20
    kept = list(src.train) + list(src.eval)
    assert len(kept) == 16 and not any(ex["chosen"] == ex["rejected"] for ex in kept)
    assert f"{path}: dropped 4 of 18 pairs whose chosen and rejected answers are identical" in caplog.text


def test_identical_pairs_across_train_and_eval_files_count_together(tmp_path, write, make_pairs):
    train, test = make_pairs(10), make_pairs(4, start=100)
    for r in train[:5] + test[:2]:
        r["rejected"] = r["chosen"]
    write(tmp_path / "train.jsonl", train)
    write(tmp_path / "test.jsonl", test)
    src = load_source(str(tmp_path))
    assert src.stats["identical_pairs"] == 7 and (len(src.train), len(src.eval)) == (5, 2)
    test[2]["rejected"] = test[2]["chosen"]  # now 8 of 14: the majority
    write(tmp_path / "test.jsonl", test)
    with pytest.raises(DataFormatError, match=rf"^{tmp_path}: 8 of its 14 pairs have identical chosen and rejected"):
        load_source(str(tmp_path))


def test_a_source_of_mostly_identical_pairs_is_refused(tmp_path, write, make_pairs):
    records = make_pairs(10)
    for r in records[:6]:
        r["rejected"] = r["chosen"]
    path = write(tmp_path / "d.jsonl", records)
    with pytest.raises(DataFormatError, match=rf"^{path}: 6 of its 10 pairs have identical .*format prompt_chosen"):
        load_source(str(path))
    sft = [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in make_pairs(10)]
    src = load_source(str(write(tmp_path / "sft.jsonl", sft)))  # no pairs at all: nothing to compare
    assert src.stats["identical_pairs"] == 0


def test_require_pairs_names_a_record_without_rejected_and_skips_it(tmp_path, write, make_pairs):
    records = make_pairs(10)
    del records[3]["rejected"]
    path = write(tmp_path / "d.jsonl", records)
    assert len(load_source(str(path), eval_fraction=0).train) == 10  # by default a single-response example
    with pytest.raises(DataFormatError, match=rf"^{path}: line 4: missing field 'rejected'.*--skip_malformed"):
        load_source(str(path), require_pairs=True)
    src = load_source(str(path), require_pairs=True, skip_malformed=True, eval_fraction=0)
    assert src.stats["skipped_malformed"] == 1 and len(src.train) == 9 and None not in src.train["rejected"]


def test_read_records_names_a_non_json_line(tmp_path):
    from chatrlhf.training.data.sources import read_records

    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a"}\n[1, \n')
    with pytest.raises(DataFormatError, match=rf"^{path}: line 2: invalid JSON"):
        list(read_records(path))
