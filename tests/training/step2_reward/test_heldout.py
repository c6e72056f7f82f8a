"""The held-out summary's arithmetic on hand-made pairs (the end-to-end run is in test_run.py)."""
import pytest

from chatrlhf.training.step2_reward.heldout import paired, summarize


def _row(i, chosen, rejected, lc, lr):
    return {"set": "s", "index": i, "chosen": chosen, "rejected": rejected, "chosen_length": lc,
            "rejected_length": lr}


ROWS = [_row(0, 1.0, 0.0, 10, 20),   # right; the shorter wins; not close
        _row(1, 0.0, 1.0, 10, 11),   # wrong; shorter wins; close
        _row(2, 2.0, 1.0, 30, 30),   # right; a tie (half); close
        _row(3, 1.0, 0.5, 40, 20)]   # right; the longer was chosen; not close


def test_summary_counts_accuracy_length_baseline_and_close_pairs():
    s = summarize(ROWS)
    assert s["pairs"] == 4 and s["length_controlled_pairs"] == 2
    assert s["accuracy"] == 0.75 and s["shorter_wins"] == pytest.approx(2.5 / 4)
    assert s["accuracy_length_controlled"] == 0.5
    # sample standard error of 1, 0, 1, 1: sqrt(0.25 / 4)
    assert s["accuracy_se"] == pytest.approx((0.25 / 4) ** 0.5)


def test_paired_difference_against_a_baseline():
    flipped = [dict(r, chosen=r["rejected"], rejected=r["chosen"]) for r in ROWS]  # wrong where ROWS is right
    d = paired(ROWS, flipped)
    assert d["accuracy_diff"] == pytest.approx((1 - 1 + 1 + 1) / 4)
    assert d["accuracy_length_controlled_diff"] == 0.0
    with pytest.raises(ValueError, match="other pairs"):
        paired(ROWS, ROWS[:3])
