"""REPORT.md's engram sections: the clustering of the engrams (H3), the control that asks whether
the organisation is the engram's or the pooled state's, and the ablation that asks whether the model
reads its engram. They describe the model with an engram (models.engram_variant: Model 3)."""

from __future__ import annotations

from analysis import report_evidence as ev
from analysis.report_format import ENGRAM_ROWS, _msd
from models import engram_variant


def engram_section(m: dict, study_engram: dict) -> list[str]:
    e = m["engram"]
    if not e:
        return []
    lines = [
        "## Engram clustering (H3)",
        "",
        "K-Means (k = 2) on each validation sentence's own engram (zero-engram pass) of the final model; "
        "mean ± std over seeds.",
        "",
        "| Metric | Ours | Study |",
        "|---|---|---|",
    ]
    for name, key, digits, scale in ENGRAM_ROWS:
        study = study_engram.get(key)  # as the study's results file gives it (4 decimals)
        lines.append(f"| {name} | {_msd(e[key], digits, scale)} | {'–' if study is None else f'{study:g}'} |")
    lines += ["", *ev.other_face(study_engram)]
    if "random_compressor" in e:
        lines += control_section(m)
    lines += ablation_section(m)
    return lines


def engram_trains(m: dict) -> bool:
    """Whether any loss reaches Model 3's compressor: not when the preset never feeds an engram
    back (the small published reading: the engram passed in is always zero)."""
    return (m.get("preset") or {}).get("engram_feedback", True)


def control_section(m: dict) -> list[str]:
    e = m["engram"]
    rc, pk = e["random_compressor"], e["pooled_kmeans"]
    trains = engram_trains(m)
    own = "trained engram" if trains else "never-trained engram"
    lines = [
        "### Control: is the organisation the engram's, or the pooled state's?",
        "",
        (
            ""
            if trains
            else "Under this preset no engram is ever fed back (the engram passed in is always zero), so no "
            "loss reaches Model 3's compressor: its engram is a random projection of the pooled states, one more draw "
            "of the control's kind, with this seed's initialisation. "
        )
        + "The same measures on the same pooled validation states of Model 3: its "
        f"{'trained' if trains else 'own'} compressor; {rc['draws']} "
        "freshly initialised, never trained compressors of the same shape (mean ± std [min, max] over all draws of all "
        "seeds); and K-Means on the pooled states themselves. Probe = 5-fold logistic regression.",
        "",
        "| Features | " + " | ".join(r[0] for r in ENGRAM_ROWS) + " | Probe accuracy (%) |",
        "|---|" + "---|" * (len(ENGRAM_ROWS) + 1),
    ]
    lines.append(
        f"| {own.capitalize()} | "
        + " | ".join(_msd(e[k], d, s) for _, k, d, s in ENGRAM_ROWS)
        + f" | {_msd(e['trained_probe_accuracy'], 1, 100)} |"
    )
    lines.append(
        "| Untrained compressor | "
        + " | ".join(
            f"{_msd(rc[k], d, s)} [{rc[k]['min'] * s:.{d}f}, {rc[k]['max'] * s:.{d}f}]" for _, k, d, s in ENGRAM_ROWS
        )
        + f" | {_msd(rc['probe_accuracy'], 1, 100)} |"
    )
    lines.append(
        "| Pooled state (K-Means on it) | "
        + " | ".join(_msd(pk[k], d, s) for _, k, d, s in ENGRAM_ROWS)
        + f" | {_msd(e['pooled_probe_accuracy'], 1, 100)} |"
    )
    above = [a for a in e["above_random"] if a["above"]]
    n = len(e["above_random"])
    per, pt = rc["draws"] // max(n, 1), (e.get("random_tail") or {}).get("percentile_test")
    below = "; the test across seeds is the percentile test below" if pt else ""
    lines += [
        "",
        f"**Does the {own} separate sentiment better than a random projection?** {ev.percentile_answer(pt)}: "
        f"per seed its ARI lies above every one of that seed's {per} probed random draws in {len(above)} of "
        f"{n} seeds ({own.split()[0]} ARI {_msd(e['ari'], 3)}, random {_msd(rc['ari'], 3)}, pooled state "
        f"{_msd(pk['ari'], 3)}){below}.",
        "",
    ]
    return lines + ev.h3_lines(e, own)


def ablation_section(m: dict) -> list[str]:
    runs = [r for r in m["models"][engram_variant(m["models"])]["runs"] if r["analysis"]]
    base = runs[0]["analysis"]["ablation"]["base"]
    others = [mode for mode in ("pair", "zero", "shuffled") if mode != base]
    lines = [
        "### Does the model read its engram? (evaluation ablation, Model 3, final epoch)",
        "",
        f"Validation accuracy with the engrams it is evaluated with (`{base}`), and with the other conditions; "
        "\"changed\" counts the predictions that differ from those, out of the predictions whose engram differs "
        "(under `pair` the first half of every batch already has a zero engram, "
        "so against `zero` only the second halves can change).",
        "",
        f"| Seed | {base} | " + " | ".join(others) + " |",
        "|---|---|" + "---|" * len(others),
    ]
    for r in runs:
        ab = r["analysis"]["ablation"]
        cells = [f"{ab[mode]:.2f} ({ab[f'changed_{mode}']} of {ab[f'could_change_{mode}']} changed)" for mode in others]
        lines.append(f"| {r['seed']} | {ab[base]:.2f} | " + " | ".join(cells) + " |")
    return lines + [""]


def engram_read_line(m: dict) -> list[str]:
    """The findings' line on the ablation: how many predictions switching the engrams changes."""
    if not m["engram"]:
        return []
    runs = [r["analysis"]["ablation"] for r in m["models"][engram_variant(m["models"])]["runs"] if r["analysis"]]
    key = "zero" if runs[0]["base"] != "zero" else "pair"
    changed = [f"{a[f'changed_{key}']} of {a[f'could_change_{key}']}" for a in runs]
    return [
        f"- **Is the engram read?** Switching the engrams to `{key}` changes {', '.join(changed)} validation "
        "predictions that could change, per seed (ablation table above)."
    ]
