"""Verifiable rewards (chatrlhf.training.step3_ppo.verifiable), how reward functions are called (metadata or not,
several summed), and the bundled synthetic arithmetic task."""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import torch

from chatrlhf.training.data.sources import read_records
from chatrlhf.training.step3_ppo import arithmetic
from chatrlhf.training.step3_ppo.rewards import CombinedReward, FunctionReward, RewardInputs, takes_metadata
from chatrlhf.training.step3_ppo.verifiable import final_number, final_number_match, number_format

BUNDLED = Path(arithmetic.__file__).resolve().parents[1] / "data" / "bundled" / "arithmetic_word_problems.jsonl.gz"
GSM8K = Path(__file__).resolve().parents[4] / "shared" / "data" / "gsm8k" / "train.jsonl"


@pytest.mark.parametrize("text, number", [
    ("so 48 + 24 = 72.\n#### 72", 72.0),
    ("#### 7\n\nThe answer is 8.", 7.0),            # the marked answer wins over a later number
    ("She earned $1,234.50 in total.", 1234.5),     # else the last number; $ and thousands separators
    ("It drops to -3 degrees", -3.0),
    ("#### -12", -12.0),
    ("no number here", None),
    ("", None),
])
def test_final_number(text, number):
    assert final_number(text) == number


def test_final_number_match_reads_each_examples_answer_from_its_metadata():
    solution = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"  # GSM8K's answer field, whole
    responses = ["48 + 24 = 72 clips.\n#### 72", "The answer is 72", "#### 71", "I am not sure.", "#### 72.0"]
    metadata = [{"answer": solution}, {"answer": "72"}, {"answer": "72"}, {"answer": "72"}, {"answer": 72}]
    assert final_number_match([""] * 5, responses, metadata) == [1.0, 1.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="example 1 of the batch has no 'answer' field"):
        final_number_match(["", ""], ["1", "2"], [{"answer": "1"}, {"id": 3}])


def test_number_format_wants_the_marked_number_at_the_end():
    assert number_format([""] * 4, ["so it is 5.\n#### 5", "#### 5 apples", "5", "#### 1,200  "]) == [1.0, 0.0, 0.0,
                                                                                                        1.0]


def test_gsm8k_answers_score_themselves_correct():
    """The GSM8K-style check on real GSM8K records (MIT; /work/shared/data/gsm8k): each reference solution is
    a correct answer to its own problem and a wrong one to the next problem."""
    if not GSM8K.is_file():
        pytest.skip(f"{GSM8K} not found")
    records = [json.loads(line) for _, line in zip(range(200), GSM8K.open())]
    solutions = [r["answer"] for r in records]
    assert final_number_match([""] * 200, solutions, records) == [1.0] * 200
    shifted = solutions[1:] + solutions[:1]
    assert sum(final_number_match([""] * 200, shifted, records)) < 10


def test_reward_functions_get_metadata_only_when_their_signature_asks():
    def plain(prompts, responses):
        return [1.0] * len(responses)

    def with_metadata(prompts, responses, metadata):
        return [float(m["answer"]) for m in metadata]

    def by_keyword(prompts, responses, **kwargs):
        return [2.0] * len(responses)

    def keyword_metadata(prompts, responses, *, metadata):
        return [3.0] * len(responses)

    assert [takes_metadata(f) for f in (plain, with_metadata, by_keyword, keyword_metadata, len)] == [
        False, True, False, True, False]
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 9]])
    tok = type("Tok", (), {"batch_decode": lambda self, x, **kw: ["p"] * len(x),
                           "decode": lambda self, x, **kw: "r"})()
    batch = RewardInputs(sequences=ids, attention_mask=torch.ones_like(ids), action_mask=torch.ones(2, 2),
                         has_eos=torch.tensor([True, True]), prompt_len=2, prompt_messages=None, tokenizer=tok,
                         metadata=[{"answer": "4"}, {"answer": "5"}])
    assert FunctionReward(plain)(batch).tolist() == [1.0, 1.0]
    assert FunctionReward(with_metadata)(batch).tolist() == [4.0, 5.0]
    assert FunctionReward(keyword_metadata)(batch).tolist() == [3.0, 3.0]
    combined = CombinedReward([("a", 0.5, FunctionReward(with_metadata)), ("b", 2.0, FunctionReward(plain))])
    total, parts = combined.parts(batch)
    assert total.tolist() == [4.0, 4.5] and parts["a"].tolist() == [4.0, 5.0] and parts["b"].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="share a name"):
        CombinedReward([("a", 1.0, FunctionReward(plain)), ("a", 1.0, FunctionReward(plain))])


def test_arithmetic_problems_are_reproducible_and_their_answers_right():
    problems = arithmetic.problems(500, seed=3)
    assert problems == arithmetic.problems(500, seed=3) and problems != arithmetic.problems(500, seed=4)
    assert len({p["prompt"] for p in problems}) == 500
    for p in problems:
        assert final_number(p["chosen"]) == float(p["answer"]) > 0
        assert p["prompt"].endswith(arithmetic.INSTRUCTION)
    # The worked answer's arithmetic, checked independently of the generator.
    rng = random.Random(0)
    for p in rng.sample(problems, 50):
        expression = p["chosen"].split("=")[0].split(" has ")[-1].split(" buys ")[-1].split(" gets ")[-1]
        assert eval(expression.replace("x", "*").replace("/", "//")) == int(p["answer"])  # noqa: S307


def test_the_bundled_task_is_the_generators_output(tmp_path):
    written = arithmetic.write(tmp_path / "p.jsonl.gz", 3000, seed=0)
    assert gzip.decompress(written.read_bytes()) == gzip.decompress(BUNDLED.read_bytes())
    records = list(read_records(BUNDLED))
    assert len(records) == 3000 and set(records[0]) == {"prompt", "chosen", "answer"}
