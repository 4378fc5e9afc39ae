"""Statistics for comparing runs, on library calls: exact McNemar (scipy binomtest), t-based
confidence intervals and the paired t-test across seeds (scipy ttest_1samp / ttest_rel and their
confidence_interval()), a t-based prediction interval for one new seed, and multiple-testing
adjustment over a declared family (statsmodels multipletests). Degenerate cases (one seed, the same
difference on every seed) are named instead of turned into certainty."""

from __future__ import annotations

import math

import numpy as np

ALPHA = 0.05
POWER = 0.8
PRIMARY = "holm"  # H1 and H2 at the final epoch, per protocol: the declared primary family
SECONDARY = "fdr_bh"  # everything else a report tests (best-epoch deltas, rank, extra sets, the ladder)
METHOD_NAMES = {"holm": "Holm", "fdr_bh": "Benjamini–Hochberg"}


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


def constant(v: np.ndarray) -> bool:
    """Every value the same number (to rounding): no variance, so no t-statistic."""
    return len(v) > 0 and float(np.ptp(v)) <= 1e-12 * max(1.0, float(np.abs(v).max()))


def mean_ci(values, confidence: float = 0.95) -> dict:
    """Mean, sample std and a t-based confidence interval of the mean (scipy's ttest_1samp
    interval); None with fewer than two values, a zero-width interval when they are all equal."""
    from scipy.stats import ttest_1samp

    v = np.asarray(values, float)
    out = {"n": int(len(v)), "mean": float(v.mean()), "std": None, "ci": None}
    if len(v) >= 2:
        out["std"] = float(v.std(ddof=1))
        if constant(v):  # scipy would divide by a zero std
            out["ci"] = [out["mean"], out["mean"]]
        else:
            ci = ttest_1samp(v, 0.0).confidence_interval(confidence)
            out["ci"] = [float(ci.low), float(ci.high)]
    return out


def prediction_interval(values, confidence: float = 0.95) -> list[float] | None:
    """Where one new draw (one more seed) falls with probability `confidence`, from n draws:
    mean ± t(n−1) · sd · sqrt(1 + 1/n). The study's single run is one such draw, so it is compared
    with this interval, not with the confidence interval of our mean. None with fewer than two."""
    from scipy.stats import t

    v = np.asarray(values, float)
    if len(v) < 2:
        return None
    half = float(t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) * math.sqrt(1 + 1 / len(v)))
    return [float(v.mean()) - half, float(v.mean()) + half]


def paired_t(a, b) -> dict:
    """Two-sided paired t-test of a - b across seeds (scipy ttest_rel): {"p": p or None, "reason": why
    p is None}. p is undefined, and reported as such, with fewer than two pairs or when every
    difference is the same number (zero variance: equal deltas over a few seeds happen, since
    accuracies move in steps of 1/n). Never p = 0 from two equal numbers."""
    from scipy.stats import ttest_rel

    d = np.asarray(a, float) - np.asarray(b, float)
    if len(d) < 2:
        return {"p": None, "reason": "one seed: no variance across seeds to test against"}
    if constant(d):
        return {
            "p": None,
            "reason": f"every seed gave the same difference ({d[0]:+.2f}): zero variance, the t-test is undefined",
        }
    return {"p": float(ttest_rel(np.asarray(a, float), np.asarray(b, float)).pvalue), "reason": None}


def paired_ci(a, b, confidence: float = 0.95) -> list[float] | None:
    """The t-interval of the mean of a - b (scipy ttest_rel(...).confidence_interval()); None with one
    pair, a zero-width interval when every difference is the same."""
    from scipy.stats import ttest_rel

    d = np.asarray(a, float) - np.asarray(b, float)
    if len(d) < 2:
        return None
    if constant(d):
        return [float(d.mean()), float(d.mean())]
    ci = ttest_rel(np.asarray(a, float), np.asarray(b, float)).confidence_interval(confidence)
    return [float(ci.low), float(ci.high)]


def paired_t_p(a, b) -> float | None:
    return paired_t(a, b)["p"]


def adjust(pvalues: list[float | None], method: str) -> list[float | None]:
    """Adjusted p-values of one family (statsmodels multipletests: "holm", "fdr_bh"). An undefined
    test stays undefined but still counts in the family as p = 1 (it can reject nothing, and leaving
    it out would make the family look smaller than the tests it declared)."""
    from statsmodels.stats.multitest import multipletests

    if not pvalues:
        return []
    filled = [1.0 if p is None else float(p) for p in pvalues]
    adjusted = multipletests(filled, alpha=ALPHA, method=method)[1]
    return [None if p is None else float(q) for p, q in zip(pvalues, adjusted)]


def adjust_family(tests: list[dict], method: str, family: str) -> None:
    """Give every test of a family (dicts with "p", "delta" and "words") its adjusted p, the family's
    name and size, and the verdict that follows from the adjusted p, in place."""
    for t, q in zip(tests, adjust([t["p"] for t in tests], method)):
        t.update(
            p_adj=q,
            family={"name": family, "method": method, "size": len(tests)},
            verdict=verdict(t["delta"]["mean"], q, tuple(t.get("words") or ("supported", "refuted"))),
        )


def significant(t: dict) -> bool:
    """Beyond seed noise: the adjusted p of the test's family is below α, and nothing else is."""
    return t.get("p_adj") is not None and t["p_adj"] < ALPHA


def verdict(delta: float, p: float | None, words=("supported", "refuted")) -> str:
    """`words[0]` for a significant positive delta, `words[1]` for a significant negative one; p is
    the family-adjusted p wherever the test belongs to a family."""
    if p is None or p >= ALPHA:
        return "inconclusive"
    return words[0] if delta > 0 else words[1]
