import copy

import pytest
import torch

from chatrlhf.training.data.collate import PairCollator, PromptCollator, SFTCollator, pad


def test_pad_sides_and_multiple():
    ids, mask = pad([[1, 2, 3], torch.tensor([4])], value=0, side="right")
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad([[1, 2, 3], [4]], value=0, side="left", multiple_of=8)
    assert ids.shape == (2, 8) and ids[1].tolist() == [0] * 7 + [4] and mask[1].tolist() == [0] * 7 + [1]
    assert ids.dtype == mask.dtype == torch.long


def test_sft_collator_right_pads_and_masks_labels(pad_tokenizer):
    pid = pad_tokenizer.pad_token_id
    batch = SFTCollator(pad_tokenizer)([
        {"input_ids": torch.tensor([5, 6, 7, 8], dtype=torch.int32), "labels": torch.tensor([-100, -100, 7, 8])},
        {"input_ids": [9, 10], "labels": [-100, 10]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, pid, pid]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]
    batch = SFTCollator(pad_tokenizer, pad_to_multiple_of=8)([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}])
    assert batch["input_ids"].shape == batch["labels"].shape == (1, 8)


def test_pair_collator_stacks_chosen_then_rejected(pad_tokenizer):
    pid = pad_tokenizer.pad_token_id
    batch = PairCollator(pad_tokenizer)([{"chosen_input_ids": [1, 2, 3], "rejected_input_ids": [1, 2]},
                                         {"chosen_input_ids": [4], "rejected_input_ids": [4, 5, 6, 7]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, pid], [4, pid, pid, pid], [1, 2, pid, pid], [4, 5, 6, 7]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 1, 2, 4]


def test_prompt_collator_left_pads(pad_tokenizer):
    pid = pad_tokenizer.pad_token_id
    batch = PromptCollator(pad_tokenizer)([{"input_ids": [1, 2, 3]}, {"input_ids": [4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [pid, pid, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_collators_need_a_pad_distinct_from_eos(tokenizer, pad_tokenizer):
    with pytest.raises(ValueError, match="no pad token"):
        SFTCollator(tokenizer)([{"input_ids": [1], "labels": [1]}])
    same = copy.deepcopy(pad_tokenizer)
    same.pad_token = same.eos_token
    with pytest.raises(ValueError, match="must differ from the eos"):
        PromptCollator(same)([{"input_ids": [1]}])
