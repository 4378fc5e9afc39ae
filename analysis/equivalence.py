"""What a paired difference across seeds shows, beyond its p-value: an equivalence test (statsmodels
ttost_paired, two one-sided tests) against margins fixed here, before any data are read; the
smallest effect the seeds could detect at 80 % power (statsmodels TTestPower); and the seeds that
detecting a given effect would need. A "no effect" sentence needs the equivalence test, not p > 0.05."""

from __future__ import annotations

import math

import numpy as np

from analysis.stats import ALPHA, POWER, constant, mean_ci, paired_ci, paired_t, prediction_interval, significant

# Equivalence margins, one per measure, fixed in code before any run is read. Accuracy also gets the
# study's own claimed effect as a second margin (see accuracy_margins).
ACCURACY_MARGIN = 1.0  # points of validation accuracy
MARGINS = {
    "accuracy": ACCURACY_MARGIN,
    "best_epoch": 1.0,  # epochs
    "effective_rank": 5.0,
    "participation_ratio": 2.0,
    "dims_90": 2.0,  # principal axes
    "top1_share": 0.05,
    "ari": 0.05,
}
MARGIN_OF = {
    "best_val_acc": "accuracy",
    "final_val_acc": "accuracy",
    "epoch1_train_acc": "accuracy",
    "at_best": "accuracy",
    "final": "accuracy",
    "engram_ari": "ari",
    "random_ari": "ari",
}


def accuracy_margins(study_effect: float | None = None) -> list[float]:
    """±1.0 point, and ± the study's claimed effect where there is one (the effect the study reports
    is what a reproduction must be able to rule in or out)."""
    out = [ACCURACY_MARGIN]
    effect = None if study_effect is None else round(abs(float(study_effect)), 2)  # the study reports two decimals
    if effect and effect != ACCURACY_MARGIN:
        out.append(effect)
    return out


def margin_for(measure: str) -> float:
    return MARGINS[MARGIN_OF.get(measure, measure)]


def tost(a, b, margin: float) -> dict:
    """Paired TOST of a − b within ±margin: p < α shows the difference lies inside the margin.
    Undefined (p None, with the reason) with fewer than two pairs or the same difference on every seed."""
    from statsmodels.stats.weightstats import ttost_paired

    d = np.asarray(a, float) - np.asarray(b, float)
    if len(d) < 2:
        return {"margin": margin, "p": None, "reason": "one seed"}
    if constant(d):
        return {"margin": margin, "p": None, "reason": "the same difference on every seed: no variance to test against"}
    p = ttost_paired(np.asarray(a, float), np.asarray(b, float), -margin, margin)[0]
    return {"margin": margin, "p": float(p), "reason": None}


def _power():
    from statsmodels.stats.power import TTestPower

    return TTestPower()


def mde(sd: float | None, n: int, power: float = POWER) -> float | None:
    """The smallest true mean difference a two-sided paired t-test over n seeds detects with
    `power` at α, given the paired differences' standard deviation sd (in the measure's units)."""
    if sd is None or n < 2 or sd <= 0:
        return None
    d = _power().solve_power(effect_size=None, nobs=n, alpha=ALPHA, power=power, alternative="two-sided")
    return float(d * sd)


def seeds_needed(effect: float | None, sd: float | None, power: float = POWER) -> int | None:
    """Seeds a two-sided paired t-test needs to detect `effect` with `power` at α, if the paired
    differences keep the standard deviation sd seen here. None when sd or the effect is zero/unknown."""
    if effect is None or sd is None or sd <= 0 or effect == 0:
        return None
    es, pw = abs(effect) / sd, _power()
    for n in range(2, 51):  # few seeds: count up (the solver fails for large effects at tiny n)
        p = pw.power(effect_size=es, nobs=n, alpha=ALPHA, alternative="two-sided")
        if not np.isfinite(p) or p >= power:  # not finite only where the noncentrality is huge: power ~ 1
            return n
    return int(math.ceil(pw.solve_power(effect_size=es, nobs=None, alpha=ALPHA, power=power, alternative="two-sided")))


def delta_evidence(a, b, margins: list[float], words=("supported", "refuted")) -> dict:
    """A paired difference a − b over seeds, all of it: mean, std, 95 % CI and the 95 % prediction
    interval for one new seed; the paired t-test (its p is adjusted later, with its family); TOST at
    each margin; the minimum detectable effect at 80 % power. The verdict is set by the family."""
    d = np.asarray(a, float) - np.asarray(b, float)
    t = paired_t(a, b)
    delta = {**mean_ci(d), "prediction_interval": prediction_interval(d)}
    delta["ci"] = paired_ci(a, b)  # the same interval as mean_ci's, from the paired test itself
    return {
        "delta": delta,
        "p": t["p"],
        "reason": t["reason"],
        "words": list(words),
        "p_adj": None,
        "verdict": "inconclusive",
        "tost": [tost(a, b, m) for m in margins],
        "mde": mde(delta["std"], len(d)),
        "share_positive": float(np.mean(d > 0)) if len(d) else None,
    }


def equivalent(t: dict) -> dict | None:
    """The tightest margin the TOST shows the difference inside, or None."""
    shown = [x for x in t.get("tost") or [] if x["p"] is not None and x["p"] < ALPHA]
    return min(shown, key=lambda x: x["margin"]) if shown else None


def _pv(p: float | None) -> str:
    return "undefined" if p is None else ("< 0.001" if p < 0.0005 else f"= {p:.3f}")


def claim(t: dict, digits: int = 2, unit: str = "") -> str:
    """The one sentence a test licenses: "different (adjusted p = …)", "equivalent within ±X (TOST
    p = …)", or "neither shown: the smallest effect these seeds detect is Y"."""
    if significant(t):
        return f"different (adjusted p {_pv(t['p_adj'])})"
    eq = equivalent(t)
    if eq:
        unit = " point" if unit == " points" and eq["margin"] == 1 else unit
        return f"equivalent within ±{eq['margin']:g}{unit} (TOST p {_pv(eq['p'])})"
    if t.get("reason"):
        return f"neither shown: {t['reason']}"
    m = t.get("mde")
    return "neither shown: " + (
        f"the smallest effect these seeds detect is {m:.{digits}f}{unit}"
        if m is not None
        else "too few seeds to detect any effect"
    )
