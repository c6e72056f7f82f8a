import copy

import pytest
import torch

from chatrlhf.training.data.collate import pad, pad_id


def test_pad_sides_and_multiple():
    ids, mask = pad([[1, 2, 3], torch.tensor([4])], value=0, side="right")
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad([[1, 2, 3], [4]], value=0, side="left", multiple_of=8)
    assert ids.shape == (2, 8) and ids[1].tolist() == [0] * 7 + [4] and mask[1].tolist() == [0] * 7 + [1]
    assert ids.dtype == mask.dtype == torch.long


def test_pad_id_needs_a_pad_distinct_from_eos(tokenizer, pad_tokenizer):
    with pytest.raises(ValueError, match="no pad token"):
        pad_id(tokenizer)
    same = copy.deepcopy(pad_tokenizer)
    same.pad_token = same.eos_token
    with pytest.raises(ValueError, match="must differ from the eos"):
        pad_id(same)
