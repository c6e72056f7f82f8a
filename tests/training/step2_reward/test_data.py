"""Step 2's data: preference pairs sharing their prompt tokens (chatrlhf.training.data.preference), and the collator."""
import pytest

from chatrlhf.training.data.render import encode_prompt, encode_response
from chatrlhf.training.data.tokenize import tokenize_step
from chatrlhf.training.step2_reward.data import REWARD_DATA, PairCollator

LONG = " ".join(f"word{i}" for i in range(200))


def test_reward_pairs_share_prompt_tokens(tokenizer, examples):
    ds = examples([("q", "good", "a much longer bad answer"), (LONG, "good", LONG)])
    out, stats = tokenize_step(ds, REWARD_DATA, tokenizer, max_seq_len=80, max_prompt_len=30)
    assert stats["truncated"] == 1 and stats["eos_cut"] == 1
    prompt = encode_prompt(tokenizer, [{"role": "user", "content": "q"}])
    assert out[0]["chosen_input_ids"] == prompt + encode_response(tokenizer, "good")
    assert out[0]["rejected_input_ids"] == prompt + encode_response(tokenizer, "a much longer bad answer")
    assert out[0]["length"] == len(out[0]["rejected_input_ids"])
    long_prompt = encode_prompt(tokenizer, [{"role": "user", "content": LONG}])[-30:]
    assert out[1]["chosen_input_ids"] == long_prompt + encode_response(tokenizer, "good")  # eos kept
    assert out[1]["rejected_input_ids"] == long_prompt + encode_response(tokenizer, LONG)[:50]  # eos cut
    assert len(out[1]["rejected_input_ids"]) == 80


def test_empty_dataset_and_bad_arguments(tokenizer, examples):
    out, stats = tokenize_step(examples([]), REWARD_DATA, tokenizer)
    assert len(out) == 0 and out.column_names == ["chosen_input_ids", "rejected_input_ids", "prompt_length", "length"]
    assert stats["records"] == 0
    with pytest.raises(ValueError, match="overlength"):
        tokenize_step(examples([]), REWARD_DATA, tokenizer, overlength="cut")


def test_pair_collator_stacks_chosen_then_rejected(pad_tokenizer):
    pid = pad_tokenizer.pad_token_id
    batch = PairCollator(pad_tokenizer)([{"chosen_input_ids": [1, 2, 3], "rejected_input_ids": [1, 2]},
                                         {"chosen_input_ids": [4], "rejected_input_ids": [4, 5, 6, 7]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, pid], [4, pid, pid, pid], [1, 2, pid, pid], [4, 5, 6, 7]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 1, 2, 4]
