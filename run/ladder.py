"""Which difference does what: a ladder from one reading of the study to the other, one difference
at a time, each rung an ordinary run (the command line with `--rung NAME`, or `--protocol OTHER`) in
OUT/ladder/<rung>/. LADDER.md, ladder.json and ladder.png set every rung beside the base (mean ± std
over seeds, the paired difference with its 95 % interval) and re-test the study's H1 on each rung."""

from __future__ import annotations

import inspect
import shlex
from pathlib import Path

from analysis.equivalence import MARGINS, claim, equivalent, margin_for
from analysis.figures import _pyplot, curve_data, wrapped
from analysis.metrics import delta_test
from analysis.report_evidence import pp, tost_cell
from analysis.reporting import LABELS, _f
from analysis.stats import SECONDARY, adjust_family, mean_ci, significant
from models import VARIANTS
from protocols import ladder, other_protocol, rungs_for
from run.grid import continue_command
from run.settings import Run
from run.study import read_metrics
from train.files import save_figure, write_atomic, write_json
from train.stop import Interrupted, JobsFailed, check_stop

LADDER_MARGINS = ("accuracy", "best_epoch", "effective_rank", "ari")  # the margins the ladder's measures use
# (key, label, digits): what each rung is measured by, per model
MEASURES = (
    ("best_val_acc", "best val (%)", 2),
    ("final_val_acc", "final val (%)", 2),
    ("best_epoch", "epoch of the best", 1),
    ("epoch1_train_acc", "epoch-1 train (%)", 1),
    ("effective_rank", "effective rank", 1),
    ("engram_ari", "engram ARI", 3),
    ("random_ari", "untrained-compressor ARI", 3),
)


def _drop(argv: list[str], flag: str, values: int) -> list[str]:
    """argv without `flag` and the `values` words after it (any of `--flag=x` too)."""
    out, skip = [], 0
    for i, a in enumerate(argv):
        if skip:
            skip -= 1
            if values < 0 and a.startswith("--"):  # nargs="+": up to the next flag
                skip = 0
                out.append(a)
            continue
        if a == flag:
            skip = values if values >= 0 else len(argv)
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def rung_argv(
    argv: list[str], out: Path, name: str, variants: tuple[str, ...], base: str, other: str, wanted: list[str]
) -> list[str] | None:
    """The command line of one rung: the user's, less --ladder, --out, --variants and --protocol,
    with the rung's own; None when the rung has none of the wanted variants."""
    keep = [v for v in VARIANTS if v in variants and v in wanted]
    if not keep:
        return None
    rest = _drop(_drop(_drop(_drop(argv, "--ladder", 0), "--out", 1), "--variants", -1), "--protocol", 1)
    protocol = other if name == "other" else base
    rung = [] if name in ("base", "other") else ["--rung", name]
    return ["--protocol", protocol, *rung, *rest, "--out", str(out / "ladder" / name), "--variants", *keep]


def run_ladder(main, argv: list[str], run: Run, presets: dict, out: Path, executor: str = "serial") -> dict:
    """Run (or submit) every rung in turn through `main`, then write the ladder's report; a rung whose
    jobs failed leaves the others to run, and a stop writes the report of what has finished first.
    --report-only writes only the ladder's report (each rung's jobs rewrite the rung's own outputs)."""
    base, other = run.protocol, other_protocol(presets, run.protocol)
    script = Path(inspect.getfile(main)).name  # experiment.py or experiment_7b.py, however it was started
    command = f"python {script} {shlex.join(a for a in argv if a != '--report-only')}"  # what trains the ladder
    seeds, wanted = list(run.seeds), list(run.variants)
    report = lambda: write_ladder(out / "ladder", presets, base, seeds, wanted, command)  # noqa: E731
    if run.report_only:
        return report()
    failed = []
    for name, variants, _ in ladder(presets, rungs_for(presets), base):
        rung = rung_argv(argv, out, name, variants, base, other, wanted)
        if rung is None:
            continue
        try:
            check_stop(f"the ladder, before rung {name}")  # a signal between two rungs
            print(f"\n== ladder rung {name}: python {script} {shlex.join(rung)}")
            try:
                main(rung)  # its own cli_main turns a stop into SystemExit(128 + signal), after one line
            except SystemExit as e:
                if isinstance(e.code, int) and e.code > 128:
                    raise Interrupted(f"the ladder stopped in rung {name}", e.code - 128) from None
                if e.code not in (0, None, 1):  # 1: some of its jobs failed, and the rest goes on
                    raise
                failed.append(name)
        except Interrupted as e:
            report()
            again = continue_command(command, executor)
            raise Interrupted(
                f"{e}; {out / 'ladder' / 'LADDER.md'} names what is missing; continue with: {again}", e.signum
            ) from None
    summary = report()
    if failed:
        raise JobsFailed(
            f"ladder rungs with unfinished jobs: {', '.join(failed)}; rerun the same command to finish them"
        )
    return summary


# ----------------------------------------------------------------------------- the report


def _per_seed(m: dict, variant: str) -> dict[int, dict]:
    """Each seed's measures of one model of one rung's metrics.json."""
    out = {}
    for r in m["models"].get(variant, {}).get("runs", []):
        a = r.get("analysis") or {}
        out[r["seed"]] = {
            "best_val_acc": r["best_val_acc"],
            "final_val_acc": r["final_val_acc"],
            "best_epoch": r["best_epoch"],
            "epoch1_train_acc": r["history"][0]["train_acc"],
            "effective_rank": (a.get("rank") or {}).get("effective_rank"),
            "engram_ari": (a.get("engram") or {}).get("ari"),
            "random_ari": ((a.get("random_compressor") or {}).get("summary") or {}).get("ari", {}).get("mean"),
        }
    return out


def _read(folder: Path) -> dict | None:
    return read_metrics(folder / "metrics.json")


def ladder_summary(
    root: Path, presets: dict, base: str, seeds: list[int], wanted=VARIANTS, command: str | None = None
) -> dict:
    """ladder.json: per rung, what it changes, the command the ladder runs for it and the one that
    wrote its outputs, which of its jobs (the rung's models that were asked for, times the seeds)
    have not finished, and per model each measure's mean ± std over seeds and its difference from
    the base rung (paired by seed). `command` is the ladder's own command line."""
    rungs = ladder(presets, rungs_for(presets), base)
    words = shlex.split(command) if command else []
    runs = {name: _read(root / name) for name, _, _ in rungs}
    base_seeds = {v: _per_seed(runs["base"], v) for v in VARIANTS} if runs["base"] else {}
    out = {"base": base, "other": other_protocol(presets, base), "seeds": seeds, "command": command, "rungs": []}
    for name, variants, fields in rungs:
        m = runs[name]
        asked = [v for v in VARIANTS if v in variants and v in wanted]
        if not asked:
            continue
        cells = {v: _per_seed(m, v) if m else {} for v in asked}
        missing = {v: [s for s in seeds if s not in cells[v]] for v in asked}
        entry = {
            "rung": name,
            "changes": {k: (list(v) if isinstance(v, tuple) else v) for k, v in fields.items()},
            "variants": asked,
            "made_by": m["command"] if m else None,
            "command": (
                shlex.join(words[:2] + rung_argv(words[2:], root.parent, name, variants, base, out["other"], wanted))
                if words
                else m["command"]
                if m
                else None
            ),
            "missing": {v: s for v, s in missing.items() if s},
            "complete": not any(missing.values()),
            "models": {},
        }
        for v in asked:
            mine = {s: x for s, x in cells[v].items() if s in seeds}
            if not mine:
                continue
            row = {}
            for key, _, _ in MEASURES:
                vals = {s: x[key] for s, x in mine.items() if x[key] is not None}
                if not vals:
                    continue
                row[key] = mean_ci(list(vals.values()))
                ref = {s: x[key] for s, x in base_seeds.get(v, {}).items() if x[key] is not None}
                both = [s for s in vals if s in ref]
                if name != "base" and both:
                    t = delta_test(
                        [vals[s] for s in both], [ref[s] for s in both], ("higher", "lower"), [margin_for(key)]
                    )
                    row[key]["vs_base"] = {"seeds": both, **t}
            entry["models"][v] = row
        entry["lm_head"] = lm_head_effect(m) if m else None
        out["rungs"].append(entry)
    apply_family(out)
    return out


def apply_family(s: dict) -> dict:
    """The ladder's one family, Benjamini–Hochberg: every rung-versus-base test and every LM-head
    test. Each test gets its adjusted p (in place); s["family"] says how many there are and survive."""
    tests = [st["vs_base"] for r in s["rungs"] for v in r["models"].values() for st in v.values() if st.get("vs_base")]
    for r in s["rungs"]:
        e = r.get("lm_head") or {}
        tests += [e[k] for k in ("final_val_acc", "effective_rank") if e.get(k) and "p" in e[k]]
    for t in tests:
        t.setdefault("words", ["higher", "lower"])
    adjust_family(tests, SECONDARY, "the ladder: every rung-versus-base test and every LM-head test")
    s["family"] = {"method": SECONDARY, "size": len(tests), "significant": sum(significant(t) for t in tests)}
    return s


def lm_head_effect(m: dict) -> dict | None:
    """The study's H1 and its rank explanation on one rung (Model 2 − Model 1, paired by seed, over
    the rung's own seeds), from the rung's metrics.json; None when the rung did not train both. The
    raw p, TOST and MDE come from the rung; the adjusted p from the ladder's family."""
    h1, rank = m.get("hypotheses", {}).get("H1"), (m.get("rank_test") or {}).get("effective_rank")
    if not h1:
        return None
    keep = ("delta", "p", "reason", "tost", "mde")

    def test(t: dict | None, delta: dict) -> dict:
        return {**{k: (t or {}).get(k) for k in keep}, "delta": delta, "words": ["higher", "lower"]}

    final = test(h1.get("final") or {"p": h1["p"]}, h1["delta_final"])
    return {
        "seeds": [r["seed"] for r in h1["per_seed"]],
        "final_val_acc": final,
        "best_val_acc": {"delta": h1["delta_best"]},
        "effective_rank": rank and test(rank, rank["delta"]),
    }


def moves(stat: dict) -> bool:
    """A rung moves a measure beyond seed noise: the paired t-test against the base, Benjamini–Hochberg
    adjusted over the whole ladder, rejects no change at 5 %. Equal differences on every seed give no
    test, so no claim."""
    return significant(stat.get("vs_base") or {})


def equal(stat: dict) -> bool:
    """A rung is shown to leave a measure within its margin of the base (TOST), and is not different."""
    vs = stat.get("vs_base") or {}
    return not significant(vs) and equivalent(vs) is not None


def ladder_markdown(s: dict) -> str:
    apply_family(s)  # bold follows the family's adjusted p, however the summary was made
    lines = [f"# Which difference does what: from `{s['base']}` to `{s['other']}`, one difference at a time", ""]
    if s.get("command"):
        lines += [f"Made by `{s['command']}`; the same command with `--resume` runs whatever is missing.", ""]
    done = [r for r in s["rungs"] if r["complete"]]
    if len(done) < len(s["rungs"]):
        todo = "; ".join(
            f"`{r['rung']}`: "
            + (
                ", ".join(
                    f"{v} seed{'s' * (len(x) > 1)} {' '.join(map(str, x))}" for v, x in r.get("missing", {}).items()
                )
                or "unfinished"
            )
            for r in s["rungs"]
            if not r["complete"]
        )
        lines += [
            f"> **Incomplete ladder**: {len(done)} of {len(s['rungs'])} rungs finished. Not finished yet: {todo}.",
            "",
        ]
    fam = s.get("family") or {}
    size, survive = fam.get("size", 0), fam.get("significant", 0)
    shown = ", ".join(f"{k.replace('_', ' ')} ±{v:g}" for k, v in MARGINS.items() if k in LADDER_MARGINS)
    lines += [
        "Each rung is the base protocol with one difference switched to the other protocol's setting; `base` "
        "and `other` are the two ends. Mean ± std over seeds; Δ is the rung minus the base, paired by seed, "
        "with its 95 % t-interval, then p raw / adjusted. **One family**: every rung-versus-base test and every "
        f"LM-head test below ({size} paired t-tests), Benjamini–Hochberg; **bold** and \"beyond seed noise\" "
        f"mean an adjusted p < 0.05, nothing else ({survive} of {size}). "
        "Under each Δ: the TOST p against the measure's "
        f"equivalence margin (fixed in code: {shown}) and the minimum detectable effect at 80 % power (MDE) over "
        "these seeds. A Δ neither bold nor inside its margin shows neither an effect nor its absence.",
        "",
    ]
    for r in s["rungs"]:
        changes = ", ".join(f"{k}={v}" for k, v in r["changes"].items()) or "nothing (the base)"
        lines.append(f"- `{r['rung']}`: {changes}" + ("" if r.get("made_by") else " (not run yet)"))
    lines.append("")
    for v in VARIANTS:
        rows = [r for r in s["rungs"] if v in r["models"]]
        if not rows:
            continue
        keys = [(k, label, d) for k, label, d in MEASURES if any(k in r["models"][v] for r in rows)]
        lines += [
            f"## {LABELS[v]}",
            "",
            "| Rung | " + " | ".join(label for _, label, _ in keys) + " |",
            "|---|" + "---|" * len(keys),
        ]
        for r in rows:
            cells = []
            for k, _, d in keys:
                st = r["models"][v].get(k)
                if st is None:
                    cells.append("–")
                    continue
                cell = f"{_f(st['mean'], d)}" + (f" ± {st['std']:.{d}f}" if st.get("std") is not None else "")
                vs = st.get("vs_base")
                if vs and vs["delta"].get("ci"):
                    mde = "–" if vs.get("mde") is None else f"{vs['mde']:.{d}f}"
                    cell += "<br>" + _delta(vs, d, "Δ ") + f"<br>p {pp(vs)}<br>TOST {tost_cell(vs)} · MDE {mde}"
                cells.append(cell)
            lines.append(f"| `{r['rung']}` | " + " | ".join(cells) + " |")
        lines.append("")
    lines += lm_head_markdown(s)
    movers = [
        (r["rung"], v, label, r, k)
        for r in s["rungs"]
        for v in r["models"]
        for k, label, _ in MEASURES
        if k in r["models"][v] and moves(r["models"][v][k])
    ]
    lines += ["## What moves beyond seed noise (BH-adjusted p < 0.05)", ""]
    lines += [
        f"- `{rung}` moves {LABELS[v]}'s {label}: {claim(r['models'][v][k]['vs_base'], 2)}"
        for rung, v, label, r, k in movers
    ] or ["- nothing"]
    same = [
        (r, v, k, label)
        for r in s["rungs"]
        for v in r["models"]
        for k, label, _ in MEASURES
        if k in r["models"][v] and equal(r["models"][v][k])
    ]
    lines += ["", "## What is shown unchanged (TOST p < 0.05 inside the measure's margin; TOST p unadjusted)", ""]
    lines += [
        f"- `{r['rung']}` leaves {LABELS[v]}'s {label} {claim(r['models'][v][k]['vs_base'])}" for r, v, k, label in same
    ] or ["- nothing: no rung is shown equivalent to the base on any measure"]
    lines += [
        "",
        "![validation curves of every rung](ladder.png)",
        "",
        "Each rung's own command, as the ladder runs it "
        "(an ordinary run: with `--resume` it finishes what is missing):",
        "",
    ]
    lines += [f"- `{r['rung']}`: `{r['command']}`" for r in s["rungs"] if r["command"]]
    return "\n".join(lines) + "\n"


def _delta(d: dict, digits: int, prefix: str = "") -> str:
    """A paired difference {delta, p_adj} as "mean [95 % CI]", bold when the ladder's adjusted p is
    below 5 % (for a rung's vs_base, exactly when moves() says so)."""
    ci = d["delta"].get("ci")
    text = prefix + f"{d['delta']['mean']:+.{digits}f}" + (f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if ci else "")
    return f"**{text}**" if significant(d) else text


def lm_head_markdown(s: dict) -> list[str]:
    """The LM head's effect re-tested on every rung that trains Models 1 and 2: which rung removes it."""
    rows = [r for r in s["rungs"] if r.get("lm_head")]
    if not rows:
        return []
    lines = [
        "## The LM head on each rung",
        "",
        "The study's H1 and its rank explanation on every rung that trains Models 1 and 2: Model 2 − Model 1, paired "
        "by seed over the rung's seeds, with the 95 % t-interval and p raw / adjusted (the ladder's one family); "
        "**bold**: adjusted p < 0.05 (best val is not tested); the last column says what the final-val Δ "
        "shows.",
        "",
        "| Rung | seeds | final val Δ (points) | best val Δ (points) | effective rank Δ | final val Δ shows |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        e = r["lm_head"]
        f, er = e["final_val_acc"], e.get("effective_rank")
        rank = f"{_delta(er, 1)}<br>p {pp(er)}" if er else "–"
        lines.append(
            f"| `{r['rung']}` | {len(e['seeds'])} | {_delta(f, 2)}<br>p {pp(f)} | "
            f"{_delta(e['best_val_acc'], 2)} | {rank} | {claim(f, unit=' points')} |"
        )
    return lines + [""]


def ladder_figure(root: Path, s: dict):
    """Validation accuracy per epoch of every rung (mean over seeds), one panel per model."""
    plt = _pyplot()
    panels = [v for v in VARIANTS if any(v in r["models"] for r in s["rungs"])]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5.5 * max(len(panels), 1), 4.6), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, v in zip(axes[0], panels):
        for i, r in enumerate(s["rungs"]):
            m = _read(root / r["rung"])
            data = curve_data(m, v, "val_acc") if m and v in m.get("models", {}) else None
            if data is None:
                continue
            x, mean, _ = data
            style = "-" if r["rung"] not in ("base", "other") else "--"
            colour = "black" if r["rung"] == "base" else cmap(i % 10)  # a model's own colour would repeat a rung's
            ax.plot(
                x, mean, style, marker="o", ms=3, color=colour, label=r["rung"], linewidth=2.2 if style == "--" else 1.4
            )
        ax.set_title(f"{LABELS[v]}: validation accuracy (%)")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        wrapped(f"ladder from {s['base']} to {s['other']}: mean over seeds; dashed = the two ends", fig.get_figwidth())
    )
    fig.tight_layout()
    return fig


def write_ladder(
    root: Path, presets: dict, base: str, seeds: list[int], wanted=VARIANTS, command: str | None = None
) -> dict:
    s = ladder_summary(root, presets, base, seeds, wanted, command)
    write_json(root / "ladder.json", s)
    write_atomic(root / "LADDER.md", ladder_markdown(s))
    if any(r["models"] for r in s["rungs"]):
        save_figure(ladder_figure(root, s), root / "ladder.png")
    print(f"wrote {root}/LADDER.md, ladder.json, ladder.png")
    return s
