"""The shared truncation budget (steps' own tokenisation is tested in their packages)."""
from chatrlhf.training.data.tokenize import budget


def test_budget():
    assert budget(10, 5, 20, 8) == (10, 5)  # fits
    assert budget(30, 5, 20, 8) == (15, 5)  # prompt cut from the left, response whole
    assert budget(30, 40, 20, 8) == (8, 12)  # prompt floor = min(30, 8, 10), response cut
    assert budget(3, 40, 20, 8) == (3, 17)  # short prompt kept whole
    assert budget(30, 40, 20, 100) == (10, 10)  # floor capped at max_seq_len // 2
