import numpy as np
import pytest

from chatrlhf.training.data.formats import DataFormatError
from chatrlhf.training.data.sources import load_source
from chatrlhf.training.data.split import blend, chunk_indices, parse_split, require_pairs, share_indices, share_subset


def test_parse_split():
    assert parse_split("2,4,4") == [0.2, 0.4, 0.4]
    assert parse_split("10,0,0") == [1.0, 0.0, 0.0]
    for bad in ("2,4", "a,b,c", "1,-1,2", "0,0,0", "1,2,3,4"):
        with pytest.raises(ValueError, match="--data_split"):
            parse_split(bad)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 10, 101, 1000])
def test_chunks_are_disjoint_cover_and_deterministic(n):
    chunks = chunk_indices(n, parse_split("2,4,4"), seed=1234)
    allidx = np.concatenate(chunks)
    assert sorted(allidx.tolist()) == list(range(n))  # every index exactly once
    again = chunk_indices(n, parse_split("2,4,4"), seed=1234)
    assert all(np.array_equal(a, b) for a, b in zip(chunks, again))
    assert [len(c) for c in chunks] == np.diff([0, round(n * 0.2), round(n * 0.6), n]).tolist()


def test_chunks_follow_deepspeed_chat_shuffle():
    idx = np.arange(50, dtype=np.uint32)
    np.random.RandomState(3).shuffle(idx)
    assert np.array_equal(np.concatenate(chunk_indices(50, parse_split("1,1,1"), seed=3)), idx)
    assert not np.array_equal(share_indices(50, 0, "1,1,1", 3), share_indices(50, 0, "1,1,1", 4))


@pytest.fixture
def source(tmp_path, write, make_pairs):
    write(tmp_path / "train.jsonl", make_pairs(100))
    write(tmp_path / "eval.jsonl", make_pairs(20, start=1000))
    return load_source(str(tmp_path))


def test_shares_disjoint_and_covering_for_train_and_eval(source):
    per_phase = [share_subset(source, k, "2,4,4", seed=42) for k in (0, 1, 2)]
    for s, total in ((0, 100), (1, 20)):  # train, eval
        sets = [set(p[s]["chosen"]) for p in per_phase]
        assert [len(x) for x in sets] == [round(total * 0.2), round(total * 0.4), total - round(total * 0.6)]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
        assert len(set.union(*sets)) == total
    again = share_subset(source, 1, "2,4,4", seed=42)
    assert list(again[0]["chosen"]) == list(per_phase[1][0]["chosen"])
    assert list(again[1]["chosen"]) == list(per_phase[1][1]["chosen"])


def test_sft_only_data_is_taken_whole(source):
    # Other steps never load SFT-only sources at all (tests/training/data/test_pipeline.py).
    train, ev = share_subset(source, 0, "2,4,4", seed=1, whole=True)
    assert (len(train), len(ev)) == (100, 20)


def test_pair_steps_need_rejected(tmp_path, write, make_pairs):
    records = make_pairs(30)
    for r in records:
        r.pop("rejected")
    src = load_source(str(write(tmp_path / "sft.jsonl", records)))
    train, _ = share_subset(src, 1, "2,4,4", seed=0)
    with pytest.raises(DataFormatError, match=r"sft.jsonl: \d+ of its \d+ reward train records have no 'rejected'"):
        require_pairs(train, src.name, "train", "reward")
    assert len(share_subset(src, 0, "2,4,4", seed=0)[0]) > 0  # fine for SFT and PPO prompts
    assert len(share_subset(src, 2, "2,4,4", seed=0)[0]) > 0


def test_blend_two_sources(tmp_path, write, make_pairs):
    a = load_source(str(write(tmp_path / "a.jsonl", make_pairs(40))), eval_fraction=0.1)
    b = load_source(str(write(tmp_path / "b.jsonl", make_pairs(60, start=500))), eval_fraction=0.1)
    parts = [share_subset(s, 0, "5,3,2", seed=9)[0] for s in (a, b)]
    blended = blend(parts, seed=9)
    assert len(blended) == len(parts[0]) + len(parts[1])
    assert set(blended["chosen"]) == set(parts[0]["chosen"]) | set(parts[1]["chosen"])
    order = list(blended["chosen"])
    assert order != list(parts[0]["chosen"]) + list(parts[1]["chosen"])  # shuffled, not stacked
    assert order == list(blend(parts, seed=9)["chosen"])
