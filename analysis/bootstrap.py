"""A two-level bootstrap of a paired accuracy difference: seeds, then validation sentences. The
t-interval over seeds counts only the seed-to-seed spread; the 872 validation sentences are one
sample too, shared by every seed, so each replicate resamples the seeds (scipy.stats.bootstrap,
percentile interval) and, inside the statistic, one multiset of sentences applied to every seed."""

from __future__ import annotations

import numpy as np

RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # fixed: the same predictions give the same interval on every rewrite


def two_level_ci(
    correct_a, correct_b, confidence: float = 0.95, n_resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> dict | None:
    """95 % percentile interval of mean_seeds(acc_a − acc_b) in points, from per-seed correctness
    matrices [S, N] (the same N sentences in the same order for every seed). None with one seed."""
    from scipy.stats import bootstrap

    diff = 100.0 * (np.asarray(correct_a, float) - np.asarray(correct_b, float))  # [S,N] points per sentence
    if diff.ndim != 2 or diff.shape[0] < 2:
        return None
    n_seeds, n = diff.shape
    rng = np.random.default_rng(seed)

    def statistic(idx, axis=-1):
        # idx [..., S'] resampled seed indices; one sentence resample per replicate, shared by its seeds
        idx = np.asarray(idx, int)
        flat = idx.reshape(-1, idx.shape[-1])  # [B,S']
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=len(flat)) / n  # [B,N] sentence weights
        per_seed = weights @ diff.T  # [B,S] each seed's delta under that replicate's sentences
        out = np.take_along_axis(per_seed, flat, axis=1).mean(axis=1)  # [B]
        return out.reshape(idx.shape[:-1])

    res = bootstrap(
        (np.arange(n_seeds),),
        statistic,
        vectorized=True,
        n_resamples=n_resamples,
        batch=1000,
        confidence_level=confidence,
        method="percentile",
        random_state=np.random.default_rng(seed + 1),
    )
    ci = res.confidence_interval
    return {
        "ci": [float(ci.low), float(ci.high)],
        "resamples": n_resamples,
        "levels": "seeds, then validation sentences",
        "seeds": int(n_seeds),
        "sentences": int(n),
    }
