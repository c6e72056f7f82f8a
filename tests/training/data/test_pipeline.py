import dataclasses
import logging

import pytest
import torch
from torch.utils.data import DataLoader

from chatrlhf.training.data.formats import DataFormatError
from chatrlhf.training.data.pipeline import load_data
from chatrlhf.training.step1_sft.data import SFT_DATA, SFTCollator
from chatrlhf.training.step2_reward.data import REWARD_DATA, PairCollator
from chatrlhf.training.step3_ppo.data import PROMPT_DATA, PromptCollator

SPECS = {1: SFT_DATA, 2: REWARD_DATA, 3: PROMPT_DATA}  # the steps' own StepData, by their --data_split share

SPLIT_STATS = {"records", "kept", "truncated", "dropped", "eos_cut"}


@pytest.mark.parametrize("phase, columns, collator", [
    (1, ["input_ids", "labels", "length"], SFTCollator),
    (2, ["chosen_input_ids", "rejected_input_ids", "prompt_length", "length"], PairCollator),
    (3, ["input_ids", "prompt_messages", "metadata", "length"], PromptCollator),
])
def test_real_hh_rlhf_all_phases(hh50, pad_tokenizer, phase, columns, collator):
    data = load_data([str(hh50)], SPECS[phase], pad_tokenizer, max_seq_len=128, max_prompt_len=64, eval_fraction=0.2)
    assert data.train.column_names == columns and len(data.train) > 0 and len(data.eval) > 0
    row = data.train[0]
    assert all(isinstance(row[c], torch.Tensor) for c in columns if c not in ("prompt_messages", "metadata"))
    first = columns[0]
    assert int(row["length"]) == len(row[first]) <= (128 if phase < 3 else 64)
    s = data.stats
    assert set(s["train"]) == set(s["eval"]) == SPLIT_STATS
    assert s["sources"][str(hh50)]["format"] == "hh_rlhf" and s["skipped_malformed"] == 0
    assert s["truncated"] == s["train"]["truncated"] + s["eval"]["truncated"]
    batch = next(iter(DataLoader(data.train, batch_size=4, collate_fn=collator(pad_tokenizer))))
    rows = 8 if phase == 2 else 4
    assert batch["input_ids"].shape[0] == rows and batch["attention_mask"].shape == batch["input_ids"].shape
    if phase == 3:  # the messages travel with the tokens, for a reward model with another tokenizer
        assert len(batch["prompt_messages"]) == 4 and batch["prompt_messages"][0][-1]["role"] == "user"


def test_phase_split_sizes_follow_data_split(hh50, tokenizer):
    sizes = [load_data([str(hh50)], SPECS[k], tokenizer, eval_fraction=0.2).stats["sources"][str(hh50)]
             for k in (1, 2, 3)]
    assert [s["phase_train"] for s in sizes] == [8, 16, 16]  # 40 training records cut 2:4:4
    assert [s["phase_eval"] for s in sizes] == [2, 4, 4]


def test_blend_with_sft_only_alpaca(hh50, alpaca_path, tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger="chatrlhf.training.data.pipeline"):
        data = load_data([str(hh50)], SPECS[1], tokenizer, sft_only_paths=[str(alpaca_path)], max_seq_len=64)
    src = data.stats["sources"]
    assert src[str(alpaca_path)]["sft_only"] and src[str(alpaca_path)]["phase_train"] == 949
    assert len(data.train) == src[str(hh50)]["phase_train"] + 949
    assert sum(f"data {name} [" in caplog.text for name in src) == 2  # a summary line per source
    phase2 = load_data([str(hh50)], SPECS[2], tokenizer, sft_only_paths=[str(alpaca_path)])
    assert list(phase2.stats["sources"]) == [str(hh50)]  # SFT-only data plays no part in phase 2


def test_phase_2_rejects_sft_data_naming_it(alpaca_path, tokenizer):
    with pytest.raises(DataFormatError, match=rf"{alpaca_path}: .* have no 'rejected'"):
        load_data([str(alpaca_path)], SPECS[2], tokenizer)


def test_argument_errors(hh50, tokenizer):
    with pytest.raises(ValueError, match="--data_split"):
        load_data([str(hh50)], SPECS[1], tokenizer, data_split="1,1")
    with pytest.raises(ValueError, match="data share must be"):
        load_data([str(hh50)], dataclasses.replace(SFT_DATA, share=3), tokenizer)
    with pytest.raises(ValueError, match="needs at least one --data_path"):
        load_data([], SPECS[2], tokenizer, sft_only_paths=[str(hh50)])
    with pytest.raises(ValueError, match="listed twice"):
        load_data([str(hh50)], SPECS[1], tokenizer, sft_only_paths=[str(hh50)])


def test_skip_malformed_is_reported(tmp_path, write, make_pairs, tokenizer, caplog):
    records = make_pairs(30)
    records[7]["chosen"] = ""
    path = write(tmp_path / "x.jsonl", records)
    with pytest.raises(DataFormatError, match=rf"{path}: line 8"):
        load_data([str(path)], SPECS[1], tokenizer)
    with caplog.at_level(logging.WARNING):
        data = load_data([str(path)], SPECS[1], tokenizer, skip_malformed=True)
    assert data.stats["skipped_malformed"] == 1 and "1 malformed skipped" in caplog.text
