"""REPORT.md of a causal-LM run (experiment_7b.py): the shared sections (analysis/reporting.py) with
the study's per-epoch accuracies and training dynamics beside ours, and the cross-scale table."""

from __future__ import annotations

from analysis import reporting as rep
from analysis.metrics import HYPOTHESES, subject
from analysis.report_format import LABELS, mean_std, number
from analysis.study_figures import BIG_STUDY, SMALL_STUDY
from models import VARIANTS


def report_7b(m: dict, small: dict | None, other: dict | None = None) -> str:
    s = m["study"]
    model = subject(m)
    lines = rep.report_header(
        m, f"Experiment 2: {model} with {'QLoRA' if m['config'].get('load_in_4bit', True) else 'LoRA'} on SST-2"
    )
    first = next(iter(m["models"].values()), None)
    if first:
        lines += [
            f"Trainable parameters: {first['trainable_params']:,} of {first['total_params']:,} "
            f"({first['info'].get('trainable_percent', 0):.2f} %; study: ~41 M of ~4.4 B, 0.94 %) · compute dtype "
            f"{first['info'].get('compute_dtype')}",
            "",
        ]
    lines += ["## Validation accuracy (%)", "", *rep.accuracy_table(m), *rep.per_seed_table(m)]
    lines += [
        "### Per epoch, beside the study (first seed)",
        "",
        "| Model | "
        + " | ".join(f"Epoch {e} (ours / study)" for e in range(1, 4))
        + " | Minutes (ours / study, RTX 4080) |",
        "|---|---|---|---|---|",
    ]
    for v, mm in m["models"].items():
        hist = mm["runs"][0]["history"]
        study = s["epochs"].get(v, [None] * 3)  # a variant the study did not have: "–"
        cells = [f"{number(hist[e]['val_acc']) if e < len(hist) else '–'} / {number(study[e])}" for e in range(3)]
        ours, theirs = f"{mm['runs'][0]['minutes']:.1f}", s["minutes"].get(v, "–")
        lines.append(f"| {LABELS[v]} | " + " | ".join(cells) + f" | {ours} / {theirs} |")
    lines += loss_comparison(m, s)
    lines += rep.findings_sections(m, s["engram"], other)
    lines += cross_scale_section(small, m)
    lines += rep.figures_section()
    lines += rep.history_section(m)
    return "\n".join(lines)


def loss_comparison(m: dict, s: dict) -> list[str]:
    """The last epoch's training losses and the validation LM loss per epoch beside the study's,
    averaged as the study's code averages them: the mean over batches of each batch's mean (Model 3:
    of the mean of its two halves). Runs made before those columns existed show "–" there."""

    def bm(h: dict, key: str, digits: int = 4) -> str:
        return number(h.get(f"{key}_batch_mean"), digits)

    lines = [
        "### Training dynamics, last epoch (first seed)",
        "",
        "Losses as the study averages them: the mean over the epoch's batches of each batch's mean loss "
        "(Model 3: the mean of its two halves'). metrics.json also holds them per example (sentiment) and "
        "per target token (LM) over the whole epoch.",
        "",
        "| Model | Train loss | Train sent loss | Train LM loss | Train acc (%) | Study (loss / sent / LM / acc) |",
        "|---|---|---|---|---|---|",
    ]
    for v, mm in m["models"].items():
        h = mm["runs"][0]["history"][-1]
        st = " / ".join("–" if x is None else f"{x}" for x in s["train_epoch3"].get(v, [None] * 4))
        lines.append(
            f"| {LABELS[v]} | {number(h['train_loss'], 4)} | {bm(h, 'train_sent_loss')} | "
            f"{bm(h, 'train_lm_loss')} | {number(h['train_acc'])} | {st} |"
        )
    lines += ["", "Validation LM loss per epoch, the mean over batches of each batch's mean (ours → … / study):", ""]
    for v, mm in m["models"].items():
        hist = mm["runs"][0]["history"]
        if hist[0]["val_lm_loss"] is not None:
            ours = " → ".join(bm(h, "val_lm_loss") for h in hist)
            lines.append(f"- {LABELS[v]}: {ours} / {' → '.join(str(x) for x in s['val_lm_loss'].get(v, ['–']))}")
    return lines + [""]


def cross_scale_section(small: dict | None, big: dict) -> list[str]:
    """1.3 M from scratch (ours and the study's) · this run's model (ours) · 7B (the study's), each
    delta beside the study's of the same kind."""
    if not small or "preset" not in small or not small.get("models") or not big.get("models"):
        return []
    name = subject(big)
    cols = [
        (f"Small, 1.3 M from scratch (`{small['protocol']}`; ours / study)", small, SMALL_STUDY),
        (f"{name}, pretrained (`{big['protocol']}`; ours)", big, None),
        ("Qwen2.5-7B (study)", None, BIG_STUDY),
    ]
    lines = [
        "## Cross-scale comparison",
        "",
        f"Small run: `{small['command']}`.",
        "",
        "| Measure | " + " | ".join(c[0] for c in cols) + " |",
        "|---|---|---|---|",
    ]

    def row(label, ours, theirs):
        cells = []
        for _, m, st in cols:
            mine = None if m is None else ours(m)
            study_value = None if st is None else theirs(st)
            cells.append(" / ".join(x for x in (mine, study_value) if x is not None) or "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    for v in VARIANTS:
        row(
            f"Best validation accuracy, {LABELS[v]} (%)",
            lambda m, v=v: number(m["models"][v]["best_val_acc"]["mean"]) if v in m["models"] else "–",
            lambda st, v=v: number(st["best"].get(v)),
        )
    for h in ("H1", "H2"):
        for kind in ("best", "final"):
            row(
                f"{h} delta, {kind} epoch (points)",
                lambda m, h=h, k=kind: (
                    f"{m['hypotheses'][h][f'delta_{k}']['mean']:+.2f}" if h in m["hypotheses"] else "–"
                ),
                lambda st, h=h, k=kind: f"{st['deltas'][k][h]:+.2f}",
            )
        row(
            f"{h} verdict (final epoch, across seeds)",
            lambda m, h=h: m["hypotheses"][h]["verdict"] if h in m["hypotheses"] else "–",
            lambda st: None,
        )
    row(
        "Engram ARI",
        lambda m: mean_std(m["engram"].get("ari"), 3) if m["engram"] else "–",
        lambda st: f"{st['engram']['ari']}",
    )
    row(
        "Engram cluster accuracy (%)",
        lambda m: mean_std(m["engram"].get("cluster_accuracy"), 1, 100) if m["engram"] else "–",
        lambda st: f"{st['engram']['cluster_accuracy']}",
    )
    row(
        "ARI of untrained compressors (control)",
        lambda m: (
            mean_std(m["engram"]["random_compressor"]["ari"], 3) if "random_compressor" in m.get("engram", {}) else "–"
        ),
        lambda st: None,
    )
    for v in reversed(HYPOTHESES["H1"]):  # the LM head's pair: the rank it keeps
        row(
            f"Effective rank of pooled states, {LABELS[v]}",
            lambda m, v=v: (
                mean_std(m["models"][v].get("rank", {}).get("effective_rank"), 1) if v in m["models"] else "–"
            ),
            lambda st: None,
        )
    return lines + [""]
