"""REPORT.md: the study's tables filled with a run's numbers beside the study's, the controls, and
the findings in words. Formatting only: every number comes from metrics.json."""

from __future__ import annotations

from analysis import report_evidence as ev
from analysis.report_engram import (  # noqa: F401  (re-exported: the reports call them as reporting's)
    ablation_section,
    control_section,
    engram_read_line,
    engram_section,
    engram_trains,
)
from analysis.report_format import (  # noqa: F401
    ENGRAM_ROWS,
    LABELS,
    _ci,
    _ci_if_any,
    _f,
    _msd,
    _msd_ci,
    _p,
    _p_is,
)
from analysis.stats import mean_ci


def report_header(m: dict, title: str) -> list[str]:
    lines = [f"# {title} — protocol `{m['protocol']}`", ""]
    if m.get("stopped"):
        lines += [
            f"> **Incomplete: stopped by {m['stopped']}**. The tables hold the finished variants only; "
            "continue with the command below plus `--resume`.",
            "",
        ]
    elif not m["complete"]:
        jobs = m.get("jobs")
        done = f" ({jobs['finished']} of {jobs['total']} jobs finished)" if jobs else ""
        lines += [
            f"> **Incomplete**{done}: this run is still going or stopped early; "
            "the tables hold the finished jobs only.",
            "",
        ]
    failed = (m.get("jobs") or {}).get("failed") or []
    if failed:
        lines += [
            f"> **{len(failed)} job(s) failed**: "
            + "; ".join(f"`{f['job']}`: {f['error'] or 'no error line'}" for f in failed)
            + f". Rerun what is missing (finished jobs are kept) with `{m['jobs']['rerun']}`.",
            "",
        ]
    if m["shortened"]:
        lines += [
            "> **Shortened run** (fewer epochs or examples than the study): not comparable with the study's figures.",
            "",
        ]
    if m.get("code_versions"):
        lines += [
            f"> **Trained under {len(m['code_versions'])} code versions** (a job resumed under edited code): "
            + "; ".join(m["code_versions"])
            + ".",
            "",
        ]
    mach = m.get("machine", {})
    lines += [
        f"Command: `{m['command']}`",
        "",
        *ev.declaration(),
        f"Protocol `{m['protocol']}`"
        + (f" with overrides {m['overrides']}" if m.get("overrides") else "")
        + f" · seeds: {', '.join(map(str, m['seeds']))} · device: {m['device']}"
        + (f" · threads: {mach['threads']}" if mach.get("threads") else "")
        + f" · train rows: {m['data']['train']:,} · validation rows: {m['data']['validation']:,}"
        + (f" · vocabulary: {m['data']['vocab_size']:,}" if m["data"].get("vocab_size") else ""),
        "",
    ]
    return lines


def accuracy_table(m: dict) -> list[str]:
    s = m["study"]
    multi = len(m["seeds"]) > 1
    head = (
        "| Model | Best val (ours) | Final val (ours) |"
        + (" Best 95 % CI | Final 95 % CI |" if multi else "")
        + " Best (study) | Final (study) | Params (total / trainable) | Minutes |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for v, mm in m["models"].items():
        row = f"| {LABELS[v]} | {_msd(mm['best_val_acc'])} | {_msd(mm['final_val_acc'])} |"
        if multi:
            row += f" {_ci(mm['best_val_acc'])} | {_ci(mm['final_val_acc'])} |"
        row += f" {_f(s['best'].get(v))} | {_f(s['final'].get(v))} |"
        row += f" {mm['total_params']:,} / {mm['trainable_params']:,} | "
        row += f"{_msd(mm['minutes'], 1)} |"
        lines.append(row)
    return lines + [""]


def per_seed_table(m: dict) -> list[str]:
    if len(m["seeds"]) < 2:
        return []
    lines = [
        "Per seed (best / final validation accuracy, %, and the best epoch):",
        "",
        "| Seed | " + " | ".join(LABELS[v] for v in m["models"]) + " |",
        "|---|" + "---|" * len(m["models"]),
    ]
    for seed in m["seeds"]:
        cells = []
        for mm in m["models"].values():
            r = next((r for r in mm["runs"] if r["seed"] == seed), None)
            cells.append(f"{_f(r['best_val_acc'])} / {_f(r['final_val_acc'])} (ep {r['best_epoch']})" if r else "–")
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return lines + [""]


def extra_section(m: dict) -> list[str]:
    names = sorted({k for mm in m["models"].values() for k in mm["extra"]})
    if not names:
        return []
    lines = [
        "## Held-out sets (`--extra-eval`)",
        "",
        "Accuracy (%) at the epoch with the best validation accuracy (the honest held-out number: the epoch is chosen "
        "on validation, not on this set) and at the final epoch; mean ± std [95 % CI] over seeds.",
        "",
        "| Set | Model | At the selected epoch | Final epoch |",
        "|---|---|---|---|",
    ]
    for k in names:
        for v, mm in m["models"].items():
            e = mm["extra"][k]
            lines.append(
                f"| {k} | {LABELS[v]} | {_msd(e['at_best'])} {_ci(e['at_best'])} | "
                f"{_msd(e['final'])} {_ci(e['final'])} |"
            )
    return lines + ev.extra_section_tests(m)


def hypothesis_section(m: dict) -> list[str]:
    return ev.hypothesis_section(m)


def rank_section(m: dict) -> list[str]:
    rows = [(v, mm["rank"]) for v, mm in m["models"].items() if "rank" in mm]
    if not rows:
        return []
    keys = [
        ("effective_rank", "Effective rank", 1),
        ("participation_ratio", "Participation ratio", 2),
        ("dims_90", "Dims for 90 % variance", 1),
        ("top1_share", "Top-1 variance share", 3),
    ]
    lines = [
        "## Rank of the pooled states (the study's anti-collapse explanation of H1)",
        "",
        "Per model, over the pooled validation states of the final model (centred): effective rank (exp of the entropy "
        "of the normalised singular values), participation ratio, principal axes holding 90 % of the variance, and the "
        "first axis's share; mean ± std [95 % CI] over seeds.",
        "",
        "| Model | " + " | ".join(k[1] for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for v, rk in rows:
        lines.append(f"| {LABELS[v]} | " + " | ".join(_msd_ci(rk.get(k), d) for k, _, d in keys) + " |")
    t = m.get("rank_test")
    if t:
        lines += ev.rank_tests(t)
    return lines + [""]


def probe_section(m: dict) -> list[str]:
    rows = []
    for v, mm in m["models"].items():
        for key, what in (("probe_pooled", "pooled hidden state"), ("probe_engram", "engram")):
            stats = [r["analysis"][key] for r in mm["runs"] if r["analysis"] and key in r["analysis"]]
            if stats:
                acc, ctl, sel = (
                    mean_ci([100 * s[k] for s in stats]) for k in ("accuracy", "control_accuracy", "selectivity")
                )
                rows.append(f"| {LABELS[v]} | {what} | {_msd(acc)} | {_msd(ctl)} | {_msd(sel)} |")
    if not rows:
        return []
    return [
        "## Probes",
        "",
        "5-fold cross-validated logistic regression of sentiment on validation features of the final model; "
        "control = the same probe on shuffled labels; selectivity = accuracy − control (points).",
        "",
        "| Model | Features | Probe accuracy | Control accuracy | Selectivity |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]


def history_section(m: dict) -> list[str]:
    seed = m["seeds"][0]
    lines = ["## Per-epoch history" + (f" (seed {seed})" if len(m["seeds"]) > 1 else ""), ""]
    extra_names = sorted(
        {k for mm in m["models"].values() for r in mm["runs"] for h in r["history"] for k in h["extra"]}
    )
    for v, mm in m["models"].items():
        run = next((r for r in mm["runs"] if r["seed"] == seed), None)
        if run is None:
            continue
        lines += [
            f"**{LABELS[v]}**",
            "",
            "| Epoch | Train loss | Train sent | Train LM | Train acc | Val acc | Val sent | Val LM |"
            + "".join(f" {n} acc |" for n in extra_names)
            + " Seconds |",
            "|---|---|---|---|---|---|---|---|" + "---|" * len(extra_names) + "---|",
        ]
        for h in run["history"]:
            extra = "".join(f" {_f(h['extra'].get(n, {}).get('acc'))} |" for n in extra_names)
            lines.append(
                f"| {h['epoch']} | {_f(h['train_loss'], 4)} | {_f(h['train_sent_loss'], 4)} | "
                f"{_f(h['train_lm_loss'], 4)} | "
                f"{_f(h['train_acc'])} | {_f(h['val_acc'])} | {_f(h['val_sent_loss'], 4)} | "
                f"{_f(h['val_lm_loss'], 4)} |{extra} {h['seconds']:.1f} |"
            )
        lines.append("")
    return lines


def summary_section(m: dict) -> list[str]:
    """The findings in words, each read off a table above it in the report."""
    if not m["hypotheses"]:
        return []
    return ev.findings(m) + engram_read_line(m) + [""]


def _run_extent(r: dict) -> str:
    """How much of a run the numbers stand on: its finished seeds, and whether it is cut short."""
    done = min((len(v["runs"]) for v in r["models"].values()), default=0)
    n = len(r["seeds"])
    extent = f"{done} of {n} seeds finished" if done < n else f"{n} seed{'s' * (n != 1)}"
    return extent + (", shortened" if r["shortened"] else "") + ("" if r["complete"] else ", incomplete")


def _verdict_cell(d: dict) -> str:
    """ "+1.22 (inconclusive; Holm p 0.514; MDE 3.46)": the adjusted p and MDE where the run's metrics.json has them
    (one written before issue 32 has the verdict only)."""
    extra = ""
    if "p_adj" in d:
        mde = (d.get("final") or {}).get("mde")
        extra = f"; Holm {_p_is({'p': d['p_adj']})}" + (f"; MDE {mde:.2f}" if mde is not None else "")
    return f"{d['delta_final']['mean']:+.2f} ({d['verdict']}{extra})"


def protocols_section(m: dict, other: dict | None) -> list[str]:
    """ "As written vs as run": this run beside the other protocol's run of the same scale, each
    number beside the study's figure."""
    if (
        not other
        or "preset" not in other
        or other["protocol"] == m["protocol"]
        or not other.get("models")
        or not m["models"]
    ):
        return []  # absent, of the same protocol, or written by an older version of this code
    if other["config"].get("model") != m["config"].get("model"):
        return []  # another base model: its differences are not the protocols'
    runs = {m["protocol"]: m, other["protocol"]: other}
    w, p = runs.get("written"), runs.get("published")
    if w is None or p is None:
        return []
    s = m["study"]
    lines = [
        "## As written vs as run",
        "",
        f"The same code run under both readings of the study: `written` (the write-up; {_run_extent(w)}) "
        f"by `{w['command']}`, "
        f"`published` (the study's code as run; {_run_extent(p)}) by `{p['command']}`. Mean [95 % CI] over seeds.",
        "",
        "| Model | Best, written | Best, published | Best (study) | "
        "Final, written | Final, published | Final (study) |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in w["models"]:
        if v in p["models"]:
            a, b = w["models"][v], p["models"][v]
            lines.append(
                f"| {LABELS[v]} | {_f(a['best_val_acc']['mean'])} {_ci(a['best_val_acc'])} | "
                f"{_f(b['best_val_acc']['mean'])} {_ci(b['best_val_acc'])} | {_f(s['best'].get(v))} | "
                f"{_f(a['final_val_acc']['mean'])} {_ci(a['final_val_acc'])} | {_f(b['final_val_acc']['mean'])} "
                f"{_ci(b['final_val_acc'])} | {_f(s['final'].get(v))} |"
            )
    lines += [
        "",
        "| Hypothesis | Final delta, written (verdict; Holm p; MDE) | Final delta, published (verdict; Holm p; "
        "MDE) | Study final | Best delta, written | Best delta, published | Study best |",
        "|---|---|---|---|---|---|---|",
    ]
    for h in ("H1", "H2"):
        a, b = w["hypotheses"].get(h), p["hypotheses"].get(h)
        if a and b:
            lines.append(
                f"| {h} ({a['compare']}) | {_verdict_cell(a)} | {_verdict_cell(b)} | "
                f"{a['study_delta']['final']:+.2f} | {a['delta_best']['mean']:+.2f} | {b['delta_best']['mean']:+.2f} | "
                f"{a['study_delta']['best']:+.2f} |"
            )
    ew, ep = w["engram"], p["engram"]
    if ew and ep:
        lines += ["", "| Engram (Model 3) | Written | Published | Study |", "|---|---|---|---|"]
        for name, key, digits, scale in ENGRAM_ROWS[:2]:
            own = [
                _msd(x["engram"][key], digits, scale) + ("" if engram_trains(x) else " (never trained)") for x in (w, p)
            ]
            lines.append(
                f"| {name}, Model 3's own compressor | {own[0]} | {own[1]} | {_f(s['engram'].get(key), digits)} |"
            )
            if "random_compressor" in ew and "random_compressor" in ep:
                lines.append(
                    f"| {name}, untrained compressors | {_msd(ew['random_compressor'][key], digits, scale)} | "
                    f"{_msd(ep['random_compressor'][key], digits, scale)} | – |"
                )
    return lines + [""]


def findings_sections(m: dict, study_engram: dict, other: dict | None) -> list[str]:
    """The sections both scripts' reports share, after their accuracy tables: the hypotheses, the
    extra sets, the engram, the ranks, the probes, the summary and the other protocol beside."""
    return [
        *hypothesis_section(m),
        *extra_section(m),
        *engram_section(m, study_engram),
        *rank_section(m),
        *probe_section(m),
        *summary_section(m),
        *protocols_section(m, other),
    ]


def figures_section() -> list[str]:
    """The two figures every run writes beside its REPORT.md."""
    return [
        "## Figures",
        "",
        "![learning curves](learning_curves.png)",
        "",
        "![engram clusters](engram_clusters.png)",
        "",
    ]
