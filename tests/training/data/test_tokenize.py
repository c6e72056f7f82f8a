import pytest
from datasets import Dataset

from chatrlhf.training.data.render import encode_prompt, encode_response
from chatrlhf.training.data.sources import example_features
from chatrlhf.training.data.tokenize import IGNORE_INDEX, budget, tokenize_phase

LONG = " ".join(f"word{i}" for i in range(200))


def examples(rows):
    """rows of (prompt text, chosen, rejected) -> a normalised Dataset."""
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p, _, _ in rows],
                              "chosen": [c for _, c, _ in rows], "rejected": [r for _, _, r in rows]},
                             features=example_features())


def test_budget():
    assert budget(10, 5, 20, 8) == (10, 5)  # fits
    assert budget(30, 5, 20, 8) == (15, 5)  # prompt cut from the left, response whole
    assert budget(30, 40, 20, 8) == (8, 12)  # prompt floor = min(30, 8, 10), response cut
    assert budget(3, 40, 20, 8) == (3, 17)  # short prompt kept whole
    assert budget(30, 40, 20, 100) == (10, 10)  # floor capped at max_seq_len // 2


@pytest.mark.parametrize("fixture", ["tokenizer", "plain_tokenizer"])
def test_sft_labels_mask_exactly_the_prompt(request, fixture):
    tok = request.getfixturevalue(fixture)
    ds = examples([("What is the capital of France?", "Paris.", None), ("Say hi", "hi there", "no")])
    out, stats = tokenize_phase(ds, 1, tok, max_seq_len=512)
    assert stats == {"records": 2, "kept": 2, "dropped": 0, "truncated": 0, "eos_cut": 0}
    for row, (p, c, _) in zip(out, [("What is the capital of France?", "Paris.", None), ("Say hi", "hi there", 0)]):
        prompt = encode_prompt(tok, [{"role": "user", "content": p}])
        response = encode_response(tok, c)
        assert row["input_ids"] == prompt + response and row["length"] == len(prompt) + len(response)
        assert row["labels"] == [IGNORE_INDEX] * len(prompt) + response
    out, _ = tokenize_phase(ds, 1, tok, max_seq_len=512, train_on_prompt=True)
    assert all(row["labels"] == row["input_ids"] for row in out)


def test_sft_truncates_the_prompt_from_the_left(tokenizer):
    prompt = encode_prompt(tokenizer, [{"role": "user", "content": LONG}])
    response = encode_response(tokenizer, "short answer")
    ds = examples([(LONG, "short answer", None), ("q", "a", None)])
    out, stats = tokenize_phase(ds, 1, tokenizer, max_seq_len=64, max_prompt_len=32)
    assert stats == {"records": 2, "kept": 2, "dropped": 0, "truncated": 1, "eos_cut": 0}
    row = out[0]
    assert len(row["input_ids"]) == 64
    assert row["input_ids"] == prompt[-(64 - len(response)):] + response  # the prompt's END survives, eos kept
    assert row["labels"][-len(response):] == response and set(row["labels"][:-len(response)]) == {IGNORE_INDEX}


def test_sft_truncates_a_long_response_after_the_prompt_floor(tokenizer):
    prompt = encode_prompt(tokenizer, [{"role": "user", "content": LONG}])
    response = encode_response(tokenizer, LONG)
    out, stats = tokenize_phase(examples([(LONG, LONG, None)]), 1, tokenizer, max_seq_len=64, max_prompt_len=20)
    assert stats["truncated"] == 1 and stats["eos_cut"] == 1
    assert out[0]["input_ids"] == prompt[-20:] + response[:44]
    assert out[0]["input_ids"][-1] != tokenizer.eos_token_id


def test_drop_policy_counts(tokenizer):
    ds = examples([(LONG, "a", None), ("q", "a", None), ("q", LONG, None)])
    out, stats = tokenize_phase(ds, 1, tokenizer, max_seq_len=64, overlength="drop")
    assert stats == {"records": 3, "kept": 1, "dropped": 2, "truncated": 0, "eos_cut": 0}
    assert len(out) == 1


def test_reward_pairs_share_prompt_tokens(tokenizer):
    ds = examples([("q", "good", "a much longer bad answer"), (LONG, "good", LONG)])
    out, stats = tokenize_phase(ds, 2, tokenizer, max_seq_len=80, max_prompt_len=30)
    assert stats["truncated"] == 1 and stats["eos_cut"] == 1
    prompt = encode_prompt(tokenizer, [{"role": "user", "content": "q"}])
    assert out[0]["chosen_input_ids"] == prompt + encode_response(tokenizer, "good")
    assert out[0]["rejected_input_ids"] == prompt + encode_response(tokenizer, "a much longer bad answer")
    assert out[0]["length"] == len(out[0]["rejected_input_ids"])
    long_prompt = encode_prompt(tokenizer, [{"role": "user", "content": LONG}])[-30:]
    assert out[1]["chosen_input_ids"] == long_prompt + encode_response(tokenizer, "good")  # eos kept
    assert out[1]["rejected_input_ids"] == long_prompt + encode_response(tokenizer, LONG)[:50]  # eos cut
    assert len(out[1]["rejected_input_ids"]) == 80


def test_ppo_prompts_keep_the_last_tokens_or_drop(tokenizer):
    ds = examples([(LONG, "a", None), ("q", "a", None)])
    prompt = encode_prompt(tokenizer, [{"role": "user", "content": LONG}])
    out, stats = tokenize_phase(ds, 3, tokenizer, max_prompt_len=16)
    assert stats == {"records": 2, "kept": 2, "dropped": 0, "truncated": 1, "eos_cut": 0}
    assert out[0]["input_ids"] == prompt[-16:] and out.column_names == ["input_ids", "prompt_messages", "length"]
    out, stats = tokenize_phase(ds, 3, tokenizer, max_prompt_len=16, overlength="drop")
    assert (len(out), stats["dropped"]) == (1, 1)


def test_empty_dataset_and_bad_arguments(tokenizer):
    out, stats = tokenize_phase(examples([]), 2, tokenizer)
    assert len(out) == 0 and out.column_names == ["chosen_input_ids", "rejected_input_ids", "length"]
    assert stats["records"] == 0
    with pytest.raises(ValueError, match="overlength"):
        tokenize_phase(examples([]), 1, tokenizer, overlength="cut")
