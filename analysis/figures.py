"""The two figures of a run: learning curves (mean over seeds with a ± 1 std band, the study's
published curve dashed) and the t-SNE of the validation engrams and pooled states."""

from __future__ import annotations

import textwrap

import numpy as np

from analysis.metrics import setting, subject
from models import VARIANTS


def colour(variant: str, drawn) -> str:
    """A variant's line colour: its table entry's, else (a variant this code does not know) one of
    matplotlib's cycle the table's colours leave free, by its place among the variants drawn."""
    if variant in VARIANTS:
        return VARIANTS[variant].colour
    taken = {v.colour for v in VARIANTS.values()}
    spare = ("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan")
    free = [c for c in spare if c not in taken]
    unknown = [v for v in drawn if v not in VARIANTS]
    return free[unknown.index(variant) % len(free)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def wrapped(title: str, fig_width_in: float) -> str:
    """A suptitle broken into lines that fit the figure: the default title size (12 pt) sets about
    11.3 characters per inch (measured); 10 leaves a margin, so no title runs off the edge."""
    return textwrap.fill(title, width=max(20, int(fig_width_in * 10)))


def curve_data(metrics: dict, variant: str, key: str):
    """(epochs, mean, std) of a history column over the seeds of `variant`, over the epochs every
    seed has; std is the sample std (ddof 1), zero with one seed. None when the column is empty."""
    runs = metrics["models"][variant]["runs"]
    rows = [[h[key] for h in r["history"]] for r in runs]
    if not rows or any(x is None for row in rows for x in row):
        return None
    n = min(len(r) for r in rows)
    if n == 0:
        return None
    y = np.asarray([r[:n] for r in rows], float)  # [seeds, epochs]
    std = y.std(0, ddof=1) if len(y) > 1 else np.zeros(n)
    return np.arange(1, n + 1), y.mean(0), std


def learning_curves(metrics: dict, panels: list[tuple[str, list[tuple[str, str]]]], study_curves: dict):
    """One panel per (title, [(history key, line label)]) that has data; three models per panel.
    `study_curves[key][variant]` is the study's published per-epoch curve, drawn dashed."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    drawn = []
    for title, keys in panels:
        series = [(v, key, label, curve_data(metrics, v, key)) for v in metrics["models"] for key, label in keys]
        series = [s for s in series if s[3] is not None]
        if series:
            drawn.append((title, series))
    n_seeds = max((len(m["runs"]) for m in metrics["models"].values()), default=0)
    fig, axes = plt.subplots(1, max(len(drawn), 1), figsize=(5.5 * max(len(drawn), 1), 4.6), squeeze=False)
    for ax, (title, series) in zip(axes[0], drawn):
        styles = {}
        for v, key, label, (x, mean, std) in series:
            ls = styles.setdefault(key, ("-", ":")[len(styles) % 2])
            c = colour(v, metrics["models"])
            ax.plot(x, mean, ls, marker="o", ms=3, color=c, label=f"{v} ({label})")
            if n_seeds > 1:
                ax.fill_between(x, mean - std, mean + std, color=c, alpha=0.15, linewidth=0)
            study = study_curves.get(key, {}).get(v)
            if study:
                ax.plot(np.arange(1, len(study) + 1), study, "--", color=c, alpha=0.8, label=f"{v} (study)")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if not drawn:
        axes[0][0].text(0.5, 0.5, "no finished variant yet", ha="center", va="center")
        axes[0][0].set_axis_off()
    band = f"mean of {n_seeds} seeds, band = ± 1 std across seeds" if n_seeds > 1 else "one seed"
    fig.suptitle(
        wrapped(
            f"{subject(metrics)} ({setting(metrics)}): learning curves ({band}); dashed = the study's published run",
            fig.get_figwidth(),
        )
    )
    fig.tight_layout()
    return fig


def engram_clusters(
    engrams: np.ndarray, labels: np.ndarray, clusters: np.ndarray, pooled: np.ndarray, title: str, seed: int
):
    """Three t-SNE panels: the engrams coloured by true label and by K-Means cluster, and the pooled
    states they compress, coloured by true label."""
    plt = _pyplot()
    from sklearn.manifold import TSNE

    def tsne(x):
        n = len(x)
        return TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=seed).fit_transform(
            np.asarray(x, dtype=np.float32)
        )  # [n,2]

    xy_e, xy_p = tsne(engrams), tsne(pooled)
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    for ax, xy, values, names, name in (
        (axes[0], xy_e, labels, ("negative", "positive"), f"engrams ({engrams.shape[1]}-d) by true label"),
        (axes[1], xy_e, clusters, ("cluster 0", "cluster 1"), "engrams by K-Means cluster (k=2)"),
        (axes[2], xy_p, labels, ("negative", "positive"), f"pooled states ({pooled.shape[1]}-d) by true label"),
    ):
        for k, (colour, legend) in enumerate(zip(("tab:red", "tab:blue"), names)):
            sel = np.asarray(values) == k
            ax.scatter(xy[sel, 0], xy[sel, 1], s=8, alpha=0.7, c=colour, label=legend)
        ax.set_title(name)
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
        ax.legend(loc="best")
    fig.suptitle(wrapped(title, fig.get_figwidth()))
    fig.tight_layout()
    return fig
