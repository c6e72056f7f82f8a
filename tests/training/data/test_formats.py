import json
import logging

import pytest

from chatrlhf.training.data import formats
from chatrlhf.training.data.formats import DataFormatError, detect_format, normalize, parse_transcript, register_format


def one(record, data_format=None):
    """(the example without its metadata column, the format); see test_fields_no_format_reads_are_metadata."""
    columns, stats = normalize([record], "test.jsonl", data_format)
    assert stats["records"] == 1 and stats["skipped_malformed"] == 0
    return {k: v[0] for k, v in columns.items() if k != "metadata"}, stats["format"]


def test_fields_no_format_reads_are_metadata():
    columns, _ = normalize([{"prompt": "2 + 2?", "chosen": "4", "answer": "4", "id": 7},
                            {"prompt": "q", "chosen": "a", "rejected": "b"}], "test.jsonl")
    assert [json.loads(m) if m else m for m in columns["metadata"]] == [{"answer": "4", "id": 7}, None]


def test_hh_transcript_split_at_last_assistant():
    prefix = "\n\nHuman: hi\n\nAssistant: hello, what is up?\n\nHuman: tell me a joke"
    ex, fmt = one({"chosen": prefix + "\n\nAssistant: A joke.", "rejected": prefix + "\n\nAssistant: No."})
    assert fmt == "hh_rlhf"  # the earlier Assistant turn stays in the prompt
    assert ex == {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello, what is up?"},
                             {"role": "user", "content": "tell me a joke"}],
                  "chosen": "A joke.", "rejected": "No."}


def test_hh_last_assistant_inside_answer_text_is_the_split_point():
    # An answer that itself contains "\n\nAssistant:" would put the split there: both sides must still agree.
    p = "\n\nHuman: q"
    with pytest.raises(DataFormatError, match=r"test.jsonl: record 0: .*differ"):
        one({"chosen": p + "\n\nAssistant: a\n\nAssistant: b", "rejected": p + "\n\nAssistant: c"})


def test_hh_mismatched_prefixes_and_empty_answer_are_malformed():
    with pytest.raises(DataFormatError, match=r"test.jsonl: record 0: chosen and rejected transcripts differ"):
        one({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"})
    with pytest.raises(DataFormatError, match="chosen response is empty"):
        one({"chosen": "\n\nHuman: a\n\nAssistant: ", "rejected": "\n\nHuman: a\n\nAssistant: y"})


def test_parse_transcript_merges_repeated_speakers_and_drops_trailing_assistant():
    msgs = parse_transcript("\n\nHuman: a\n\nHuman: b\n\nAssistant: c\n\nHuman: d\n\nAssistant:")
    assert msgs == [{"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c"},
                    {"role": "user", "content": "d"}]


def test_rm_static():
    ex, fmt = one({"prompt": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant:",
                   "response": " 6.", "chosen": " 6.", "rejected": " 7."})
    assert fmt == "rm_static"
    assert ex == {"prompt": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
                             {"role": "user", "content": "And 3+3?"}], "chosen": "6.", "rejected": "7."}


@pytest.mark.parametrize("prompt, expected", [
    ("What is up?", [{"role": "user", "content": "What is up?"}]),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]),
    # DeepSpeed-Chat's local format keeps Human/Assistant text in the prompt string.
    (" Human: Hi there Assistant:", [{"role": "user", "content": "Hi there"}]),
    ("Human: Hi\n\nAssistant: hey\n\nHuman: more\n\nAssistant:",
     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "hey"}, {"role": "user", "content": "more"}]),
    ("About Human: Assistant: dynamics.", [{"role": "user", "content": "About Human: Assistant: dynamics."}]),
    ("\n\nHuman: Hi\n\nAssistant: hey\n\nHuman: more\n\nAssistant:",
     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "hey"}, {"role": "user", "content": "more"}]),
])
def test_prompt_chosen_rejected(prompt, expected):
    ex, fmt = one({"prompt": prompt, "chosen": "yes", "rejected": "no"})
    assert fmt == "prompt_chosen_rejected"
    assert ex["prompt"] == expected
    assert ex["chosen"] == "yes" and ex["rejected"] == "no"


def test_prompt_chosen_without_rejected_is_sft_data():
    ex, _ = one({"prompt": "q", "chosen": "a"})
    assert ex["rejected"] is None
    ex, _ = one({"prompt": "q", "chosen": "a", "rejected": None})
    assert ex["rejected"] is None


def test_prompt_chosen_with_conversation_answers():
    ex, _ = one({"prompt": "q", "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                 "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]})
    assert (ex["chosen"], ex["rejected"]) == ("a", "b")


def test_alpaca_with_and_without_input():
    ex, fmt = one({"instruction": "Translate.", "input": "bonjour", "output": "hello"})
    assert fmt == "alpaca"
    assert ex == {"prompt": [{"role": "user", "content": "Translate.\n\nbonjour"}], "chosen": "hello", "rejected": None}
    ex, _ = one({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert ex["prompt"] == [{"role": "user", "content": "Say hi."}]
    ex, _ = one({"instruction": "Say hi.", "output": "hi", "system": "S", "history": [["q", "a"]]})
    assert [m["role"] for m in ex["prompt"]] == ["system", "user", "assistant", "user"]


def test_messages_and_sharegpt():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"}]
    ex, fmt = one({"messages": msgs})
    assert fmt == "messages"
    assert ex == {"prompt": msgs[:-1], "chosen": "a2", "rejected": None}
    conv = [{"from": "system", "value": "S"}, {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
            {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]
    ex2, fmt = one({"conversations": conv, "id": "x"})
    assert fmt == "sharegpt" and ex2 == ex


def test_messages_must_end_with_assistant_and_prompt_with_user():
    with pytest.raises(DataFormatError, match="must end with an assistant turn"):
        one({"messages": [{"role": "user", "content": "q"}]})
    with pytest.raises(DataFormatError, match="unknown role 'robot'"):
        one({"conversations": [{"from": "robot", "value": "q"}, {"from": "gpt", "value": "a"}]})


def test_preference_messages():
    q = [{"role": "user", "content": "q"}]
    ex, fmt = one({"chosen": q + [{"role": "assistant", "content": "a"}],
                   "rejected": q + [{"role": "assistant", "content": "b"}]})
    assert fmt == "preference_messages" and ex == {"prompt": q, "chosen": "a", "rejected": "b"}


def test_forced_format_and_unknown_layout():
    record = {"instruction": "i", "output": "o", "prompt": "p", "chosen": "c"}
    assert detect_format(record, "f") == "prompt_chosen_rejected"
    ex, fmt = one(record, data_format="alpaca")
    assert fmt == "alpaca" and ex["chosen"] == "o"
    with pytest.raises(DataFormatError, match=r"f: record 0: keys \['a', 'b'\] match no data format"):
        detect_format({"a": 1, "b": 2}, "f")
    with pytest.raises(DataFormatError, match="unknown data format 'nope'"):
        normalize([record], "f", "nope")


def test_register_format_adds_a_format_without_touching_dispatch():
    @register_format("qa_test", detect=lambda r: {"question", "answer"} <= r.keys())
    def _qa(record):
        return formats.example([formats.user(record["question"])], record["answer"])

    try:
        ex, fmt = one({"question": "q", "answer": "a"})
        assert fmt == "qa_test" and ex == {"prompt": [{"role": "user", "content": "q"}], "chosen": "a",
                                           "rejected": None}
        with pytest.raises(ValueError, match="already registered"):
            register_format("qa_test", detect=lambda r: False)(_qa)
    finally:
        del formats.FORMATS["qa_test"]


@pytest.mark.parametrize("bad, what", [
    ({"prompt": "q"}, "missing field 'chosen'"),
    ({"prompt": "q", "chosen": 3}, "field 'chosen' must be a string"),
    ({"prompt": "q", "chosen": "   "}, "field 'chosen' is empty"),
    ({"prompt": "", "chosen": "a"}, "field 'prompt' is empty"),
    ({"prompt": [{"role": "user"}], "chosen": "a"}, "prompt\\[0\\] must be a dict"),
    ("not a dict", "expected a JSON object"),
])
def test_malformed_record_names_source_and_record(bad, what):
    records = [{"prompt": "q", "chosen": "a"}, {"prompt": "q2", "chosen": "a2"}, bad]
    with pytest.raises(DataFormatError, match=rf"^data/x\.jsonl: record 2: {what}"):
        normalize(records, "data/x.jsonl")


def test_skip_malformed_counts_and_warns(caplog):
    records = [{"prompt": "q", "chosen": "a"}, {"prompt": "q", "chosen": ""}, {"prompt": "q2", "chosen": "a2"},
               {"prompt": 5, "chosen": "a"}]
    with caplog.at_level(logging.WARNING):
        columns, stats = normalize(records, "x.jsonl", skip_malformed=True)
    assert columns["chosen"] == ["a", "a2"]
    assert stats == {"format": "prompt_chosen_rejected", "records": 4, "skipped_malformed": 2}
    assert "x.jsonl: skipped 2 malformed of 4 records" in caplog.text


def test_skip_malformed_detects_on_the_first_usable_record():
    records = [{"prompt": "only a prompt"}, {"instruction": "i", "output": "o"}, {"instruction": "j", "output": ""}]
    with pytest.raises(DataFormatError, match=r"^x: record 0: keys \['prompt'\] match no data format"):
        normalize(records, "x")
    columns, stats = normalize(records, "x", skip_malformed=True)
    assert stats == {"format": "alpaca", "records": 3, "skipped_malformed": 2} and columns["chosen"] == ["o"]


def test_hints_name_the_flags():
    with pytest.raises(DataFormatError, match=r"record 1: field 'chosen' is empty \(format prompt_chosen_rejected; "
                                              r"pass --skip_malformed to skip such records\)$"):
        normalize([{"prompt": "q", "chosen": "a"}, {"prompt": "q", "chosen": ""}], "x")
    with pytest.raises(DataFormatError, match=r"record 0: keys \['a'\] match no data format .*pass --data_format"):
        normalize([{"a": 1}], "x")


def test_located_records_are_named_by_their_location_and_unreadable_ones_are_malformed(caplog):
    from chatrlhf.training.data.formats import Located, Unreadable

    def records():
        return Located([("line 1", {"prompt": "q", "chosen": "a"}), ("line 2", Unreadable("invalid JSON (oops)")),
                        ("line 4", {"prompt": "q", "chosen": ""})])

    with pytest.raises(DataFormatError, match=r"^f\.jsonl: line 2: invalid JSON \(oops\) .*--skip_malformed"):
        normalize(records(), "f.jsonl")
    with caplog.at_level(logging.INFO):
        columns, stats = normalize(records(), "f.jsonl", skip_malformed=True)
    assert columns["chosen"] == ["a"] and stats == {"format": "prompt_chosen_rejected", "records": 3,
                                                    "skipped_malformed": 2}
    assert "skipping malformed line 2: invalid JSON (oops)" in caplog.text
    assert "skipping malformed line 4: field 'chosen' is empty" in caplog.text
    # An unreadable first record does not decide the format: the first usable one does.
    columns, stats = normalize(Located([("line 1", Unreadable("invalid JSON")),
                                        ("line 2", {"instruction": "i", "output": "o"})]), "f", skip_malformed=True)
    assert stats["format"] == "alpaca" and columns["chosen"] == ["o"]


def test_require_pairs_makes_a_missing_rejected_malformed():
    records = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q2", "chosen": "a2"},
               {"prompt": "q3", "chosen": "a3", "rejected": None}]
    columns, _ = normalize(records, "p.jsonl")
    assert columns["rejected"] == ["b", None, None]  # by default: single-response examples
    with pytest.raises(DataFormatError, match=r"^p\.jsonl: record 1: missing field 'rejected' .*--skip_malformed"):
        normalize(records, "p.jsonl", require_pairs=True)
    columns, stats = normalize(records, "p.jsonl", skip_malformed=True, require_pairs=True)
    assert columns["rejected"] == ["b"] and stats["skipped_malformed"] == 2
