"""Step 1's data: tokenisation (answer-only labels, the truncation rule) and its collator."""
import pytest
import torch

from chatrlhf.training.data.render import encode_prompt, encode_response
from chatrlhf.training.data.tokenize import IGNORE_INDEX, tokenize_step
from chatrlhf.training.step1_sft.data import SFT_DATA, SFTCollator

LONG = " ".join(f"word{i}" for i in range(200))


@pytest.mark.parametrize("fixture", ["tokenizer", "plain_tokenizer"])
def test_sft_labels_mask_exactly_the_prompt(request, fixture, examples):
    tok = request.getfixturevalue(fixture)
    ds = examples([("What is the capital of France?", "Paris.", None), ("Say hi", "hi there", "no")])
    out, stats = tokenize_step(ds, SFT_DATA, tok, max_seq_len=512)
    assert stats == {"records": 2, "kept": 2, "dropped": 0, "truncated": 0, "eos_cut": 0}
    for row, (p, c, _) in zip(out, [("What is the capital of France?", "Paris.", None), ("Say hi", "hi there", 0)]):
        prompt = encode_prompt(tok, [{"role": "user", "content": p}])
        response = encode_response(tok, c)
        assert row["input_ids"] == prompt + response and row["length"] == len(prompt) + len(response)
        assert row["labels"] == [IGNORE_INDEX] * len(prompt) + response
    out, _ = tokenize_step(ds, SFT_DATA, tok, max_seq_len=512, train_on_prompt=True)
    assert all(row["labels"] == row["input_ids"] for row in out)


def test_sft_truncates_the_prompt_from_the_left(tokenizer, examples):
    prompt = encode_prompt(tokenizer, [{"role": "user", "content": LONG}])
    response = encode_response(tokenizer, "short answer")
    ds = examples([(LONG, "short answer", None), ("q", "a", None)])
    out, stats = tokenize_step(ds, SFT_DATA, tokenizer, max_seq_len=64, max_prompt_len=32)
    assert stats == {"records": 2, "kept": 2, "dropped": 0, "truncated": 1, "eos_cut": 0}
    row = out[0]
    assert len(row["input_ids"]) == 64
    assert row["input_ids"] == prompt[-(64 - len(response)):] + response  # the prompt's END survives, eos kept
    assert row["labels"][-len(response):] == response and set(row["labels"][:-len(response)]) == {IGNORE_INDEX}


def test_sft_truncates_a_long_response_after_the_prompt_floor(tokenizer, examples):
    prompt = encode_prompt(tokenizer, [{"role": "user", "content": LONG}])
    response = encode_response(tokenizer, LONG)
    out, stats = tokenize_step(examples([(LONG, LONG, None)]), SFT_DATA, tokenizer, max_seq_len=64, max_prompt_len=20)
    assert stats["truncated"] == 1 and stats["eos_cut"] == 1
    assert out[0]["input_ids"] == prompt[-20:] + response[:44]
    assert out[0]["input_ids"][-1] != tokenizer.eos_token_id


def test_drop_policy_counts(tokenizer, examples):
    ds = examples([(LONG, "a", None), ("q", "a", None), ("q", LONG, None)])
    out, stats = tokenize_step(ds, SFT_DATA, tokenizer, max_seq_len=64, overlength="drop")
    assert stats == {"records": 3, "kept": 1, "dropped": 2, "truncated": 0, "eos_cut": 0}
    assert len(out) == 1


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


def test_collator_needs_a_pad_token(tokenizer):
    with pytest.raises(ValueError, match="no pad token"):
        SFTCollator(tokenizer)([{"input_ids": [1], "labels": [1]}])
