"""Step 2's evaluation sets the reward model against answer length: the shorter-wins baseline on the same pairs and
the accuracy on pairs of about equal length."""
from __future__ import annotations

import torch

from chatrlhf.training.step2_reward import trainer
from chatrlhf.training.step2_reward.data import PairCollator


class _Tok:
    pad_token_id = 0
    eos_token_id = 1


def _pair(prompt: int, chosen: int, rejected: int) -> dict:
    """Token rows: `prompt` prompt tokens, then answers of `chosen` / `rejected` tokens (eos included)."""
    return {"chosen_input_ids": [5] * prompt + [7] * chosen, "rejected_input_ids": [5] * prompt + [8] * rejected,
            "prompt_length": prompt}


# (prompt, chosen, rejected) answer lengths: 3 pairs where the chosen answer is shorter, 1 longer, 1 tie,
# and 3 of them within 20% of each other's length (10 vs 11, 20 vs 20, 30 vs 27).
PAIRS = [_pair(4, 10, 11), _pair(9, 5, 20), _pair(2, 20, 20), _pair(6, 3, 9), _pair(3, 30, 27)]


def _evaluate(monkeypatch, score_of_length):
    """evaluate() with a reward model that scores an answer by its length alone."""
    def pair_scores(engine, batch):
        scores = score_of_length(batch["answer_lengths"].double())
        return scores.chunk(2)

    monkeypatch.setattr(trainer, "pair_scores", pair_scores)

    class Engine:
        device = torch.device("cpu")

        def eval(self):
            pass

        def train(self):
            pass

    return trainer.evaluate(Engine(), PAIRS, PairCollator(_Tok()), batch_size=2, max_batches=10)


def test_answer_lengths_exclude_the_prompt():
    batch = PairCollator(_Tok())(PAIRS[:2])
    assert batch["answer_lengths"].tolist() == [10, 5, 11, 20]


def test_a_length_only_reward_model_scores_its_baseline_and_nothing_more(monkeypatch):
    m = _evaluate(monkeypatch, lambda length: -length)  # prefers the shorter answer, and nothing else
    assert m["eval/pairs"] == 5
    assert m["eval/shorter_wins"] == (3 + 0.5) / 5  # the tie counts half
    assert m["eval/accuracy"] == 3 / 5              # a tie is not a win for the model (chosen > rejected)
    assert m["eval/length_controlled_pairs"] == 3
    # Within the length-controlled pairs it is right on 10 vs 11 only (the tie is a loss, 30 vs 27 is wrong).
    assert m["eval/accuracy_length_controlled"] == 1 / 3


def test_a_longer_wins_model_fails_where_shorter_wins(monkeypatch):
    m = _evaluate(monkeypatch, lambda length: length)
    assert m["eval/accuracy"] == 1 / 5 and m["eval/shorter_wins"] == 3.5 / 5
    assert m["eval/accuracy_length_controlled"] == 1 / 3  # 30 vs 27
