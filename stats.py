"""Statistics for comparing runs: exact McNemar, t-based confidence intervals, the paired t-test
across seeds (with the degenerate cases named instead of turned into certainty), and verdicts."""
from __future__ import annotations

import math

import numpy as np

ALPHA = 0.05


def mcnemar_exact(correct_a, correct_b) -> dict:
    """Exact (binomial) two-sided McNemar test on paired correctness vectors.
    b = A right and B wrong, c = A wrong and B right."""
    from scipy.stats import binomtest

    a = np.asarray(correct_a, bool)
    b_ = np.asarray(correct_b, bool)
    b = int(np.sum(a & ~b_))
    c = int(np.sum(~a & b_))
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)
    return {"a_only": b, "b_only": c, "p": p}


def mean_ci(values, confidence: float = 0.95) -> dict:
    """Mean, sample std and a t-based confidence interval (None with fewer than two values)."""
    from scipy.stats import t

    v = np.asarray(values, float)
    out = {"n": int(len(v)), "mean": float(v.mean()), "std": None, "ci": None}
    if len(v) >= 2:
        sd = float(v.std(ddof=1))
        half = float(t.ppf(0.5 + confidence / 2, len(v) - 1) * sd / math.sqrt(len(v)))
        out.update(std=sd, ci=[out["mean"] - half, out["mean"] + half])
    return out


def paired_t(a, b) -> dict:
    """Two-sided paired t-test of a - b across seeds: {"p": p or None, "reason": why p is None}.

    p is undefined, and reported as such, with fewer than two pairs or when every difference is the
    same number (zero variance: equal deltas over a few seeds happen, since accuracies move in
    steps of 1/n). Never p = 0 from two equal numbers."""
    from scipy.stats import ttest_rel

    d = np.asarray(a, float) - np.asarray(b, float)
    if len(d) < 2:
        return {"p": None, "reason": "one seed: no variance across seeds to test against"}
    if np.ptp(d) <= 1e-12 * max(1.0, float(np.abs(d).max())):
        return {"p": None, "reason": f"every seed gave the same difference ({d[0]:+.2f}): zero variance, the t-test is undefined"}
    return {"p": float(ttest_rel(a, b).pvalue), "reason": None}


def paired_t_p(a, b) -> float | None:
    return paired_t(a, b)["p"]


def verdict(delta: float, p: float | None, words=("supported", "refuted")) -> str:
    """`words[0]` for a significant positive delta, `words[1]` for a significant negative one."""
    if p is None or p >= ALPHA:
        return "inconclusive"
    return words[0] if delta > 0 else words[1]
