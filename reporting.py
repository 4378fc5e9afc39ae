"""Statistics, metrics.json, learning-curve plots and REPORT.md, shared by both experiments."""
from __future__ import annotations

import math
import platform
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from engram import plot_engram_clusters
from models import VARIANTS
from training import load_arrays, run_study, save_figure, write_atomic, write_json

LABELS = {"sentiment_only": "Model 1: Sentiment Only", "dual_head": "Model 2: Dual Head", "dual_engram": "Model 3: Dual + Engram"}
HYPOTHESES = {"H1": ("dual_head", "sentiment_only"), "H2": ("dual_engram", "dual_head")}
ALPHA = 0.05


# ----------------------------------------------------------------------------- statistics


def mcnemar_exact(correct_a, correct_b) -> dict:
    """Exact (binomial) two-sided McNemar test on paired correctness vectors.
    b = A right and B wrong, c = A wrong and B right."""
    from scipy.stats import binomtest

    a = np.asarray(correct_a, bool)
    b_ = np.asarray(correct_b, bool)
    b = int(np.sum(a & ~b_))
    c = int(np.sum(~a & b_))
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)
    return {"a_only": b, "b_only": c, "p": p}


def mean_ci(values, confidence: float = 0.95) -> dict:
    """Mean, sample std and a t-based confidence interval (None with fewer than two values)."""
    from scipy.stats import t

    v = np.asarray(values, float)
    out = {"n": int(len(v)), "mean": float(v.mean()), "std": None, "ci": None}
    if len(v) >= 2:
        sd = float(v.std(ddof=1))
        half = float(t.ppf(0.5 + confidence / 2, len(v) - 1) * sd / math.sqrt(len(v)))
        out.update(std=sd, ci=[out["mean"] - half, out["mean"] + half])
    return out


def paired_t_p(a, b) -> float | None:
    """Two-sided paired t-test p-value of a - b; None with fewer than two pairs, 1.0 when every
    difference is equal to zero."""
    from scipy.stats import ttest_rel

    d = np.asarray(a, float) - np.asarray(b, float)
    if len(d) < 2:
        return None
    if np.allclose(d, d[0]):
        return 1.0 if d[0] == 0 else 0.0
    return float(ttest_rel(a, b).pvalue)


def verdict(delta: float, p: float | None) -> str:
    if p is None or p >= ALPHA:
        return "inconclusive"
    return "supported" if delta > 0 else "refuted"


# ----------------------------------------------------------------------------- metrics.json


def run_header(scale: str, script: str, argv: list[str], args, default_epochs: int) -> dict:
    """The first fields of metrics.json that both scripts write: what was run, and with what settings."""
    return {
        "scale": scale,
        "command": f"python {script} " + shlex.join(argv),
        "shortened": args.epochs < default_epochs or args.max_train is not None or args.max_eval is not None,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }


def data_source(args, extra: dict) -> dict:
    """Where the data came from, and the size of each --extra-eval set (the end of metrics.json's "data")."""
    return {"source": str(args.data_dir) if args.data_dir else "hub:stanfordnlp/sst2",
            "extra": {k: len(v) for k, v in extra.items()}}


def device_name(device) -> str:
    if device.type != "cuda":
        return str(device)
    return f"{device} ({torch.cuda.get_device_name(device)})"


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "scikit-learn", "numpy", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _run_summary(seed: int, r: dict) -> dict:
    hist = r["history"]
    return {
        "seed": seed,
        "history": hist,
        "best_val_acc": r["best"]["acc"] if r["best"] else None,
        "best_epoch": r["best"]["epoch"] if r["best"] else None,
        "final_val_acc": hist[-1]["val_acc"] if hist else None,
        "minutes": r["seconds"] / 60,
        "analysis": r.get("analysis"),
    }


def _correct(rec: dict, labels) -> np.ndarray:
    return np.asarray(rec["pred"]) == np.asarray(labels)


def hypotheses(results: dict, labels, study: dict) -> dict:
    """H1 and H2 per seed (McNemar on final-epoch predictions) and across seeds (paired t-test
    of the final accuracy differences); best-epoch deltas beside them, as the study reports."""
    out = {}
    seeds = [s for s in results if all(v in results[s] for v in VARIANTS)]
    for h, (a, b) in HYPOTHESES.items():
        per_seed, fa, fb, ba, bb = [], [], [], [], []
        for s in seeds:
            ra, rb = results[s][a], results[s][b]
            per_seed.append({
                "seed": s,
                "delta_best": ra["best"]["acc"] - rb["best"]["acc"],
                "delta_final": ra["history"][-1]["val_acc"] - rb["history"][-1]["val_acc"],
                "mcnemar_final": mcnemar_exact(_correct(ra["final"], labels), _correct(rb["final"], labels)),
            })
            fa.append(ra["history"][-1]["val_acc"])
            fb.append(rb["history"][-1]["val_acc"])
            ba.append(ra["best"]["acc"])
            bb.append(rb["best"]["acc"])
        if not seeds:
            continue
        deltas = np.asarray(fa) - np.asarray(fb)
        p = paired_t_p(fa, fb) if len(seeds) >= 2 else per_seed[0]["mcnemar_final"]["p"]
        out[h] = {
            "compare": f"{a} - {b}",
            "per_seed": per_seed,
            "delta_final": mean_ci(deltas),
            "delta_best": mean_ci(np.asarray(ba) - np.asarray(bb)),
            "test": "paired t-test across seeds" if len(seeds) >= 2 else "exact McNemar (one seed)",
            "p": p,
            "verdict": verdict(float(deltas.mean()), p),
            "study_delta": study["deltas"][h],
        }
    return out


def build_metrics(scale: str, results: dict, labels, complete: bool, header: dict, study: dict) -> dict:
    models = {}
    for v in VARIANTS:
        runs = [(s, results[s][v]) for s in results if v in results[s]]
        if not runs:
            continue
        summaries = [_run_summary(s, r) for s, r in runs]
        models[v] = {
            "total_params": runs[0][1]["total"],
            "trainable_params": runs[0][1]["trainable"],
            "info": runs[0][1].get("info", {}),
            "runs": summaries,
            "best_val_acc": mean_ci([x["best_val_acc"] for x in summaries]),
            "final_val_acc": mean_ci([x["final_val_acc"] for x in summaries]),
            "minutes": mean_ci([x["minutes"] for x in summaries]),
        }
    engram = {}
    if "dual_engram" in models:
        runs = [r["analysis"] for r in models["dual_engram"]["runs"]]
        for key in ("ari", "cluster_accuracy", "within_class_cosine", "between_class_cosine"):
            engram[key] = mean_ci([a["engram"][key] for a in runs])
        engram["per_seed"] = [{"seed": r["seed"], **r["analysis"]["engram"]} for r in models["dual_engram"]["runs"]]
    return {
        "scale": scale,
        "complete": complete,
        **header,
        "models": models,
        "engram": engram,
        "hypotheses": hypotheses(results, labels, study),
        "study": study,
    }


def predictions(results: dict, labels) -> dict:
    return {
        "labels": list(map(int, labels)),
        "runs": {str(s): {v: {"best": r["best"], "final": r["final"]} for v, r in by_v.items()} for s, by_v in results.items()},
    }


# ----------------------------------------------------------------------------- plots


def _series(metrics: dict, variant: str, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Mean over seeds of a history column, per epoch."""
    runs = metrics["models"][variant]["runs"]
    rows = [[h[key] for h in r["history"]] for r in runs]
    if not rows or any(x is None for row in rows for x in row):
        return None
    n = min(len(r) for r in rows)
    y = np.asarray([r[:n] for r in rows], float).mean(0)
    return np.arange(1, n + 1), y


def learning_curves(metrics: dict, panels: list[tuple[str, list[tuple[str, str]]]]):
    """One panel per (title, [(history key, line style label)]); three models per panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colours = dict(zip(VARIANTS, ("tab:blue", "tab:orange", "tab:green")))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    n_seeds = max(len(m["runs"]) for m in metrics["models"].values())
    for ax, (title, keys) in zip(axes[0], panels):
        for v in metrics["models"]:
            for (key, style), ls in zip(keys, ("-", "--")):
                s = _series(metrics, v, key)
                if s is not None:
                    ax.plot(*s, ls, marker="o", ms=3, color=colours[v], label=f"{v} ({style})")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    suffix = f" (mean of {n_seeds} seeds)" if n_seeds > 1 else ""
    fig.suptitle(f"{metrics['scale']} experiment: learning curves{suffix}")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- REPORT.md


def _f(x, digits=2, pct=False):
    if x is None:
        return "–"
    return f"{x:.{digits}f}" + ("%" if pct else "")


def _msd(stat: dict, digits=2) -> str:
    if stat is None:
        return "–"
    if stat.get("std") is None:
        return _f(stat["mean"], digits)
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _ci(stat: dict, digits=2) -> str:
    return "–" if stat.get("ci") is None else f"[{stat['ci'][0]:.{digits}f}, {stat['ci'][1]:.{digits}f}]"


def report_header(m: dict, title: str) -> list[str]:
    lines = [f"# {title}", ""]
    if not m["complete"]:
        lines += ["> **Incomplete**: this run is still going or stopped early; the tables hold the finished variants only.", ""]
    if m["shortened"]:
        lines += ["> **Shortened run** (fewer epochs or examples than the study): not comparable with the study's figures.", ""]
    lines += [
        f"Command: `{m['command']}`",
        "",
        f"Seeds: {', '.join(map(str, m['seeds']))} · device: {m['device']} · train rows: {m['data']['train']:,} · "
        f"validation rows: {m['data']['validation']:,}" + (f" · vocabulary: {m['data']['vocab_size']:,}" if m["data"].get("vocab_size") else ""),
        "",
    ]
    return lines


def accuracy_table(m: dict) -> list[str]:
    s = m["study"]
    multi = len(m["seeds"]) > 1
    head = "| Model | Best val (ours) | Final val (ours) |" + (" Best 95 % CI | Final 95 % CI |" if multi else "") + " Best (study) | Final (study) | Params (total / trainable) | Minutes |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for v, mm in m["models"].items():
        row = f"| {LABELS[v]} | {_msd(mm['best_val_acc'])} | {_msd(mm['final_val_acc'])} |"
        if multi:
            row += f" {_ci(mm['best_val_acc'])} | {_ci(mm['final_val_acc'])} |"
        sf = s.get("final", {}).get(v)
        row += f" {_f(s['best'][v])} | {_f(sf)} | {mm['total_params']:,} / {mm['trainable_params']:,} | {_msd(mm['minutes'], 1)} |"
        lines.append(row)
    return lines + [""]


def per_seed_table(m: dict) -> list[str]:
    if len(m["seeds"]) < 2:
        return []
    lines = ["Per seed (best / final validation accuracy, %):", "", "| Seed | " + " | ".join(LABELS[v] for v in m["models"]) + " |", "|---|" + "---|" * len(m["models"])]
    for i, seed in enumerate(m["seeds"]):
        cells = []
        for v, mm in m["models"].items():
            r = mm["runs"][i] if i < len(mm["runs"]) else None
            cells.append(f"{_f(r['best_val_acc'])} / {_f(r['final_val_acc'])} (ep {r['best_epoch']})" if r else "–")
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return lines + [""]


def hypothesis_section(m: dict) -> list[str]:
    hyp = m["hypotheses"]
    if not hyp:
        return []
    lines = [
        "## Hypotheses H1 and H2",
        "",
        "Delta = accuracy of the first model minus the second, in points. The verdict uses the final-epoch "
        "accuracy (no selection on the validation set): across seeds a paired t-test of the per-seed deltas, "
        f"with one seed an exact McNemar test on the paired predictions; α = {ALPHA}.",
        "",
        "| Hypothesis | Compare | Final delta (mean ± std) | 95 % CI | Best delta | Study's delta (best) | Test | p | Verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for h, d in hyp.items():
        lines.append(
            f"| {h} | {d['compare']} | {_msd(d['delta_final'])} | {_ci(d['delta_final'])} | {_msd(d['delta_best'])} | "
            f"{d['study_delta']:+.2f} | {d['test']} | {_f(d['p'], 3)} | **{d['verdict']}** |"
        )
    lines += ["", "McNemar per seed (final epoch): counts of examples only the first / only the second model gets right.", "",
              "| Hypothesis | Seed | first only | second only | p |", "|---|---|---|---|---|"]
    for h, d in hyp.items():
        for r in d["per_seed"]:
            mc = r["mcnemar_final"]
            lines.append(f"| {h} | {r['seed']} | {mc['a_only']} | {mc['b_only']} | {mc['p']:.3f} |")
    return lines + [""]


def engram_section(m: dict, study_engram: dict) -> list[str]:
    if not m["engram"]:
        return []
    e = m["engram"]
    rows = [("Adjusted Rand Index", "ari", 3), ("Cluster accuracy (%)", "cluster_accuracy", 2),
            ("Within-class cosine", "within_class_cosine", 3), ("Between-class cosine", "between_class_cosine", 3)]
    lines = ["## Engram clustering (H3)", "",
             "K-Means (k = 2) on each validation sentence's own engram (zero-prefix pass) of the final model.", "",
             "| Metric | Ours | Study |", "|---|---|---|"]
    for name, key, digits in rows:
        stat = dict(e[key])
        scale = 100 if key == "cluster_accuracy" else 1
        stat = {**stat, "mean": stat["mean"] * scale, "std": None if stat["std"] is None else stat["std"] * scale}
        lines.append(f"| {name} | {_msd(stat, digits)} | {_f(study_engram.get(key), digits)} |")
    lines.append("")
    runs = m["models"]["dual_engram"]["runs"]
    lines += ["### Does the model read its engram? (evaluation ablation, Model 3, final epoch)", "",
              "| Seed | trained pairing | zero engram | shuffled engram |", "|---|---|---|---|"]
    verdicts = []
    for r in runs:
        ab = r["analysis"]["ablation"]
        verdicts.append(ab["changed_zero"] == 0 and ab["changed_shuffled"] == 0)
        lines.append(f"| {r['seed']} | {ab['pair']:.2f} | {ab['zero']:.2f} ({ab['changed_zero']} changed) | "
                     f"{ab['shuffled']:.2f} ({ab['changed_shuffled']} changed) |")
    n_val = m["data"]["validation"]
    if all(verdicts):
        lines += ["", "Every prediction is the same under the three conditions: **the model ignores its engram** when it classifies.", ""]
    else:
        worst = max(max(abs(r["analysis"]["ablation"]["pair"] - r["analysis"]["ablation"][k]) for k in ("zero", "shuffled")) for r in runs)
        lines += ["", f"\"changed\" counts the {n_val} validation predictions that differ from the trained pairing. The prefix "
                      f"changes some predictions; accuracy moves by at most {worst:.2f} points between conditions. A model that "
                      "ignored its engram would change none.", ""]
    return lines


def probe_section(m: dict) -> list[str]:
    rows = []
    for v, mm in m["models"].items():
        for key, what in (("probe_pooled", "pooled hidden state"), ("probe_engram", "engram")):
            stats = [r["analysis"][key] for r in mm["runs"] if r["analysis"] and key in r["analysis"]]
            if stats:
                acc = mean_ci([100 * s["accuracy"] for s in stats])
                ctl = mean_ci([100 * s["control_accuracy"] for s in stats])
                sel = mean_ci([100 * s["selectivity"] for s in stats])
                rows.append(f"| {LABELS[v]} | {what} | {_msd(acc)} | {_msd(ctl)} | {_msd(sel)} |")
    if not rows:
        return []
    return ["## Probes", "",
            "5-fold cross-validated logistic regression of sentiment on validation features of the final model; "
            "control = the same probe on shuffled labels; selectivity = accuracy − control (points).", "",
            "| Model | Features | Probe accuracy | Control accuracy | Selectivity |", "|---|---|---|---|---|", *rows, ""]


def history_section(m: dict, seed_index: int = 0) -> list[str]:
    lines = ["## Per-epoch history" + (f" (seed {m['seeds'][seed_index]})" if len(m["seeds"]) > 1 else ""), ""]
    extra_names = sorted({k for mm in m["models"].values() for r in mm["runs"] for h in r["history"] for k in h["extra"]})
    for v, mm in m["models"].items():
        if seed_index >= len(mm["runs"]):
            continue
        lines += [f"**{LABELS[v]}**", "",
                  "| Epoch | Train loss | Train sent | Train LM | Train acc | Val acc | Val sent | Val LM |" + "".join(f" {n} acc |" for n in extra_names) + " Seconds |",
                  "|---|---|---|---|---|---|---|---|" + "---|" * len(extra_names) + "---|"]
        for h in mm["runs"][seed_index]["history"]:
            extra = "".join(f" {_f(h['extra'].get(n, {}).get('acc'))} |" for n in extra_names)
            lines.append(
                f"| {h['epoch']} | {_f(h['train_loss'], 4)} | {_f(h['train_sent_loss'], 4)} | {_f(h['train_lm_loss'], 4)} | "
                f"{_f(h['train_acc'])} | {_f(h['val_acc'])} | {_f(h['val_sent_loss'], 4)} | {_f(h['val_lm_loss'], 4)} |{extra} {h['seconds']:.1f} |"
            )
        lines.append("")
    return lines


# ----------------------------------------------------------------------------- writing a run's outputs


def write_outputs(out, results: dict, labels, complete: bool, header: dict, study: dict, panels, report_fn, figure_arrays_fn):
    """metrics.json, predictions.json, learning_curves.png, engram_clusters.png and REPORT.md, each
    written atomically. `report_fn(metrics)` returns the report's text; `figure_arrays_fn(seed)`
    returns the engram arrays of that seed's dual_engram run."""
    m = build_metrics(header["scale"], results, labels, complete, {k: v for k, v in header.items() if k != "scale"}, study)
    write_json(out / "metrics.json", m)
    write_json(out / "predictions.json", predictions(results, labels))
    if m["models"]:
        save_figure(learning_curves(m, panels), out / "learning_curves.png")
    first = m["seeds"][0]
    if "dual_engram" in results.get(first, {}):
        a = figure_arrays_fn(first)
        e = results[first]["dual_engram"]["analysis"]["engram"]
        title = (f"{header['scale']} engrams ({a['engrams'].shape[1]}-d, seed {first}): "
                 f"ARI {e['ari']:.3f}, cluster accuracy {100 * e['cluster_accuracy']:.1f}%")
        save_figure(plot_engram_clusters(a["engrams"], a["labels"], a["clusters"], title, first), out / "engram_clusters.png")
    write_atomic(out / "REPORT.md", report_fn(m))
    return m


def summary_section(m: dict) -> list[str]:
    """The findings in words, each read off a table above it in the report."""
    hyp, eng = m["hypotheses"], m["engram"]
    if not hyp:
        return []
    lines = ["## Findings", ""]
    words = {"H1": "the LM head (dual_head − sentiment_only)", "H2": "the engram (dual_engram − dual_head)"}
    for h, d in hyp.items():
        n = len(d["per_seed"])  # seeds with all three variants finished
        runs = f"{n} seeds" if n > 1 else "one seed"
        ci = f", 95 % CI {_ci(d['delta_final'])}" if d["delta_final"]["ci"] else ""
        lines.append(f"- **{h}, {d['verdict']}.** Effect of {words[h]} on final validation accuracy over {runs}: "
                     f"{d['delta_final']['mean']:+.2f} points{ci} ({d['test']}, p = {_f(d['p'], 3)}); the study reported "
                     f"{d['study_delta']:+.2f} from one run.")
    if eng:
        probes = [r["analysis"]["probe_engram"] for r in m["models"]["dual_engram"]["runs"]]
        sel = mean_ci([100 * p["selectivity"] for p in probes])
        lines.append(f"- **H3.** K-Means on the engrams recovers sentiment with ARI {eng['ari']['mean']:.3f} and cluster accuracy "
                     f"{100 * eng['cluster_accuracy']['mean']:.1f} % (study: {m['study']['engram']['ari']}, "
                     f"{m['study']['engram']['cluster_accuracy']} %); a linear probe on the engrams is "
                     f"{sel['mean']:.1f} points above its shuffled-label control.")
        changed = [r["analysis"]["ablation"]["changed_zero"] for r in m["models"]["dual_engram"]["runs"]]
        span = f"{min(changed)}" if min(changed) == max(changed) else f"{min(changed)}–{max(changed)}"
        lines.append(f"- **Is the engram read?** Replacing every engram with zero changes {span} of "
                     f"{m['data']['validation']} validation predictions per seed (ablation table above).")
    return lines + [""]


def run_and_report(recipe, args, train, evals, out, header: dict, study: dict, panels, report_fn) -> dict:
    """Run every variant for every seed, rewriting all outputs after each finished variant."""
    state = {}

    def on_progress(results, complete):
        if recipe.device.type == "cuda":
            header["peak_gpu_gib"] = torch.cuda.max_memory_allocated(recipe.device) / 2**30
        state["metrics"] = write_outputs(out, results, evals["validation"].labels, complete, header, study, panels,
                                         report_fn, lambda seed: load_arrays(out, seed, "dual_engram"))

    run_study(recipe, args.seeds, train, evals, out, args.resume, header["config"], on_progress)
    print(f"wrote {out}/metrics.json, REPORT.md, learning_curves.png, engram_clusters.png")
    return state["metrics"]

