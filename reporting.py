"""REPORT.md: the study's tables filled with a run's numbers beside the study's, the controls, and
the findings in words. Formatting only: every number comes from metrics.json."""
from __future__ import annotations

from stats import ALPHA, mean_ci

LABELS = {"sentiment_only": "Model 1: Sentiment Only", "dual_head": "Model 2: Dual Head", "dual_engram": "Model 3: Dual + Engram"}
ENGRAM_ROWS = (("ARI", "ari", 3, 1), ("Cluster accuracy (%)", "cluster_accuracy", 1, 100),
               ("Within-class cosine", "within_class_cosine", 3, 1), ("Between-class cosine", "between_class_cosine", 3, 1))


def _f(x, digits=2, pct=False):
    if x is None:
        return "–"
    return f"{x:.{digits}f}" + ("%" if pct else "")


def _msd(stat: dict | None, digits=2, scale=1.0) -> str:
    if stat is None:
        return "–"
    if stat.get("std") is None:
        return _f(stat["mean"] * scale, digits)
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def _ci(stat: dict, digits=2, scale=1.0) -> str:
    return "–" if stat.get("ci") is None else f"[{stat['ci'][0] * scale:.{digits}f}, {stat['ci'][1] * scale:.{digits}f}]"


def _ci_if_any(stat: dict, digits=2) -> str:
    """" [lo, hi]" where there is a 95 % CI, else nothing (a single seed has none)."""
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


def report_header(m: dict, title: str) -> list[str]:
    lines = [f"# {title} — protocol `{m['protocol']}`", ""]
    if m.get("stopped"):
        lines += [f"> **Incomplete: stopped by {m['stopped']}**. The tables hold the finished variants only; "
                  "continue with the command below plus `--resume`.", ""]
    elif not m["complete"]:
        jobs = m.get("jobs")
        done = f" ({jobs['finished']} of {jobs['total']} jobs finished)" if jobs else ""
        lines += [f"> **Incomplete**{done}: this run is still going or stopped early; the tables hold the finished jobs only.", ""]
    failed = (m.get("jobs") or {}).get("failed") or []
    if failed:
        lines += [f"> **{len(failed)} job(s) failed**: " + "; ".join(f"`{f['job']}`: {f['error'] or 'no error line'}" for f in failed) +
                  f". Rerun what is missing (finished jobs are kept) with `{m['jobs']['rerun']}`.", ""]
    if m["shortened"]:
        lines += ["> **Shortened run** (fewer epochs or examples than the study): not comparable with the study's figures.", ""]
    if m.get("code_versions"):
        lines += [f"> **Trained under {len(m['code_versions'])} code versions** (a job resumed under edited code): "
                  + "; ".join(m["code_versions"]) + ".", ""]
    mach = m.get("machine", {})
    lines += [
        f"Command: `{m['command']}`",
        "",
        f"Protocol `{m['protocol']}`" + (f" with overrides {m['overrides']}" if m.get("overrides") else "") +
        f" · seeds: {', '.join(map(str, m['seeds']))} · device: {m['device']}" +
        (f" · threads: {mach['threads']}" if mach.get("threads") else "") +
        f" · train rows: {m['data']['train']:,} · validation rows: {m['data']['validation']:,}" +
        (f" · vocabulary: {m['data']['vocab_size']:,}" if m["data"].get("vocab_size") else ""),
        "",
    ]
    return lines


def accuracy_table(m: dict) -> list[str]:
    s = m["study"]
    multi = len(m["seeds"]) > 1
    head = "| Model | Best val (ours) | Final val (ours) |" + (" Best 95 % CI | Final 95 % CI |" if multi else "") + \
        " Best (study) | Final (study) | Params (total / trainable) | Minutes |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for v, mm in m["models"].items():
        row = f"| {LABELS[v]} | {_msd(mm['best_val_acc'])} | {_msd(mm['final_val_acc'])} |"
        if multi:
            row += f" {_ci(mm['best_val_acc'])} | {_ci(mm['final_val_acc'])} |"
        row += f" {_f(s['best'][v])} | {_f(s['final'][v])} | {mm['total_params']:,} / {mm['trainable_params']:,} | {_msd(mm['minutes'], 1)} |"
        lines.append(row)
    return lines + [""]


def per_seed_table(m: dict) -> list[str]:
    if len(m["seeds"]) < 2:
        return []
    lines = ["Per seed (best / final validation accuracy, %, and the best epoch):", "",
             "| Seed | " + " | ".join(LABELS[v] for v in m["models"]) + " |", "|---|" + "---|" * len(m["models"])]
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
    lines = ["## Held-out sets (`--extra-eval`)", "",
             "Accuracy (%) at the epoch with the best validation accuracy (the honest held-out number: the epoch is chosen "
             "on validation, not on this set) and at the final epoch; mean ± std [95 % CI] over seeds.", "",
             "| Set | Model | At the selected epoch | Final epoch |", "|---|---|---|---|"]
    for k in names:
        for v, mm in m["models"].items():
            e = mm["extra"][k]
            lines.append(f"| {k} | {LABELS[v]} | {_msd(e['at_best'])} {_ci(e['at_best'])} | {_msd(e['final'])} {_ci(e['final'])} |")
    lines += ["", "| Set | Hypothesis | Delta at the selected epoch [95 % CI] | p | Verdict | Final-epoch delta [95 % CI] | p | Verdict |",
              "|---|---|---|---|---|---|---|---|"]
    for h, d in m["hypotheses"].items():
        for k, e in d["extra"].items():
            a, f = e["at_best"], e["final"]
            lines.append(f"| {k} | {h} ({d['compare']}) | {a['delta']['mean']:+.2f} {_ci(a['delta'])} | {_p(a)} | {a['verdict']} | "
                         f"{f['delta']['mean']:+.2f} {_ci(f['delta'])} | {_p(f)} | {f['verdict']} |")
    return lines + [""]


def hypothesis_section(m: dict) -> list[str]:
    hyp, not_run = m["hypotheses"], m.get("hypotheses_not_run") or {}
    if not hyp:
        return ["## Hypotheses H1 and H2", "", *(f"- {h}: not run: {why}." for h, why in not_run.items()), ""] if not_run else []
    lines = [
        "## Hypotheses H1 and H2",
        "",
        "Delta = accuracy of the first model minus the second, in points, at the **final** epoch (no selection on the "
        "validation set) and at each model's **best** epoch, each beside the study's delta of the same kind. The verdict "
        "uses the final-epoch delta: across seeds a paired t-test of the per-seed deltas, with one seed an exact McNemar "
        f"test on the paired predictions; α = {ALPHA}. A test that is undefined (zero variance) is inconclusive.",
        "",
        "| Hypothesis | Compare | Final delta (mean ± std) | 95 % CI | Study final | Best delta | Study best | Test | p | Verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for h, d in hyp.items():
        lines.append(
            f"| {h} | {d['compare']} | {_msd(d['delta_final'])} | {_ci(d['delta_final'])} | {d['study_delta']['final']:+.2f} | "
            f"{_msd(d['delta_best'])} | {d['study_delta']['best']:+.2f} | {d['test']} | {_p(d)} | **{d['verdict']}** |"
        )
    reasons = [f"{h}: {d['reason']}" for h, d in hyp.items() if d.get("reason")]
    if reasons:
        lines += ["", "Undefined tests: " + "; ".join(reasons) + "."]
    if not_run:
        lines += ["", *(f"- {h}: not run: {why}." for h, why in not_run.items())]
    lines += ["", "McNemar per seed (final epoch): counts of examples only the first / only the second model gets right.", "",
              "| Hypothesis | Seed | first only | second only | p |", "|---|---|---|---|---|"]
    for h, d in hyp.items():
        for r in d["per_seed"]:
            mc = r["mcnemar_final"]
            lines.append(f"| {h} | {r['seed']} | {mc['a_only']} | {mc['b_only']} | {_p(mc)} |")
    return lines + [""]


def engram_section(m: dict, study_engram: dict) -> list[str]:
    e = m["engram"]
    if not e:
        return []
    lines = ["## Engram clustering (H3)", "",
             "K-Means (k = 2) on each validation sentence's own engram (zero-engram pass) of the final model; mean ± std over seeds.", "",
             "| Metric | Ours | Study |", "|---|---|---|"]
    for name, key, digits, scale in ENGRAM_ROWS:
        study = study_engram.get(key)  # as the study's results file gives it (4 decimals)
        lines.append(f"| {name} | {_msd(e[key], digits, scale)} | {'–' if study is None else f'{study:g}'} |")
    lines.append("")
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
    lines = ["### Control: is the organisation the engram's, or the pooled state's?", "",
             ("" if trains else "Under this preset no engram is ever fed back (the engram passed in is always zero), so no "
              "loss reaches Model 3's compressor: its engram is a random projection of the pooled states, one more draw "
              "of the control's kind, with this seed's initialisation. ") +
             f"The same measures on the same pooled validation states of Model 3: its {'trained' if trains else 'own'} compressor; {rc['draws']} "
             "freshly initialised, never trained compressors of the same shape (mean ± std [min, max] over all draws of all "
             "seeds); and K-Means on the pooled states themselves. Probe = 5-fold logistic regression.", "",
             "| Features | " + " | ".join(r[0] for r in ENGRAM_ROWS) + " | Probe accuracy (%) |", "|---|" + "---|" * (len(ENGRAM_ROWS) + 1)]
    lines.append(f"| {own.capitalize()} | " + " | ".join(_msd(e[k], d, s) for _, k, d, s in ENGRAM_ROWS) +
                 f" | {_msd(e['trained_probe_accuracy'], 1, 100)} |")
    lines.append("| Untrained compressor | " + " | ".join(
        f"{_msd(rc[k], d, s)} [{rc[k]['min'] * s:.{d}f}, {rc[k]['max'] * s:.{d}f}]" for _, k, d, s in ENGRAM_ROWS) +
        f" | {_msd(rc['probe_accuracy'], 1, 100)} |")
    lines.append("| Pooled state (K-Means on it) | " + " | ".join(_msd(pk[k], d, s) for _, k, d, s in ENGRAM_ROWS) +
                 f" | {_msd(e['pooled_probe_accuracy'], 1, 100)} |")
    above = [a for a in e["above_random"] if a["above"]]
    n = len(e["above_random"])
    if len(above) == n:
        words = f"in every seed ({n} of {n}) the {own}'s ARI lies above all of that seed's random draws"
    elif not above:
        words = f"in no seed (0 of {n}) does the {own}'s ARI rise above that seed's random draws"
    else:
        words = f"in {len(above)} of {n} seeds the {own}'s ARI lies above all of that seed's random draws"
    better = len(above) == n
    lines += ["", f"**Does the {own} separate sentiment better than a random projection?** "
                  f"{'Yes' if better else 'No'}: {words} ({own.split()[0]} ARI {_msd(e['ari'], 3)}, random {_msd(rc['ari'], 3)}, "
                  f"pooled state {_msd(pk['ari'], 3)}).", ""]
    return lines + tail_lines(e, own)


def tail_lines(e: dict, own: str) -> list[str]:
    """How often an untrained compressor reaches the study's ARI, and Model 3's own engram's."""
    t = e.get("random_tail")
    if not t:
        return []
    per = "; ".join(f"seed {x['seed']}: {x['at_or_above']}/{x['draws']}" for x in t["per_seed"])
    trained = "; ".join(f"seed {x['seed']} ({x['trained_ari']:.3f}): {100 * x['fraction_at_or_above_trained']:.1f} %"
                        for x in t["per_seed"])
    return [f"**How often does a random projection reach the study's ARI ({t['threshold']:g})?** {t['at_or_above']} of "
            f"{t['draws']:,} untrained compressors ({100 * t['fraction']:.2f} %; {per}); the largest ARI of any draw is "
            f"{t['max']:.3f}. Untrained compressors reaching the {own}'s own ARI: {trained}. "
            f"({t['draws'] // len(t['per_seed'])} draws a seed, on the pooled states as `arrays.npz` keeps them, float16.)", ""]


def ablation_section(m: dict) -> list[str]:
    runs = [r for r in m["models"]["dual_engram"]["runs"] if r["analysis"]]
    base = runs[0]["analysis"]["ablation"]["base"]
    others = [mode for mode in ("pair", "zero", "shuffled") if mode != base]
    lines = ["### Does the model read its engram? (evaluation ablation, Model 3, final epoch)", "",
             f"Validation accuracy with the engrams it is evaluated with (`{base}`), and with the other conditions; "
             "\"changed\" counts the predictions that differ from those, out of the predictions whose engram differs "
             "(under `pair` the first half of every batch already has a zero engram, so against `zero` only the second halves can change).", "",
             f"| Seed | {base} | " + " | ".join(others) + " |", "|---|---|" + "---|" * len(others)]
    for r in runs:
        ab = r["analysis"]["ablation"]
        cells = [f"{ab[mode]:.2f} ({ab[f'changed_{mode}']} of {ab[f'could_change_{mode}']} changed)" for mode in others]
        lines.append(f"| {r['seed']} | {ab[base]:.2f} | " + " | ".join(cells) + " |")
    return lines + [""]


def rank_section(m: dict) -> list[str]:
    rows = [(v, mm["rank"]) for v, mm in m["models"].items() if "rank" in mm]
    if not rows:
        return []
    keys = [("effective_rank", "Effective rank", 1), ("participation_ratio", "Participation ratio", 2),
            ("dims_90", "Dims for 90 % variance", 1), ("top1_share", "Top-1 variance share", 3)]
    lines = ["## Rank of the pooled states (the study's anti-collapse explanation of H1)", "",
             "Per model, over the pooled validation states of the final model (centred): effective rank (exp of the entropy "
             "of the normalised singular values), participation ratio, principal axes holding 90 % of the variance, and the "
             "first axis's share; mean ± std [95 % CI] over seeds.", "",
             "| Model | " + " | ".join(k[1] for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for v, rk in rows:
        lines.append(f"| {LABELS[v]} | " + " | ".join(_msd_ci(rk.get(k), d) for k, _, d in keys) + " |")
    t = m.get("rank_test")
    if t:
        lines += ["", f"Paired over seeds ({t['compare']}):", "", "| Measure | Delta (mean [95 % CI]) | p | Verdict |", "|---|---|---|---|"]
        for k, name, d in keys:
            if k in t:
                p = _p(t[k]) + (f" ({t[k]['reason']})" if t[k].get("reason") else "")
                lines.append(f"| {name} | {t[k]['delta']['mean']:+.{d + 1}f}{_ci_if_any(t[k]['delta'], d + 1)} | {p} | **{t[k]['verdict']}** |")
    return lines + [""]


def probe_section(m: dict) -> list[str]:
    rows = []
    for v, mm in m["models"].items():
        for key, what in (("probe_pooled", "pooled hidden state"), ("probe_engram", "engram")):
            stats = [r["analysis"][key] for r in mm["runs"] if r["analysis"] and key in r["analysis"]]
            if stats:
                acc, ctl, sel = (mean_ci([100 * s[k] for s in stats]) for k in ("accuracy", "control_accuracy", "selectivity"))
                rows.append(f"| {LABELS[v]} | {what} | {_msd(acc)} | {_msd(ctl)} | {_msd(sel)} |")
    if not rows:
        return []
    return ["## Probes", "",
            "5-fold cross-validated logistic regression of sentiment on validation features of the final model; "
            "control = the same probe on shuffled labels; selectivity = accuracy − control (points).", "",
            "| Model | Features | Probe accuracy | Control accuracy | Selectivity |", "|---|---|---|---|---|", *rows, ""]


def history_section(m: dict) -> list[str]:
    seed = m["seeds"][0]
    lines = ["## Per-epoch history" + (f" (seed {seed})" if len(m["seeds"]) > 1 else ""), ""]
    extra_names = sorted({k for mm in m["models"].values() for r in mm["runs"] for h in r["history"] for k in h["extra"]})
    for v, mm in m["models"].items():
        run = next((r for r in mm["runs"] if r["seed"] == seed), None)
        if run is None:
            continue
        lines += [f"**{LABELS[v]}**", "",
                  "| Epoch | Train loss | Train sent | Train LM | Train acc | Val acc | Val sent | Val LM |" +
                  "".join(f" {n} acc |" for n in extra_names) + " Seconds |",
                  "|---|---|---|---|---|---|---|---|" + "---|" * len(extra_names) + "---|"]
        for h in run["history"]:
            extra = "".join(f" {_f(h['extra'].get(n, {}).get('acc'))} |" for n in extra_names)
            lines.append(
                f"| {h['epoch']} | {_f(h['train_loss'], 4)} | {_f(h['train_sent_loss'], 4)} | {_f(h['train_lm_loss'], 4)} | "
                f"{_f(h['train_acc'])} | {_f(h['val_acc'])} | {_f(h['val_sent_loss'], 4)} | {_f(h['val_lm_loss'], 4)} |{extra} {h['seconds']:.1f} |"
            )
        lines.append("")
    return lines


def summary_section(m: dict) -> list[str]:
    """The findings in words, each read off a table above it in the report."""
    hyp, eng = m["hypotheses"], m["engram"]
    if not hyp:
        return []
    lines = ["## Findings", ""]
    words = {"H1": "the LM head (dual_head − sentiment_only)", "H2": "the engram (dual_engram − dual_head)"}
    for h, d in hyp.items():
        n = len(d["per_seed"])
        runs = f"{n} seeds" if n > 1 else "one seed"
        ci = f", 95 % CI {_ci(d['delta_final'])}" if d["delta_final"]["ci"] else ""
        why = f"; {d['reason']}" if d.get("reason") else ""
        lines.append(f"- **{h}, {d['verdict']}.** Effect of {words[h]} on final-epoch validation accuracy over {runs}: "
                     f"{d['delta_final']['mean']:+.2f} points{ci} ({d['test']}, {_p_is(d)}{why}); the study's final-epoch "
                     f"delta from one run was {d['study_delta']['final']:+.2f} (best-epoch: ours {d['delta_best']['mean']:+.2f}, "
                     f"study {d['study_delta']['best']:+.2f}).")
    t = m.get("rank_test")
    if t and "effective_rank" in t:
        er = t["effective_rank"]
        lines.append(f"- **Anti-collapse (rank), {er['verdict']}.** The LM head changes the effective rank of the pooled states by "
                     f"{er['delta']['mean']:+.2f} (Model 2 − Model 1, {_p_is(er)}" + (f"; {er['reason']}" if er.get("reason") else "") + ").")
    if eng:
        st = m["study"]["engram"]
        lines.append(f"- **H3.** K-Means on the engrams recovers sentiment with ARI {eng['ari']['mean']:.3f} and cluster accuracy "
                     f"{100 * eng['cluster_accuracy']['mean']:.1f} % (study: {st['ari']}, {st['cluster_accuracy']} %)" +
                     (f"; untrained compressors on the same pooled states give ARI {eng['random_compressor']['ari']['mean']:.3f} "
                      f"and the pooled states themselves {eng['pooled_kmeans']['ari']['mean']:.3f}." if "random_compressor" in eng else "."))
        runs = [r["analysis"]["ablation"] for r in m["models"]["dual_engram"]["runs"] if r["analysis"]]
        key = "zero" if runs[0]["base"] != "zero" else "pair"
        changed = [f"{a[f'changed_{key}']} of {a[f'could_change_{key}']}" for a in runs]
        lines.append(f"- **Is the engram read?** Switching the engrams to `{key}` changes {', '.join(changed)} validation "
                     "predictions that could change, per seed (ablation table above).")
    return lines + [""]


def _run_extent(r: dict) -> str:
    """How much of a run the numbers stand on: its finished seeds, and whether it is cut short."""
    done = min((len(v["runs"]) for v in r["models"].values()), default=0)
    n = len(r["seeds"])
    extent = f"{done} of {n} seeds finished" if done < n else f"{n} seed{'s' * (n != 1)}"
    return extent + (", shortened" if r["shortened"] else "") + ("" if r["complete"] else ", incomplete")


def protocols_section(m: dict, other: dict | None) -> list[str]:
    """"As written vs as run": this run beside the other protocol's run of the same scale, each
    number beside the study's figure."""
    if not other or "preset" not in other or other["protocol"] == m["protocol"] or not other.get("models") or not m["models"]:
        return []  # absent, of the same protocol, or written by an older version of this code
    if other["config"].get("model") != m["config"].get("model"):
        return []  # another base model: its differences are not the protocols'
    runs = {m["protocol"]: m, other["protocol"]: other}
    w, p = runs.get("written"), runs.get("published")
    if w is None or p is None:
        return []
    s = m["study"]
    lines = ["## As written vs as run", "",
             f"The same code run under both readings of the study: `written` (the write-up; {_run_extent(w)}) by `{w['command']}`, "
             f"`published` (the study's code as run; {_run_extent(p)}) by `{p['command']}`. Mean [95 % CI] over seeds.", "",
             "| Model | Best, written | Best, published | Best (study) | Final, written | Final, published | Final (study) |",
             "|---|---|---|---|---|---|---|"]
    for v in w["models"]:
        if v in p["models"]:
            a, b = w["models"][v], p["models"][v]
            lines.append(f"| {LABELS[v]} | {_f(a['best_val_acc']['mean'])} {_ci(a['best_val_acc'])} | "
                         f"{_f(b['best_val_acc']['mean'])} {_ci(b['best_val_acc'])} | {_f(s['best'][v])} | "
                         f"{_f(a['final_val_acc']['mean'])} {_ci(a['final_val_acc'])} | {_f(b['final_val_acc']['mean'])} "
                         f"{_ci(b['final_val_acc'])} | {_f(s['final'][v])} |")
    lines += ["", "| Hypothesis | Final delta, written (verdict) | Final delta, published (verdict) | Study final | "
              "Best delta, written | Best delta, published | Study best |", "|---|---|---|---|---|---|---|"]
    for h in ("H1", "H2"):
        a, b = w["hypotheses"].get(h), p["hypotheses"].get(h)
        if a and b:
            lines.append(f"| {h} ({a['compare']}) | {a['delta_final']['mean']:+.2f} ({a['verdict']}) | "
                         f"{b['delta_final']['mean']:+.2f} ({b['verdict']}) | {a['study_delta']['final']:+.2f} | "
                         f"{a['delta_best']['mean']:+.2f} | {b['delta_best']['mean']:+.2f} | {a['study_delta']['best']:+.2f} |")
    ew, ep = w["engram"], p["engram"]
    if ew and ep:
        lines += ["", "| Engram (Model 3) | Written | Published | Study |", "|---|---|---|---|"]
        for name, key, digits, scale in ENGRAM_ROWS[:2]:
            own = [_msd(x["engram"][key], digits, scale) + ("" if engram_trains(x) else " (never trained)") for x in (w, p)]
            lines.append(f"| {name}, Model 3's own compressor | {own[0]} | {own[1]} | {_f(s['engram'].get(key), digits)} |")
            if "random_compressor" in ew and "random_compressor" in ep:
                lines.append(f"| {name}, untrained compressors | {_msd(ew['random_compressor'][key], digits, scale)} | "
                             f"{_msd(ep['random_compressor'][key], digits, scale)} | – |")
    return lines + [""]
