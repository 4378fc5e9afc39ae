import pytest

from stats import mcnemar_exact, mean_ci, paired_t, paired_t_p, verdict


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
    half = 4.302652729911275 / 3 ** 0.5  # t(0.975, 2) * sd / sqrt(n)
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


@pytest.mark.parametrize("p, cell, sentence", [(1.3e-8, "< 0.001", "p < 0.001"), (0.0004999, "< 0.001", "p < 0.001"),
                                               (0.0005, "0.001", "p = 0.001"), (0.257, "0.257", "p = 0.257"),
                                               (None, "undefined", "p undefined")])
def test_report_p_values_never_read_zero(p, cell, sentence):
    from reporting import _p, _p_is

    assert _p({"p": p}) == cell
    assert _p_is({"p": p}) == sentence
