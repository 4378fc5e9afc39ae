"""REPORT.md's evidence: the declared primary family (H1 and H2 at the final epoch, Holm), the
secondary tests (Benjamini–Hochberg), equivalence, power and the study's single run set against a
prediction interval, each sentence worded from those numbers. Formatting only: every number comes
from metrics.json."""

from __future__ import annotations

from analysis.equivalence import MARGINS, claim
from analysis.report_format import _ci, _ci_if_any, _msd, _p, _p_is
from analysis.stats import ALPHA, METHOD_NAMES, PRIMARY, SECONDARY, significant

WORDS = {"H1": "the LM head (dual_head − sentiment_only)", "H2": "the engram (dual_engram − dual_head)"}


def declaration() -> list[str]:
    """The families, named before any number of the report."""
    return [
        f"**Primary tests, declared before any number:** H1 and H2 at the final epoch (no selection on the validation "
        f"set), a paired t-test across seeds, {METHOD_NAMES[PRIMARY]}-adjusted together. Everything else (best-epoch "
        f"deltas, rank measures, held-out sets) is secondary, one {METHOD_NAMES[SECONDARY]} family. "
        "**Bold**, a verdict "
        f'other than inconclusive, and "beyond seed noise" mean an adjusted p < {ALPHA}, nothing else; "no effect" '
        "needs an equivalence test (paired TOST, margins fixed in code: ±1.0 point of accuracy and ± the study's own "
        "effect; TOST p is not adjusted).",
        "",
    ]


def pp(t: dict) -> str:
    """Raw and adjusted p side by side: "0.032 / 0.098"; "undefined" once when there is no test."""
    return "undefined" if t.get("p") is None else f"{_p(t)} / {_p({'p': t.get('p_adj')})}"


def _bold(text: str, t: dict) -> str:
    return f"**{text}**" if significant(t) else text


def tost_cell(t: dict) -> str:
    """Every margin's TOST p: "±1: 0.412; ±1.15: 0.301"."""
    return "; ".join(f"±{x['margin']:g}: {_p(x)}" for x in t.get("tost") or []) or "–"


def _mde(t: dict, digits=2) -> str:
    return "undefined" if t.get("mde") is None else f"{t['mde']:.{digits}f}"


def hypothesis_section(m: dict) -> list[str]:
    hyp, not_run = m["hypotheses"], m.get("hypotheses_not_run") or {}
    if not hyp:
        return (
            ["## Hypotheses H1 and H2", "", *(f"- {h}: not run: {why}." for h, why in not_run.items()), ""]
            if not_run
            else []
        )
    one = any(len(d["per_seed"]) < 2 for d in hyp.values())
    lines = [
        "## Hypotheses H1 and H2",
        "",
        "Delta = accuracy of the first model minus the second, in points. "
        "**Primary** (Holm over H1 and H2): the final-epoch "
        "delta, "
        + (
            "with one seed an exact McNemar test on the paired predictions. "
            if one
            else "a paired t-test across seeds. "
        )
        + "Beside it: its 95 % t-interval, a 95 % two-level bootstrap interval (seeds, then the validation sentences, "
        "from predictions.json), the share of seeds with a positive delta, TOST p at each margin, and the minimum "
        "detectable effect (MDE: the smallest true delta these seeds detect with 80 % power, two-sided, α = 0.05).",
        "",
        "| Hypothesis | Compare | Final delta (mean ± std) | 95 % CI (t) | 95 % CI (seeds × sentences) | Seeds > 0 | "
        "p raw / Holm | Verdict | TOST p | MDE (80 %) | What it shows |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for h, d in hyp.items():
        f, n = d["final"], len(d["per_seed"])
        boot = d.get("bootstrap_final")
        pos = "–" if f.get("share_positive") is None else f"{round(f['share_positive'] * n)} of {n}"
        lines.append(
            f"| {h} | {d['compare']} | {_bold(_msd(d['delta_final']), f)} | {_ci(d['delta_final'])} | "
            f"{_ci({'ci': boot['ci']}) if boot else '–'} | {pos} | {pp(f)} | {d['verdict']} | {tost_cell(f)} | "
            f"{_mde(f)} | {claim(f, unit=' points')} |"
        )
    reasons = [f"{h}: {d['reason']}" for h, d in hyp.items() if d.get("reason")]
    if reasons:
        lines += ["", "Undefined tests: " + "; ".join(reasons) + "."]
    if not_run:
        lines += ["", *(f"- {h}: not run: {why}." for h, why in not_run.items())]
    lines += [
        "",
        "**The study's single run against ours.** One run is one draw, so it is set against the 95 % prediction "
        "interval for one new seed (mean ± t·sd·√(1 + 1/n)), not against the interval of our mean; and the seeds a "
        "paired t-test would need to detect the study's effect with 80 % power at this run's own spread.",
        "",
        "| Hypothesis | Study final | 95 % prediction interval, one new seed | Inside? | Seeds needed (final) | "
        "Study best | Seeds needed (best) | Seeds here |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for h, d in hyp.items():
        pi, sn = d["delta_final"].get("prediction_interval"), d.get("seeds_needed") or {}
        inside = {True: "yes", False: "no", None: "–"}[d.get("study_in_prediction_interval")]
        lines.append(
            f"| {h} | {d['study_delta']['final']:+.2f} | {_ci({'ci': pi})} | {inside} | {sn.get('final') or '–'} | "
            f"{d['study_delta']['best']:+.2f} | {sn.get('best') or '–'} | {len(d['per_seed'])} |"
        )
    lines += [
        "",
        f"Secondary ({METHOD_NAMES[SECONDARY]}, with the rank measures and held-out sets): the delta at each "
        "model's best epoch (selected on the validation set it is measured on).",
        "",
        "| Hypothesis | Best delta (mean ± std) | 95 % CI | Study best | p raw / BH | Verdict | TOST p | MDE (80 %) | "
        "What it shows |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for h, d in hyp.items():
        b = d["best"]
        lines.append(
            f"| {h} | {_bold(_msd(d['delta_best']), b)} | {_ci(d['delta_best'])} | {d['study_delta']['best']:+.2f} | "
            f"{pp(b)} | {b['verdict']} | {tost_cell(b)} | {_mde(b)} | {claim(b, unit=' points')} |"
        )
    lines += [
        "",
        "McNemar per seed (final epoch): counts of examples only the first / only the second model gets right; "
        "raw p, one seed's sentences, not a test of the hypothesis across seeds.",
        "",
        "| Hypothesis | Seed | first only | second only | p |",
        "|---|---|---|---|---|",
    ]
    for h, d in hyp.items():
        for r in d["per_seed"]:
            mc = r["mcnemar_final"]
            lines.append(f"| {h} | {r['seed']} | {mc['a_only']} | {mc['b_only']} | {_p(mc)} |")
    return lines + [""]


def extra_section_tests(m: dict) -> list[str]:
    lines = [
        "",
        "| Set | Hypothesis | Delta at the selected epoch [95 % CI] | p raw / BH | Verdict | MDE (80 %) | "
        "Final-epoch delta [95 % CI] | p raw / BH | Verdict | MDE (80 %) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for h, d in m["hypotheses"].items():
        for k, e in d["extra"].items():
            a, f = e["at_best"], e["final"]
            lines.append(
                f"| {k} | {h} ({d['compare']}) | {a['delta']['mean']:+.2f} {_ci(a['delta'])} | {pp(a)} | "
                f"{a['verdict']} | "
                f"{_mde(a)} | {f['delta']['mean']:+.2f} {_ci(f['delta'])} | {pp(f)} | {f['verdict']} | {_mde(f)} |"
            )
    return lines + [""]


RANK_ROWS = [
    ("effective_rank", "Effective rank", 1),
    ("participation_ratio", "Participation ratio", 2),
    ("dims_90", "Dims for 90 % variance", 1),
    ("top1_share", "Top-1 variance share", 3),
]


def rank_tests(t: dict) -> list[str]:
    lines = [
        "",
        f"Paired over seeds ({t['compare']}); secondary tests ({METHOD_NAMES[SECONDARY]}); equivalence margins "
        + ", ".join(f"{name.lower()} ±{MARGINS[k]:g}" for k, name, _ in RANK_ROWS)
        + ":",
        "",
        "| Measure | Delta (mean [95 % CI]) | p raw / BH | Verdict | TOST p | MDE (80 %) |",
        "|---|---|---|---|---|---|",
    ]
    for k, name, d in RANK_ROWS:
        if k in t:
            x = t[k]
            p = pp(x) + (f" ({x['reason']})" if x.get("reason") else "")
            lines.append(
                f"| {name} | {x['delta']['mean']:+.{d + 1}f}{_ci_if_any(x['delta'], d + 1)} | {p} | "
                f"{_bold(x['verdict'], x)} | {tost_cell(x)} | {_mde(x, d + 1)} |"
            )
    return lines


def percentile_answer(pt: dict | None) -> str:
    """The answer the percentile test across seeds gives (bold yes/no only on p < α)."""
    if not pt:
        return "Not tested across seeds"
    if pt["p"] is None or pt["p"] >= ALPHA:
        return f"Not shown ({_p_is(pt)})"
    return f"{'Yes' if pt['mean'] > 0.5 else 'No, below a random draw'} ({_p_is(pt)})"


def h3_lines(e: dict, own: str) -> list[str]:
    """H3 as one measure: ARI, its per-seed percentile among that seed's untrained compressors, a test
    of those percentiles across seeds, and the tail rate with an interval over seeds."""
    t = e.get("random_tail")
    if not t or "percentile_test" not in t:
        return []
    pt, rate = t["percentile_test"], t["rate"]
    per = "; ".join(
        f"seed {x['seed']}: ARI {x['trained_ari']:.3f}, percentile {100 * x['percentile']:.1f}, "
        f"{x['at_or_above']}/{x['draws']} reach the study's"
        for x in t["per_seed"]
    )
    ci = f" [{100 * rate['ci'][0]:.1f}, {100 * rate['ci'][1]:.1f}]" if rate.get("ci") else ""
    pci = f" [{100 * pt['ci'][0]:.1f}, {100 * pt['ci'][1]:.1f}]" if pt.get("ci") else ""
    reads = (
        "beyond what a random draw gives"
        if pt["p"] is not None and pt["p"] < ALPHA and pt["mean"] > 0.5
        else "below what a random draw gives"
        if pt["p"] is not None and pt["p"] < ALPHA
        else "not shown to differ from one more random draw"
    )
    return [
        f"**Where the {own}'s ARI falls among its own seed's untrained compressors** "
        f"({t['draws'] // len(t['per_seed'])} "
        f"draws a seed, on the pooled states as `arrays.npz` keeps them, float16): {per}. Mean percentile "
        f"{100 * pt['mean']:.1f}{pci} ({pt['test']}, {_p_is(pt)}"
        + (f"; {pt['reason']}" if pt.get("reason") else "")
        + f"): {reads}.",
        "",
        f"**How often does a random projection reach the study's ARI ({t['threshold']:g})?** {t['at_or_above']} of "
        f"{t['draws']:,} untrained compressors: {100 * rate['mean']:.1f} % a seed on average, 95 % interval over seeds"
        f"{ci or ' (one seed: none)'} (the draws of one seed share its pooled states, so the seeds are the independent "
        f"units); the largest ARI of any draw is {t['max']:.3f}.",
        "",
    ]


def other_face(study_engram: dict) -> list[str]:
    """Cluster accuracy beside ARI is one measure, not two: for two clusters ARI ≈ (2·acc − 1)²."""
    ari, acc = study_engram.get("ari"), study_engram.get("cluster_accuracy")
    check = (
        f" (the study's: ARI {ari:g}, and (2·{acc / 100:.4f} − 1)² = {(2 * acc / 100 - 1) ** 2:.4f})"
        if ari is not None and acc is not None
        else ""
    )
    return [
        "Cluster accuracy is ARI's other face, not a second result: for two clusters ARI ≈ (2·acc − 1)²" + check + ".",
        "",
    ]


def findings(m: dict) -> list[str]:
    """The findings in words, each read off a table above it."""
    hyp = m["hypotheses"]
    lines = ["## Findings", ""]
    for h, d in hyp.items():
        f, n = d["final"], len(d["per_seed"])
        runs = f"{n} seeds" if n > 1 else "one seed"
        ci = f", 95 % CI {_ci(d['delta_final'])}" if d["delta_final"]["ci"] else ""
        boot = f", seeds × sentences {_ci(d['bootstrap_final'])}" if d.get("bootstrap_final") else ""
        adj = _p_is({"p": d.get("p_adj")}).replace("p", f"{METHOD_NAMES[PRIMARY]}-adjusted p", 1)
        pi = d["delta_final"].get("prediction_interval")
        study = (
            f"The study's single run ({d['study_delta']['final']:+.2f}) lies "
            f"{'inside' if d['study_in_prediction_interval'] else 'outside'} the 95 % prediction interval for one new "
            f"seed {_ci({'ci': pi})}"
            if pi
            else f"The study's single run gave {d['study_delta']['final']:+.2f}"
        )
        need = (d.get("seeds_needed") or {}).get("final")
        power = (
            f"; detecting an effect of the study's size at 80 % power would take {need} seeds at this spread ({n} here)"
            if need
            else ""
        )
        lines.append(
            f"- **{h}, {d['verdict']}.** Effect of {WORDS[h]} on final-epoch validation accuracy over {runs}: "
            f"{d['delta_final']['mean']:+.2f} points{ci}{boot} ({d['test']}, {_p_is(d)}, {adj}): "
            f"{claim(f, unit=' points')}"
            + (" (one seed: McNemar tests these sentences, not seed-to-seed variation)" if n == 1 else "")
            + f". {study}{power}."
        )
    t = m.get("rank_test")
    if t and "effective_rank" in t:
        er = t["effective_rank"]
        lines.append(
            f"- **Anti-collapse (rank), {er['verdict']}.** The LM head changes the effective rank of the pooled states "
            f"by {er['delta']['mean']:+.2f} (Model 2 − Model 1, {_p_is(er)}, BH-adjusted "
            f"{_p_is({'p': er.get('p_adj')})}): {claim(er)}."
        )
    eng = m["engram"]
    if eng:
        st = m["study"]["engram"]
        tail = (eng.get("random_tail") or {}).get("percentile_test")
        lines.append(
            f"- **H3.** K-Means on the engrams recovers sentiment with ARI {eng['ari']['mean']:.3f} "
            f"(study: {st['ari']}; "
            f"cluster accuracy {100 * eng['cluster_accuracy']['mean']:.1f} % is the same measure)"
            + (
                "; untrained compressors on the same pooled states give ARI "
                f"{eng['random_compressor']['ari']['mean']:.3f} "
                f"and the pooled states themselves {eng['pooled_kmeans']['ari']['mean']:.3f}"
                if "random_compressor" in eng
                else ""
            )
            + (
                f"; the engram's mean percentile among its seed's untrained compressors is {100 * tail['mean']:.1f} "
                f"({_p_is(tail)} against 50)"
                if tail
                else ""
            )
            + "."
        )
    return lines
