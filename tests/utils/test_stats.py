import math

from chatrlhf.utils.stats import mean_se


def test_mean_and_its_standard_error_by_hand():
    mean, se = mean_se([1, 0, 1, 1])
    assert mean == 0.75 and math.isclose(se, math.sqrt(0.25 / 4))  # sample variance 0.25
    assert mean_se([2.0])[0] == 2.0 and math.isnan(mean_se([2.0])[1])
    assert all(math.isnan(v) for v in mean_se([]))
