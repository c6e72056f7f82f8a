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
    assert set(src.train.column_names) == {"prompt", "chosen", "rejected"}
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
    with pytest.raises(DataFormatError, match=rf"{path}: record 3: field 'chosen' is empty"):
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
    with pytest.raises(DataFormatError, match=rf"{hh_rlhf_path}: record 86: the chosen response is empty"):
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
