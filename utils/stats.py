"""Small statistics the evaluations report with their figures. numpy only."""
from __future__ import annotations

import math

import numpy as np


def mean_se(values) -> tuple[float, float]:
    """(mean, standard error of the mean: sample std / sqrt(n)) of a 1-D sequence; nan where undefined (no values
    for the mean, fewer than two for the error)."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    return mean, float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
