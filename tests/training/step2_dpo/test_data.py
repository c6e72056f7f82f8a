"""DPO's data: step 2's pairs plus their prompt length, and a loss mask on the answer tokens only (left or right
padding alike)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from chatrlhf.training.data.render import encode_prompt, encode_response
from chatrlhf.training.data.tokenize import tokenize_step
from chatrlhf.training.step2_dpo.data import DPO_DATA, DPOCollator, WithRefLogprobs, answer_mask
from chatrlhf.training.step2_dpo.loss import sequence_logprobs, token_logprobs
from chatrlhf.training.step2_dpo.trainer import logits
from chatrlhf.training.step2_reward.data import REWARD_DATA
from chatrlhf.utils.models import load_tokenizer

LONG = " ".join(f"word{i}" for i in range(200))
ROWS = [("q", "good", "a much longer bad answer"), (LONG, "good", LONG), ("what is two plus two?", "four", "five")]


def test_pairs_are_step_2s_plus_the_prompt_length(tokenizer, examples):
    ours, ours_stats = tokenize_step(examples(ROWS), DPO_DATA, tokenizer, max_seq_len=80, max_prompt_len=30)
    theirs, their_stats = tokenize_step(examples(ROWS), REWARD_DATA, tokenizer, max_seq_len=80, max_prompt_len=30)
    assert ours_stats == their_stats and ours_stats["truncated"] == 1
    # Step 2 carries the prompt length too (for its length baselines): the same rows, column for column.
    assert ours.column_names == theirs.column_names == ["chosen_input_ids", "rejected_input_ids", "prompt_length",
                                                        "length"]
    assert list(ours) == list(theirs)
    prompt = encode_prompt(tokenizer, [{"role": "user", "content": "q"}])
    assert ours[0]["prompt_length"] == len(prompt)
    assert ours[1]["prompt_length"] == 30  # the kept (truncated) prompt
    assert ours[1]["chosen_input_ids"][30:] == encode_response(tokenizer, "good")


def _features(tokenizer, examples):
    out, _ = tokenize_step(examples(ROWS[::2]), DPO_DATA, tokenizer, max_seq_len=80)
    out.set_format("torch", columns=DPO_DATA.tensor_columns)
    return [out[i] for i in range(len(out))]


@pytest.mark.parametrize("side", ["right", "left"])
def test_the_mask_covers_the_answer_tokens_and_eos_only(side, pad_tokenizer, examples):
    features = _features(pad_tokenizer, examples)
    batch = DPOCollator(pad_tokenizer, padding_side=side)(features)
    ids, mask, action = batch["input_ids"], batch["attention_mask"], batch["action_mask"]
    assert ids.shape[0] == 4 and action.shape == ids.shape
    answers = [r for _, r, _ in ROWS[::2]] + [r for _, _, r in ROWS[::2]]
    for row, answer in enumerate(answers):
        assert ids[row][action[row].bool()].tolist() == encode_response(pad_tokenizer, answer)  # ends with eos
        assert not (action[row].bool() & ~mask[row].bool()).any()  # never a pad position
    pad_col = 0 if side == "left" else -1
    assert mask[:, pad_col].tolist().count(0) >= 1


def test_answer_mask_by_hand():
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    assert answer_mask(mask, torch.tensor([2, 1])).tolist() == [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]


def test_left_and_right_padding_give_the_same_answer_logprobs(tiny_model_dir, examples):
    path = tiny_model_dir("llama")
    tok = load_tokenizer(str(path))
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    features = _features(tok, examples)
    out = {}
    with torch.no_grad():
        for side in ("right", "left"):
            batch = DPOCollator(tok, padding_side=side)(features)
            out[side] = sequence_logprobs(token_logprobs(logits(model, batch), batch["input_ids"]),
                                          batch["action_mask"])
        # each answer alone, no padding at all
        alone = []
        for f in features:
            for key in ("chosen_input_ids", "rejected_input_ids"):
                ids = f[key].unsqueeze(0)
                lp = token_logprobs(model(input_ids=ids).logits, ids)[0, int(f["prompt_length"]) - 1:].sum()
                alone.append(lp)
    alone = torch.stack(alone).view(len(features), 2).T.reshape(-1)  # chosen rows first, then rejected
    torch.testing.assert_close(out["right"], alone, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out["left"], alone, atol=1e-4, rtol=1e-5)


def test_precomputed_reference_logprobs_travel_with_their_pairs(pad_tokenizer, examples):
    features = _features(pad_tokenizer, examples)
    ref = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    data = WithRefLogprobs(features, ref)
    batch = DPOCollator(pad_tokenizer)([data[0], data[1]])
    assert batch["ref_logprobs"].tolist() == [-1.0, -3.0, -2.0, -4.0]  # chosen rows, then rejected rows
    with pytest.raises(ValueError, match="precomputed"):
        WithRefLogprobs(features, ref[:1])
