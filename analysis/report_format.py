"""The small formatters every report shares (REPORT.md, LADDER.md): numbers, intervals, p-values."""

from __future__ import annotations

from collections.abc import Mapping

from models import VARIANTS


class _Labels(Mapping):
    """Variant name -> its table entry's label, read at each look-up (a variant added to the table
    later has its label); a name the table does not know is its own label, so a report of another
    code's run still renders."""

    def __getitem__(self, name: str) -> str:
        return VARIANTS[name].label if name in VARIANTS else name

    def __iter__(self):
        return iter(VARIANTS)

    def __len__(self) -> int:
        return len(VARIANTS)


LABELS = _Labels()
ENGRAM_ROWS = (
    ("ARI", "ari", 3, 1),
    ("Cluster accuracy (%)", "cluster_accuracy", 1, 100),
    ("Within-class cosine", "within_class_cosine", 3, 1),
    ("Between-class cosine", "between_class_cosine", 3, 1),
)


def number(x, digits=2, pct=False) -> str:
    """x to `digits` decimals, "–" for None."""
    if x is None:
        return "–"
    return f"{x:.{digits}f}" + ("%" if pct else "")


def mean_std(stat: dict | None, digits=2, scale=1.0) -> str:
    """A mean_ci dict as "mean ± std" (the mean alone for one seed), "–" for None."""
    if stat is None:
        return "–"
    if stat.get("std") is None:
        return number(stat["mean"] * scale, digits)
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


_f, _msd = number, mean_std  # the names the older report modules import


def _ci(stat: dict, digits=2, scale=1.0) -> str:
    return (
        "–" if stat.get("ci") is None else f"[{stat['ci'][0] * scale:.{digits}f}, {stat['ci'][1] * scale:.{digits}f}]"
    )


def _ci_if_any(stat: dict, digits=2) -> str:
    """ " [lo, hi]" where there is a 95 % CI, else nothing (a single seed has none)."""
    return f" {_ci(stat, digits)}" if stat.get("ci") is not None else ""


def _msd_ci(stat: dict | None, digits=2) -> str:
    """Mean ± std, then the 95 % CI where there is one."""
    return "–" if stat is None else _msd(stat, digits) + _ci_if_any(stat, digits)


def _p(d: dict) -> str:
    """A p-value for a table cell: three decimals, "< 0.001" below that (never "0.000"), "undefined" for None."""
    if d["p"] is None:
        return "undefined"
    return "< 0.001" if d["p"] < 0.0005 else f"{d['p']:.3f}"


def _p_is(d: dict) -> str:
    """The same p-value in a sentence: "p = 0.257", "p < 0.001", "p undefined"."""
    cell = _p(d)
    return f"p {cell}" if cell[0] in "<u" else f"p = {cell}"
