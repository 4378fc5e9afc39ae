import math

import numpy as np
import pytest

from analysis.stats import mcnemar_exact, mean_ci, paired_t, paired_t_p, verdict


def test_mcnemar_exact_known_p_value():
    # 8 discordant pairs split 1 / 7: two-sided exact p = 2 * P(X <= 1 | n=8, 1/2) = 2 * 9/256
    a = [True] * 1 + [False] * 7 + [True] * 20
    b = [False] * 1 + [True] * 7 + [True] * 20
    r = mcnemar_exact(a, b)
    assert (r["a_only"], r["b_only"]) == (1, 7)
    assert r["p"] == pytest.approx(18 / 256)
    assert mcnemar_exact([True, False], [True, False])["p"] == 1.0


def test_mean_ci_uses_the_t_distribution():
    r = mean_ci([1.0, 2.0, 3.0])
    assert r["mean"] == 2.0 and r["std"] == pytest.approx(1.0)
    half = 4.302652729911275 / 3**0.5  # t(0.975, 2) * sd / sqrt(n)
    assert r["ci"] == pytest.approx([2 - half, 2 + half])
    assert mean_ci([5.0])["ci"] is None


def test_equal_deltas_are_undefined_not_certain():
    """Two seeds whose deltas are the same number give no variance to test against: never p = 0."""
    r = paired_t([80.85, 81.20], [80.73, 81.08])
    assert r["p"] is None and "zero variance" in r["reason"]
    assert verdict(0.12, r["p"]) == "inconclusive"
    assert paired_t([1, 2, 3], [1, 2, 3])["p"] is None  # all-zero deltas: likewise undefined
    assert "one seed" in paired_t([1.0], [0.0])["reason"]


def test_paired_t_and_verdicts():
    assert paired_t_p([1.0], [0.0]) is None
    p = paired_t_p([81.0, 80.5, 81.2, 80.9, 81.1], [80.0, 79.8, 80.1, 80.2, 79.9])
    assert p < 0.001
    assert verdict(1.0, p) == "supported" and verdict(-1.0, p) == "refuted"
    assert verdict(1.0, 0.2) == "inconclusive" and verdict(1.0, None) == "inconclusive"


@pytest.mark.parametrize(
    "p, cell, sentence",
    [
        (1.3e-8, "< 0.001", "p < 0.001"),
        (0.0004999, "< 0.001", "p < 0.001"),
        (0.0005, "0.001", "p = 0.001"),
        (0.257, "0.257", "p = 0.257"),
        (None, "undefined", "p undefined"),
    ],
)
def test_report_p_values_never_read_zero(p, cell, sentence):
    from analysis.reporting import _p, _p_is

    assert _p({"p": p}) == cell
    assert _p_is({"p": p}) == sentence


# ----------------------------------------------------------------------------- issue 32: library calls pinned by hand


def _t4_cdf(x: float) -> float:
    """Student's t CDF with 4 degrees of freedom in closed form (independent of scipy)."""
    return 0.5 + 3 / 8 * (x / math.sqrt(1 + x * x / 4)) * (1 - x * x / (12 * (1 + x * x / 4)))


def test_holm_and_bh_of_a_known_p_value_list():
    """p = (0.01, 0.04, 0.03, 0.005), adjusted by hand (R's p.adjust gives the same):
    Holm: sorted 0.005·4, 0.01·3, 0.03·2, 0.04·1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06;
    BH: sorted 0.005·4/1, 0.01·4/2, 0.03·4/3, 0.04·4/4 = 0.02, 0.02, 0.04, 0.04 -> running min from the top."""
    from analysis.stats import adjust

    p = [0.01, 0.04, 0.03, 0.005]
    assert adjust(p, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert adjust(p, "fdr_bh") == pytest.approx([0.02, 0.04, 0.04, 0.02])
    # an undefined test stays undefined and still counts in the family (as p = 1): Holm of (0.01, -) is 0.02
    assert adjust([0.01, None], "holm") == [pytest.approx(0.02), None]
    assert adjust([], "holm") == []


def test_a_family_sets_the_verdict_from_the_adjusted_p_not_the_raw_one():
    from analysis.stats import adjust_family, significant

    tests = [{"p": 0.03, "delta": {"mean": 1.0}}, {"p": 0.04, "delta": {"mean": -1.0}, "words": ["higher", "lower"]}]
    adjust_family(tests, "holm", "primary")
    assert [t["p_adj"] for t in tests] == pytest.approx([0.06, 0.06])  # Holm: 0.03·2, max(0.04·1, 0.06)
    assert [t["verdict"] for t in tests] == ["inconclusive", "inconclusive"] and not any(map(significant, tests))
    assert tests[0]["family"] == {"name": "primary", "method": "holm", "size": 2}
    one = [{"p": 0.03, "delta": {"mean": -1.0}, "words": ["higher", "lower"]}]
    adjust_family(one, "holm", "alone")
    assert one[0]["verdict"] == "lower" and significant(one[0])


def test_tost_against_a_hand_computed_answer():
    """Deltas (0.1, -0.1, 0.3, -0.3, 0): mean 0, sd sqrt(0.05), se 0.1, 4 df. Within ±0.5 both one-sided
    t's are 5: p = 1 - F4(5); within ±0.2 they are 2: p = 1 - F4(2) = 0.058 (not shown)."""
    from analysis.equivalence import tost

    d = [0.1, -0.1, 0.3, -0.3, 0.0]
    assert tost(d, [0.0] * 5, 0.5)["p"] == pytest.approx(1 - _t4_cdf(5.0), rel=1e-9)
    r = tost(d, [0.0] * 5, 0.2)
    assert r["p"] == pytest.approx(1 - _t4_cdf(2.0), rel=1e-9) and r["p"] > 0.05


def test_equal_deltas_on_every_seed_give_undefined_tests_and_a_clear_sentence():
    from analysis.equivalence import claim, delta_evidence
    from analysis.stats import adjust_family

    t = delta_evidence([81.0, 80.0, 79.0], [80.0, 79.0, 78.0], [1.0, 1.15])  # +1.00 on every seed
    assert t["p"] is None and "zero variance" in t["reason"]
    assert [x["p"] for x in t["tost"]] == [None, None] and t["mde"] is None
    assert t["delta"]["ci"] == [1.0, 1.0] and t["share_positive"] == 1.0
    adjust_family([t], "holm", "primary")
    assert t["verdict"] == "inconclusive" and t["p_adj"] is None
    assert claim(t).startswith("neither shown: every seed gave the same difference (+1.00)")


def test_power_minimum_detectable_effect_and_seeds_needed_against_the_noncentral_t():
    """The MDE at n seeds is the effect a two-sided paired t-test detects with 80 % power: its power,
    computed from the noncentral t directly, is 0.80. Seeds needed for the written protocol's H1 (study
    1.15, paired sd 2.06) and H2 (1.61, 0.72) are the issue's 28 and 4."""
    from scipy.stats import nct, t

    from analysis.equivalence import mde, seeds_needed

    for n in (3, 5, 10):
        es = mde(1.0, n)
        crit = t.ppf(0.975, n - 1)
        power = nct.sf(crit, n - 1, es * math.sqrt(n)) + nct.cdf(-crit, n - 1, es * math.sqrt(n))
        assert power == pytest.approx(0.80, abs=1e-6)
    assert mde(2.0, 5) == pytest.approx(2 * mde(1.0, 5)) and mde(1.0, 1) is None and mde(0.0, 5) is None
    assert seeds_needed(1.15, 2.06) == 28 and seeds_needed(1.61, 0.72) == 4
    assert seeds_needed(50.0, 1.0) == 2 and seeds_needed(1.0, 0.0) is None and seeds_needed(0.0, 1.0) is None


def test_prediction_interval_for_one_new_seed():
    """The written protocol's H2 final deltas per seed: mean -0.39; the interval the issue gives, [-2.59, +1.81],
    is mean ± t(0.975, 4)·sd·sqrt(1 + 1/5), wider than the CI of the mean by sqrt(n + 1)."""
    from analysis.stats import mean_ci, prediction_interval

    d = [79.70 - 79.24, 81.19 - 81.31, 79.93 - 79.93, 79.13 - 80.28, 80.28 - 81.42]
    lo, hi = prediction_interval(d)
    assert (round(lo, 2), round(hi, 2)) == (-2.59, 1.81)
    ci = mean_ci(d)["ci"]
    assert (hi - lo) == pytest.approx((ci[1] - ci[0]) * math.sqrt(6))
    assert prediction_interval([1.0]) is None


def test_paired_ci_is_ttest_rel_interval_and_matches_the_hand_formula():
    from analysis.stats import paired_ci

    a, b = [72.0, 76.0, 81.0], [70.0, 75.0, 78.0]  # deltas 2, 1, 3: mean 2, sd 1
    half = 4.302652729911275 / math.sqrt(3)
    assert paired_ci(a, b) == pytest.approx([2 - half, 2 + half])
    assert paired_ci([1.0], [0.0]) is None and paired_ci([2.0, 3.0], [1.0, 2.0]) == [1.0, 1.0]


def test_two_level_bootstrap():
    """Identical seeds: the seed level adds nothing, and the interval is the sentence bootstrap of one
    difference: 60 of 600 sentences +100 points, so mean 10, se ≈ 100·sqrt(0.1·0.9/600) = 1.22.
    Seeds that differ widen it. One seed, or equal predictions, degenerate cleanly."""
    from analysis.bootstrap import two_level_ci

    n = 600
    b = np.zeros((3, n), bool)
    a = b.copy()
    a[:, :60] = True
    r = two_level_ci(a, b, n_resamples=4000)
    se = 100 * math.sqrt(0.1 * 0.9 / n)
    assert r["ci"][0] == pytest.approx(10 - 1.96 * se, abs=0.5) and r["ci"][1] == pytest.approx(10 + 1.96 * se, abs=0.5)
    assert two_level_ci(a, b, n_resamples=4000) == r  # seeded: the same interval every rewrite
    spread = a.copy()
    spread[1, 60:120] = True  # seed 2 gains 10 more points
    wide = two_level_ci(spread, b, n_resamples=4000)
    assert wide["ci"][1] - wide["ci"][0] > r["ci"][1] - r["ci"][0] + 2
    assert two_level_ci(a[:1], b[:1]) is None
    assert two_level_ci(b, b, n_resamples=1000)["ci"] == [0.0, 0.0]


def test_h3_percentiles_and_tail_rate():
    from analysis.controls import ari_percentile, percentile_test, tail_rate

    draws = [0.0, 0.1, 0.2, 0.3]
    assert ari_percentile(0.25, draws) == 0.75 and ari_percentile(0.1, draws) == pytest.approx(0.375)
    assert ari_percentile(0.5, draws) == 1.0 and ari_percentile(-1.0, draws) == 0.0
    from scipy.stats import ttest_1samp

    pct = [0.10, 0.21, 0.14, 0.10, 0.06]
    r = percentile_test(pct)
    assert r["p"] == pytest.approx(float(ttest_1samp(pct, 0.5).pvalue)) and r["mean"] == pytest.approx(0.122)
    assert percentile_test([0.17, 0.305, 0.58])["ci"][0] == 0.0  # the t-interval reaches below 0: clipped
    assert percentile_test([1.0, 1.0, 1.0])["p"] is None and "same percentile" in percentile_test([1.0, 1.0])["reason"]
    rate = tail_rate([0.015, 0.055, 0.005, 0.045, 0.0])  # the 3, 11, 1, 9, 0 of 200
    assert rate["mean"] == pytest.approx(0.024) and rate["ci"][0] == 0.0 and rate["ci"][1] > 0.05  # clipped at 0
