"""The engram mechanism beyond the modules: how a batch is run (the sequential-pair step and its
evaluation ablations), and the measures of engrams (K-Means, ARI, cluster accuracy, cosine
similarities, probes)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models import EngramModel

ENGRAM_MODES = ("pair", "zero", "shuffled")


@dataclass
class BatchOut:
    loss: torch.Tensor | None  # scalar to backpropagate: the mean over the halves' losses
    sent_logits: torch.Tensor  # [B,2] in the batch's order
    sent_sum: float  # summed sentiment CE over the batch
    lm_sum: float  # summed LM CE over the batch's LM targets
    lm_count: int
    # the study's 7B code averages per-batch means over batches: this batch's mean sentiment and LM
    # loss (for a pair, the mean of its two halves' means); None where there is no such loss
    sent_mean: float | None = None
    lm_mean: float | None = None


def _trim(ids: torch.Tensor, mask: torch.Tensor):
    """Drop trailing all-pad columns so a half is padded only to its own longest row."""
    T = int(mask.sum(1).max())
    return ids[:, :T], mask[:, :T]  # [b,T]


def run_single(model: EngramModel, ids, mask, labels, engram=None):
    """One forward pass of the rows, padded only to their own longest row."""
    ids, mask = _trim(ids, mask)
    return model(ids, mask, labels=labels, engram=engram)


def split_halves(batch: int) -> tuple[int, int]:
    """Sizes of the first and second half; an odd batch gives the extra example to the first."""
    first = (batch + 1) // 2
    return first, batch - first


def run_batch(model: EngramModel, ids, mask, labels, mode: str = "pair", generator=None) -> BatchOut:
    """Run one batch the way its variant is trained and evaluated.

    Models without an engram run in one pass. `dual_engram`:
      - "pair": the first half runs with a zero engram; its engrams, not detached, are the prefixes
        of the second half (example i -> example i), so the second half's loss trains the
        compressor. The loss is the mean over both halves.
      - "zero": every example runs with a zero engram (evaluation ablation).
      - "shuffled": every example runs with the zero-prefix engram of a different example of the
        batch (evaluation ablation; needs `generator` for the permutation).
    """
    if mode not in ENGRAM_MODES:
        raise ValueError(f"unknown engram mode {mode!r}")
    if not model.uses_engram or mode == "zero":
        out = run_single(model, ids, mask, labels)
        return _collect([out], labels)
    if mode == "shuffled":
        own = run_single(model, ids, mask, None).engram  # [B,e]
        B = ids.shape[0]
        perm = torch.randperm(B, generator=generator)
        # Shift a random order by one so that no example receives its own engram.
        donor = torch.empty_like(perm)
        donor[perm] = perm.roll(1) if B > 1 else perm
        out = run_single(model, ids, mask, labels, engram=own[donor.to(own.device)])
        return _collect([out], labels)
    n1, n2 = split_halves(ids.shape[0])
    lab1 = labels[:n1] if labels is not None else None
    first = run_single(model, ids[:n1], mask[:n1], lab1)
    if n2 == 0:
        return _collect([first], labels)
    lab2 = labels[n1:] if labels is not None else None
    second = run_single(model, ids[n1:], mask[n1:], lab2, engram=first.engram[:n2])  # not detached
    return _collect([first, second], labels)


def _collect(outs, labels) -> BatchOut:
    logits = torch.cat([o.sent_logits for o in outs], 0)  # [B,2]
    loss = None
    sent_sum = 0.0
    if labels is not None:
        loss = sum(o.loss for o in outs) / len(outs)
        sent_sum = float(sum(o.sent_loss.detach() * o.sent_logits.shape[0] for o in outs))
    lm_sum = float(sum(o.lm_sum.detach() for o in outs if o.lm_sum is not None))
    lm_count = sum(o.lm_count for o in outs)
    sent_mean = float(sum(o.sent_loss.detach() for o in outs)) / len(outs) if labels is not None else None
    lm = [o.lm_loss.detach() for o in outs if o.lm_loss is not None]
    lm_mean = float(sum(lm)) / len(lm) if lm else None
    return BatchOut(loss, logits, sent_sum, lm_sum, lm_count, sent_mean, lm_mean)


# ----------------------------------------------------------------------------- analysis


def cluster_accuracy(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Accuracy under the best one-to-one cluster -> label mapping (Hungarian matching)."""
    from scipy.optimize import linear_sum_assignment

    labels = np.asarray(labels)
    clusters = np.asarray(clusters)
    ls, cs = np.unique(labels), np.unique(clusters)
    table = np.array([[np.sum((clusters == c) & (labels == lab)) for lab in ls] for c in cs])  # [C,L]
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / len(labels))


def cosine_similarities(x: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Mean cosine over distinct same-label pairs, and over cross-label pairs; raw vectors."""
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels)
    xn = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)
    sim = xn @ xn.T  # [n,n]
    same = labels[:, None] == labels[None, :]
    off_diag = ~np.eye(len(x), dtype=bool)
    return float(sim[same & off_diag].mean()), float(sim[~same].mean())


def engram_metrics(engrams: np.ndarray, labels: np.ndarray, seed: int) -> tuple[dict, np.ndarray]:
    """K-Means (k=2) on raw engrams; ARI, cluster accuracy, within/between-class cosine.
    Returns the metrics and the cluster assignment."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    clusters = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(engrams)
    within, between = cosine_similarities(engrams, labels)
    metrics = {
        "n": int(len(labels)),
        "dim": int(engrams.shape[1]),
        "ari": float(adjusted_rand_score(labels, clusters)),
        "cluster_accuracy": cluster_accuracy(labels, clusters),
        "within_class_cosine": within,
        "between_class_cosine": between,
    }
    return metrics, clusters


def probe(features: np.ndarray, labels: np.ndarray, seed: int, folds: int = 5) -> dict:
    """Cross-validated logistic-regression probe, with a shuffled-label control.
    Selectivity = probe accuracy - control accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    acc = cross_val_score(clf, features, labels, cv=cv).mean()
    shuffled = np.random.default_rng(seed).permutation(labels)
    control = cross_val_score(clf, features, shuffled, cv=cv).mean()
    return {"accuracy": float(acc), "control_accuracy": float(control), "selectivity": float(acc - control)}


def sentiment_probabilities(logits: torch.Tensor) -> torch.Tensor:
    return F.softmax(logits.float(), -1)[:, 1]  # [B] probability of "positive"
