"""After a variant is trained: what its representations hold, each measure beside its control.

- probes of the pooled state (and the engram), each with a shuffled-label control;
- K-Means on the pooled states themselves (what any compression of them starts from);
- the engram metrics, and the same metrics for untrained compressors of the same shape and
  initialisation applied to the same pooled states (is the organisation the engram's?);
- the rank of the pooled states (the study's anti-collapse explanation of H1);
- the evaluation ablation (zero / shuffled engram): does the model read its engram?
"""

from __future__ import annotations

import numpy as np
import torch

from analysis.stats import constant, mean_ci
from engram import engram_metrics, probe, split_halves
from models import EngramCompressor, EngramModel
from train.loop import Recipe, evaluate, zero_prefix_states

RANDOM_DRAWS = 10  # untrained compressors per dual_engram run, with probes
TAIL_DRAWS = 200  # untrained compressors per run for the tail of their ARI (K-Means only)
PROBE_FOLDS = 5
ENGRAM_KEYS = ("ari", "cluster_accuracy", "within_class_cosine", "between_class_cosine")


def representation_rank(x: np.ndarray, share: float = 0.9) -> dict:
    """Rank measures of the centred rows of x [n,d].

    effective_rank: exp of the entropy of the singular values normalised to sum 1 (Roy & Vetterli);
    participation_ratio: (sum of variances)^2 / sum of squared variances, over principal axes;
    dims_90: principal axes needed to hold `share` of the variance; top1_share: the first axis's share."""
    x = np.asarray(x, dtype=np.float64)
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)  # [min(n,d)] singular values
    s = s[s > s.max() * 1e-12] if s.max() > 0 else s[:0]
    if not len(s):
        return {"effective_rank": 0.0, "participation_ratio": 0.0, "dims_90": 0, "top1_share": None}
    p = s / s.sum()
    var = s**2  # variance along each principal axis (up to the common 1/n)
    frac = np.cumsum(var) / var.sum()
    return {
        "effective_rank": float(np.exp(-(p * np.log(p)).sum())),
        "participation_ratio": float(var.sum() ** 2 / (var**2).sum()),
        "dims_90": int(np.searchsorted(frac, share - 1e-12) + 1),
        "top1_share": float(var[0] / var.sum()),
    }


def untrained_engrams(x: torch.Tensor, engram_dim: int, draw_seed: int) -> np.ndarray:
    """The engrams x [n,H] gets from a compressor freshly initialised under `draw_seed`."""
    with torch.random.fork_rng(devices=[]):  # the training stream is left as it was
        torch.manual_seed(draw_seed)
        compressor = EngramCompressor(x.shape[1], engram_dim)
    with torch.no_grad():
        return compressor(x).numpy()  # [n,e]


def random_compressor_tail(
    pooled: np.ndarray, labels: np.ndarray, engram_dim: int, seed: int, draws: int = TAIL_DRAWS
) -> dict:
    """ARI and cluster accuracy of `draws` untrained compressors (the same seeds as the control
    above, continued) on the pooled states as arrays.npz keeps them (float16): enough draws per run
    to say how often a random projection reaches a given ARI (the study's, say). Computed from the
    saved arrays, so a run trained before this control existed gets exactly the same one."""
    x = torch.as_tensor(np.asarray(pooled, dtype=np.float16).astype(np.float32))  # [n,H] as saved
    ari, acc = [], []
    for d in range(draws):
        metrics, _ = engram_metrics(untrained_engrams(x, engram_dim, seed * 1000 + d), labels, seed)
        ari.append(metrics["ari"])
        acc.append(metrics["cluster_accuracy"])
    return {
        "draws": draws,
        "inputs": "pooled states as saved in arrays.npz (float16)",
        "ari": ari,
        "cluster_accuracy": acc,
    }


def ari_percentile(ari: float, draws) -> float:
    """Where one ARI falls among untrained compressors' ARIs, 0..1 (mid-rank: the share of draws
    below it plus half the share equal to it). If the engram were one more random draw, this would
    be uniform on [0, 1] across seeds."""
    d = np.asarray(draws, float)
    return float((d < ari).mean() + 0.5 * (d == ari).mean())


def percentile_test(percentiles) -> dict:
    """Across seeds, are the engram's percentiles among its own seed's untrained compressors
    centred on 0.5 (what one more random draw gives)? One-sample t-test (scipy ttest_1samp) with its
    95 % interval; undefined with one seed or the same percentile on every seed."""
    from scipy.stats import ttest_1samp

    v = np.asarray(percentiles, float)
    out = {"null": 0.5, "test": "one-sample t-test of the per-seed percentiles against 0.5", **mean_ci(v)}
    if out["ci"] is not None:  # a percentile lies in [0, 1]; the t-interval does not know that
        out["ci"] = [max(0.0, out["ci"][0]), min(1.0, out["ci"][1])]
    if len(v) < 2 or constant(v):
        return {**out, "p": None, "reason": "one seed" if len(v) < 2 else "the same percentile on every seed"}
    return {**out, "p": float(ttest_1samp(v, 0.5).pvalue), "reason": None}


def tail_rate(fractions) -> dict:
    """The share of untrained compressors reaching a threshold ARI, with a 95 % interval over seeds
    (t-based, clipped to [0, 1]): the draws of one seed share its pooled states, so the seeds, not
    the draws, are the independent units."""
    out = mean_ci(fractions)
    if out["ci"] is not None:
        out["ci"] = [max(0.0, out["ci"][0]), min(1.0, out["ci"][1])]
    return out


def random_compressor_control(
    pooled: np.ndarray, labels: np.ndarray, engram_dim: int, seed: int, draws: int = RANDOM_DRAWS
) -> dict:
    """The engram metrics and the engram probe of `draws` freshly initialised, never trained
    compressors (Linear(H -> e) -> Tanh, PyTorch's default init, as the model's own starts) on the
    same pooled states: what a random projection of those states already gives."""
    x = torch.as_tensor(np.asarray(pooled, dtype=np.float32))  # [n,H]
    per_draw = []
    for d in range(draws):
        e = untrained_engrams(x, engram_dim, seed * 1000 + d)  # [n,e]
        metrics, _ = engram_metrics(e, labels, seed)
        per_draw.append({**{k: metrics[k] for k in ENGRAM_KEYS}, "probe_accuracy": probe(e, labels, seed)["accuracy"]})
    summary = {}
    for k in (*ENGRAM_KEYS, "probe_accuracy"):
        v = [r[k] for r in per_draw]
        summary[k] = {**mean_ci(v), "min": float(min(v)), "max": float(max(v))}
    return {"draws": draws, "summary": summary, "per_draw": per_draw}


def could_change(n: int, batch_size: int, base: str, mode: str) -> int:
    """Validation predictions whose engram differs between two evaluation modes. Under "pair" the
    first half of every batch already runs with a zero engram, so against "zero" only the second
    halves can change; "shuffled" gives every example another example's engram."""
    if {base, mode} == {"pair", "zero"}:
        return sum(split_halves(min(batch_size, n - i))[1] for i in range(0, n, batch_size))
    return n


def ablation(model: EngramModel, val, recipe: Recipe, autocast_dtype, seed: int) -> dict:
    """Validation accuracy with the engrams the model was evaluated with (recipe.eval_mode), with
    every engram zero, and with every engram taken from another example; how many predictions each
    change moves, out of how many could move."""
    base = recipe.eval_mode
    runs = {
        mode: evaluate(model, val, recipe, autocast_dtype, mode=mode, seed=seed)
        for mode in ("pair", "zero", "shuffled")
    }
    out = {"base": base, **{mode: r["acc"] for mode, r in runs.items()}}
    bs = recipe.batch_size(model.variant)
    for mode in ("pair", "zero", "shuffled"):
        if mode != base:
            out[f"changed_{mode}"] = int((runs[mode]["pred"] != runs[base]["pred"]).sum())
            out[f"could_change_{mode}"] = could_change(len(val), bs, base, mode)
    return out


def analyse(model: EngramModel, val, recipe: Recipe, autocast_dtype, seed: int) -> tuple[dict, dict]:
    """Every analysis of one trained variant on the validation set. Returns (JSON-able analysis,
    arrays kept in arrays.npz for figures and later analyses)."""
    labels = np.asarray(val.labels)
    pooled, engrams = zero_prefix_states(model, val, recipe, autocast_dtype)
    pooled_metrics, pooled_clusters = engram_metrics(pooled, labels, seed)
    result = {
        "probe_pooled": probe(pooled, labels, seed, PROBE_FOLDS),
        "pooled_kmeans": pooled_metrics,
        "rank": representation_rank(pooled),
    }
    # float16 keeps the pooled states small enough to commit and exact enough for any later analysis
    arrays = {"labels": labels, "pooled": pooled.astype(np.float16), "pooled_clusters": pooled_clusters}
    if engrams is not None:
        metrics, clusters = engram_metrics(engrams, labels, seed)
        result["engram"] = metrics
        result["probe_engram"] = probe(engrams, labels, seed, PROBE_FOLDS)
        result["random_compressor"] = random_compressor_control(pooled, labels, engrams.shape[1], seed)
        result["ablation"] = ablation(model, val, recipe, autocast_dtype, seed)
        arrays.update(engrams=engrams, clusters=clusters)
    return result, arrays
