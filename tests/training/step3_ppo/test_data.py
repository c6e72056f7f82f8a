"""Step 3's data: prompt tokens (the last ones kept), their messages and metadata, and the left-padding collator."""
import copy
import json

import pytest

from chatrlhf.training.data.pipeline import load_data
from chatrlhf.training.data.render import encode_prompt
from chatrlhf.training.data.tokenize import tokenize_step
from chatrlhf.training.step3_ppo.data import PROMPT_DATA, PromptCollator

LONG = " ".join(f"word{i}" for i in range(200))


def test_ppo_prompts_keep_the_last_tokens_or_drop(tokenizer, examples):
    ds = examples([(LONG, "a", None), ("q", "a", None)])
    prompt = encode_prompt(tokenizer, [{"role": "user", "content": LONG}])
    out, stats = tokenize_step(ds, PROMPT_DATA, tokenizer, max_prompt_len=16)
    assert stats == {"records": 2, "kept": 2, "dropped": 0, "truncated": 1, "eos_cut": 0}
    assert out[0]["input_ids"] == prompt[-16:] and out.column_names == ["input_ids", "prompt_messages", "metadata",
                                                                     "length"]
    out, stats = tokenize_step(ds, PROMPT_DATA, tokenizer, max_prompt_len=16, overlength="drop")
    assert (len(out), stats["dropped"]) == (1, 1)


def test_prompt_collator_left_pads(pad_tokenizer):
    pid = pad_tokenizer.pad_token_id
    batch = PromptCollator(pad_tokenizer)([{"input_ids": [1, 2, 3]}, {"input_ids": [4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [pid, pid, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_collator_needs_a_pad_distinct_from_eos(pad_tokenizer):
    same = copy.deepcopy(pad_tokenizer)
    same.pad_token = same.eos_token
    with pytest.raises(ValueError, match="must differ from the eos"):
        PromptCollator(same)([{"input_ids": [1]}])


def test_a_records_extra_fields_reach_the_collator_as_metadata(pad_tokenizer, tmp_path):
    """GSM8K-style records: `answer` (and any field no format reads) travel with the prompt, through the data
    pipeline's split, cache and tokenisation, to each collated row; records without extra fields get {}."""
    path = tmp_path / "task.jsonl"
    records = [{"prompt": f"What is {i} + {i}?", "chosen": f"#### {2 * i}", "answer": str(2 * i), "id": i,
                "tags": ["sum", {"level": i % 3}]} for i in range(12)]
    records.append({"prompt": "plain?", "chosen": "yes"})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    for cache in (None, tmp_path / "cache", tmp_path / "cache"):  # built, then read back from the cache
        data = load_data([str(path)], PROMPT_DATA, pad_tokenizer, data_split="0,0,1", eval_fraction=0.25, seed=3,
                         cache_dir=cache, max_prompt_len=32)
        rows = [data.train[i] for i in range(len(data.train))] + [data.eval[i] for i in range(len(data.eval))]
        assert len(rows) == 13
        batch = PromptCollator(pad_tokenizer)(rows)
        for messages, meta in zip(batch["prompt_messages"], batch["metadata"]):
            question = messages[-1]["content"]
            if question == "plain?":
                assert meta == {}
                continue
            i = int(question.split()[2])
            assert meta == {"answer": str(2 * i), "id": i, "tags": ["sum", {"level": i % 3}]}
