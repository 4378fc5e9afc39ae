"""REPORT.md of a small run (experiment.py): the shared sections of analysis/reporting.py, in order."""

from __future__ import annotations

from analysis import reporting as rep
from analysis.study_figures import SMALL_STUDY


def small_report(m: dict, other: dict | None = None) -> str:
    lines = rep.report_header(m, "Experiment 1: small transformers from scratch on SST-2")
    lines += ["## Validation accuracy (%)", "", *rep.accuracy_table(m), *rep.per_seed_table(m)]
    lines += rep.findings_sections(m, SMALL_STUDY["engram"], other)
    lines += rep.figures_section()
    lines += rep.history_section(m)
    return "\n".join(lines)
