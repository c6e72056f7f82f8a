"""Two step-3 evaluations compared answer by answer: the paired gain and the gain at equal length, on
hand-computed numbers and on a policy that only learned to be shorter for a reward model that likes short."""
from __future__ import annotations

import json

import numpy as np
import pytest

from chatrlhf.training.step3_ppo import compare


def test_length_adjusted_against_hand_computed_least_squares():
    g, se, slope = compare.length_adjusted(np.array([1.0, 2, 3, 4]), np.array([0.0, 1, 2, 3]))
    assert (g, slope) == pytest.approx((1.0, 1.0)) and se == pytest.approx(0.0, abs=1e-12)
    # Two groups at length differences 0 and 1 with means 2 and 3, residuals +-1: sigma^2 = 4 / 2, and
    # (X'X)^-1 [0, 0] = 0.5, so the intercept's standard error is 1.
    g, se, slope = compare.length_adjusted(np.array([1.0, 3, 2, 4]), np.array([0.0, 0, 1, 1]))
    assert (g, se, slope) == pytest.approx((2.0, 1.0, 1.0))
    # No length variation: the plain paired mean and its standard error.
    g, se, slope = compare.length_adjusted(np.array([1.0, 3]), np.array([2.0, 2]))
    assert (g, se, slope) == pytest.approx((2.0, 1.0, 0.0))


def _write(folder, step, rows_by_rank):
    (folder / "eval_answers").mkdir(parents=True, exist_ok=True)
    for rank, rows in rows_by_rank.items():
        lines = [json.dumps({"row": i, "prompt": f"q{rank}.{i}", **r}) for i, r in enumerate(rows)]
        (folder / "eval_answers" / f"step{step}-rank{rank}.jsonl").write_text("\n".join(lines) + "\n")


def test_a_policy_that_only_got_shorter_gains_nothing_at_equal_length(tmp_path):
    rng = np.random.default_rng(0)
    before, after = {0: [], 1: []}, {0: [], 1: []}
    for rank in (0, 1):
        for _ in range(50):
            quality, length = rng.normal(), int(rng.integers(30, 60))
            shorter = length - int(rng.integers(5, 16))
            score = lambda n: quality - 0.1 * n  # noqa: E731  the reward model likes short answers, nothing else
            before[rank].append({"answer": "a", "score": score(length), "length": length, "eos": False, "kl": 0.0})
            after[rank].append({"answer": "b", "score": score(shorter), "length": shorter, "eos": True, "kl": 1.0})
    _write(tmp_path, 0, before)
    _write(tmp_path, 10, after)
    assert compare.eval_steps(tmp_path) == [0, 10]
    c = compare.compare(*compare.first_and_last(tmp_path))
    assert c.n == 100 and c.eos == (0.0, 1.0) and c.both_ended == 0
    assert c.gain > 0.5 and c.z > 10  # a large, "significant" gain in score...
    assert c.gain_at_equal_length == pytest.approx(0.0, abs=1e-9)  # ...that is all length
    assert c.score_per_token == pytest.approx(-0.1)
    assert c.length_change < -0.15
    compare.plot_score_vs_length(*compare.first_and_last(tmp_path), tmp_path / "p.png", cap=64)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_only_prompts_both_evaluations_answered_are_compared(tmp_path):
    row = {"answer": "a", "score": 1.0, "length": 3, "eos": True, "kl": 0.0}
    _write(tmp_path, 0, {0: [row, row, row]})
    _write(tmp_path, 4, {0: [dict(row, score=2.0), dict(row, score=4.0)]})
    c = compare.compare(*compare.first_and_last(tmp_path))
    assert c.n == 2 and c.gain == pytest.approx(2.0)
    assert c.both_ended == 2 and c.gain_both_ended == pytest.approx(2.0) and c.gain_both_ended_se == pytest.approx(1.0)
    assert compare.first_and_last(tmp_path / "none") is None
