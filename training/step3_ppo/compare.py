"""Two held-out evaluations of step 3 compared answer by answer (the SFT model's at step 0, the RLHF model's at
the end): the paired score gain with its standard error, and the gain at equal answer length, since a reward model
that prefers some length can make a policy look better by changing length alone.

The evaluation writes every answer to <output_dir>/eval_answers/step<N>-rank<R>.jsonl; both evaluations see the
same prompts in the same order, so (rank, row) pairs them. Pure Python and numpy: no torch, no deepspeed.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chatrlhf.utils.stats import mean_se


def eval_steps(output_dir) -> list[int]:
    """The steps at which answers were written, in order."""
    folder = Path(output_dir) / "eval_answers"
    steps = {int(p.name[4:].split("-rank")[0]) for p in folder.glob("step*-rank*.jsonl")} if folder.is_dir() else set()
    return sorted(steps)


def read_answers(output_dir, step: int) -> dict[tuple[int, int], dict]:
    """{(rank, row): answer record} of the evaluation at `step`, every rank's."""
    out = {}
    for path in sorted((Path(output_dir) / "eval_answers").glob(f"step{step}-rank*.jsonl")):
        rank = int(path.stem.split("-rank")[1])
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                out[(rank, int(record["row"]))] = record
    return out


@dataclass
class Comparison:
    """Before (SFT) against after (RLHF) on the same n held-out prompts."""
    n: int
    score: tuple[float, float]          # mean reward-model score before, after
    length: tuple[float, float]         # mean answer length (tokens)
    eos: tuple[float, float]            # share of answers that end with EOS (not cut at the cap)
    gain: float                         # mean of after - before, prompt by prompt
    gain_se: float                      # its standard error
    gain_at_equal_length: float         # the gain with the length difference regressed out (see `length_adjusted`)
    gain_at_equal_length_se: float
    score_per_token: float              # the slope of score on length in those pairs: what a token more is worth
    both_ended: int                     # prompts whose two answers both ended with EOS
    gain_both_ended: float              # the paired gain on those alone: a cut answer's score (read at a token
    gain_both_ended_se: float           # that is not an EOS) is the reward model's least trustworthy

    @property
    def z(self) -> float:
        return self.gain / self.gain_se if self.gain_se > 0 else math.inf

    @property
    def length_change(self) -> float:
        """Relative change of the mean answer length (-0.3: 30% shorter)."""
        return self.length[1] / self.length[0] - 1.0 if self.length[0] else 0.0


def length_adjusted(score_diff: np.ndarray, length_diff: np.ndarray) -> tuple[float, float, float]:
    """(intercept, its standard error, slope) of the least-squares line score_diff = g + b * length_diff over the
    prompts: g is the gain of an RLHF answer over the SFT answer to the same prompt when both are equally long.
    score_diff, length_diff: (n,) float arrays."""
    n = len(score_diff)
    if n < 3 or np.ptp(length_diff) == 0:  # no length variation: nothing to regress out
        return (*mean_se(score_diff), 0.0)
    X = np.stack([np.ones(n), length_diff.astype(float)], axis=1)
    coef, *_ = np.linalg.lstsq(X, score_diff.astype(float), rcond=None)
    resid = score_diff - X @ coef
    sigma2 = float(resid @ resid) / (n - 2)
    cov = sigma2 * np.linalg.inv(X.T @ X)
    return float(coef[0]), float(math.sqrt(cov[0, 0])), float(coef[1])


def compare(before: dict, after: dict) -> Comparison:
    """The `read_answers` of two evaluations, on the prompts both answered."""
    keys = sorted(set(before) & set(after))
    if not keys:
        raise ValueError("the two evaluations share no prompts")
    b = [before[k] for k in keys]
    a = [after[k] for k in keys]
    sb, sa = np.array([r["score"] for r in b]), np.array([r["score"] for r in a])
    lb, la = np.array([r["length"] for r in b], float), np.array([r["length"] for r in a], float)
    d = sa - sb
    gain, gain_se = mean_se(d)
    g, g_se, slope = length_adjusted(d, la - lb)
    ended = np.array([x["eos"] and y["eos"] for x, y in zip(b, a)], bool)
    gain_both_ended, gain_both_ended_se = mean_se(d[ended])
    mean = lambda x: mean_se(x)[0]  # noqa: E731
    return Comparison(n=len(d), score=(mean(sb), mean(sa)), length=(mean(lb), mean(la)),
                      eos=(mean([r["eos"] for r in b]), mean([r["eos"] for r in a])),
                      gain=gain, gain_se=gain_se, gain_at_equal_length=g, gain_at_equal_length_se=g_se,
                      score_per_token=slope, both_ended=int(ended.sum()), gain_both_ended=gain_both_ended,
                      gain_both_ended_se=gain_both_ended_se)


def first_and_last(output_dir) -> tuple[dict, dict] | None:
    """The answers of the first and the last evaluation (None with fewer than two)."""
    steps = eval_steps(output_dir)
    if len(steps) < 2:
        return None
    return read_answers(output_dir, steps[0]), read_answers(output_dir, steps[-1])


def plot_score_vs_length(before: dict, after: dict, png, cap: int | None = None) -> None:
    """Each answer's score against its length, SFT and RLHF, with a least-squares line each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, answers, color in (("SFT (step 1)", before, "tab:blue"), ("RLHF (step 3)", after, "tab:orange")):
        x = np.array([r["length"] for r in answers.values()], float)
        y = np.array([r["score"] for r in answers.values()], float)
        ax.scatter(x, y, s=10, alpha=0.45, color=color, label=f"{label}: mean {y.mean():+.2f} at {x.mean():.0f} tokens")
        if len(x) > 2 and np.ptp(x) > 0:
            slope, intercept = np.polyfit(x, y, 1)
            xs = np.linspace(x.min(), x.max(), 2)
            ax.plot(xs, intercept + slope * xs, color=color, lw=1.5)
    if cap:
        ax.axvline(cap, color="grey", ls="--", lw=0.8, label=f"cap ({cap} tokens): no EOS")
    ax.set_xlabel("answer length (tokens)")
    ax.set_ylabel("reward-model score")
    ax.set_title("held-out answers: score against length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
