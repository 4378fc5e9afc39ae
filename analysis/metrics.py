"""What metrics.json and predictions.json hold: the run's header (command, protocol, settings,
machine), per-model summaries over seeds, the hypothesis tests, and the controls' summaries."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np

from analysis.bootstrap import two_level_ci
from analysis.equivalence import accuracy_margins, delta_evidence, margin_for, seeds_needed
from analysis.stats import PRIMARY, SECONDARY, adjust_family, mcnemar_exact, mean_ci
from models import VARIANTS, engram_variant
from train.provenance import code_version, describe_code

HYPOTHESES = {"H1": ("dual_head", "sentiment_only"), "H2": ("dual_engram", "dual_head")}
RANK_KEYS = ("effective_rank", "participation_ratio", "dims_90", "top1_share")
ENGRAM_KEYS = ("ari", "cluster_accuracy", "within_class_cosine", "between_class_cosine")


# ----------------------------------------------------------------------------- the header


def subject(m: dict) -> str:
    """What a run trained, for titles: "small transformers", or the base model's name
    ("Qwen2.5-7B", "SmolLM2-135M-Instruct.Q4_1.gguf"), never just the scale."""
    model = m.get("config", {}).get("model")
    return "small transformers" if m["scale"] == "small" or not model else Path(str(model)).name


def setting(m: dict) -> str:
    """The protocol a run used, for titles, with what it changed: "written", "written, rung engram
    (engram_feedback=False)", "written (lm_weight=0.3)": a rung's figure must not read as its base's."""
    rung = (m.get("config") or {}).get("rung")
    changed = ", ".join(f"{k}={v}" for k, v in (m.get("overrides") or {}).items())
    return m.get("protocol", "written") + (f", rung {rung}" if rung else "") + (f" ({changed})" if changed else "")


def user_argv(argv: list[str]) -> list[str]:
    """The command line as the user typed it: without the --job an executor adds to start one job,
    and without --report-only (a rewrite renders what the training command made, and names that)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--report-only":
            continue
        elif a == "--job":
            skip = True
        elif not a.startswith("--job="):
            out.append(a)
    return out


def run_header(
    scale: str, script: str, argv: list[str], config: dict, shortened: bool, preset, overrides: dict
) -> dict:
    """The first fields of metrics.json that both scripts write: what was run, and with what settings
    (`config`: the command line's record, run.settings.Settings.config)."""
    import dataclasses

    return {
        "scale": scale,
        "protocol": preset.name,
        "command": f"python {script} " + shlex.join(user_argv(argv)),
        "shortened": shortened,
        "preset": dataclasses.asdict(preset),
        "overrides": overrides,
        "config": config,
        "code": code_version(),
    }


def data_source(data_dir: Path | None, extra: dict) -> dict:
    """Where the data came from, and the size of each --extra-eval set (the end of metrics.json's "data")."""
    return {
        "source": str(data_dir) if data_dir else "hub:stanfordnlp/sst2",
        "extra": {k: len(v) for k, v in extra.items()},
    }


# ----------------------------------------------------------------------------- per model


def _run_summary(seed: int, r: dict) -> dict:
    hist = r["history"]
    best_epoch = r["best"]["epoch"] if r["best"] else None
    extra_names = sorted(hist[0]["extra"]) if hist else []
    return {
        "seed": seed,
        "history": hist,
        "best_val_acc": r["best"]["acc"] if r["best"] else None,
        "best_epoch": best_epoch,
        "final_val_acc": hist[-1]["val_acc"] if hist else None,
        # held-out sets at the epoch validation selects, and at the final epoch
        "extra": {
            k: {"at_best": hist[best_epoch - 1]["extra"][k]["acc"], "final": hist[-1]["extra"][k]["acc"]}
            for k in extra_names
        },
        "minutes": r["seconds"] / 60,
        "analysis": r.get("analysis"),
    }


def _model_summary(runs: list[tuple[int, dict]]) -> dict:
    summaries = [_run_summary(s, r) for s, r in runs]
    first = runs[0][1]
    out = {
        "total_params": first["total"],
        "trainable_params": first["trainable"],
        "info": first.get("info", {}),
        "runs": summaries,
        "best_val_acc": mean_ci([x["best_val_acc"] for x in summaries]),
        "final_val_acc": mean_ci([x["final_val_acc"] for x in summaries]),
        "minutes": mean_ci([x["minutes"] for x in summaries]),
        "extra": {
            k: {kind: mean_ci([x["extra"][k][kind] for x in summaries]) for kind in ("at_best", "final")}
            for k in summaries[0]["extra"]
        },
    }
    analyses = [x["analysis"] for x in summaries if x["analysis"]]
    if analyses and "rank" in analyses[0]:
        out["rank"] = {
            k: mean_ci([a["rank"][k] for a in analyses]) for k in RANK_KEYS if analyses[0]["rank"][k] is not None
        }
        out["pooled_kmeans"] = {k: mean_ci([a["pooled_kmeans"][k] for a in analyses]) for k in ENGRAM_KEYS}
    return out


# ----------------------------------------------------------------------------- tests across models


def delta_test(a, b, words=("supported", "refuted"), margins: list[float] | None = None) -> dict:
    """Delta a - b over seeds: mean, CI and prediction interval, paired t-test (with its reason when
    undefined), TOST at each margin (default: the accuracy margin), minimum detectable effect. The
    verdict is "inconclusive" until adjust_family gives the test its family's adjusted p."""
    return delta_evidence(a, b, margins if margins is not None else accuracy_margins(), words)


def _correct(rec: dict, labels) -> np.ndarray:
    return np.asarray(rec["pred"]) == np.asarray(labels)


def hypotheses(models: dict, results: dict, labels, study: dict) -> dict:
    """H1 and H2: the primary tests are the final-epoch deltas (no selection on validation), a
    paired t-test across seeds (McNemar on the paired predictions with one seed), Holm-adjusted
    together; beside them TOST against ±1 point and the study's effect, the minimum detectable
    effect, the seeds detecting the study's effect would need, the 95 % prediction interval for one
    new seed (where the study's single run belongs), and a two-level bootstrap over seeds and
    sentences. Best-epoch and held-out-set deltas are secondary (adjusted in secondary_family)."""
    out = {}
    for h, (a, b) in HYPOTHESES.items():
        seeds = [s for s in results if a in results[s] and b in results[s]]
        if not seeds:
            continue
        runs = {v: {r["seed"]: r for r in models[v]["runs"]} for v in (a, b)}
        per_seed = []
        for s in seeds:
            ra, rb = results[s][a], results[s][b]
            per_seed.append(
                {
                    "seed": s,
                    "delta_best": ra["best"]["acc"] - rb["best"]["acc"],
                    "delta_final": ra["history"][-1]["val_acc"] - rb["history"][-1]["val_acc"],
                    "mcnemar_final": mcnemar_exact(_correct(ra["final"], labels), _correct(rb["final"], labels)),
                }
            )
        sd = {k: study["deltas"][k][h] for k in ("best", "final")}
        final = delta_test(
            [runs[a][s]["final_val_acc"] for s in seeds],
            [runs[b][s]["final_val_acc"] for s in seeds],
            margins=accuracy_margins(sd["final"]),
        )
        best = delta_test(
            [runs[a][s]["best_val_acc"] for s in seeds],
            [runs[b][s]["best_val_acc"] for s in seeds],
            margins=accuracy_margins(sd["best"]),
        )
        if len(seeds) == 1:  # one seed: the paired predictions are the only test there is
            final.update(p=per_seed[0]["mcnemar_final"]["p"], reason=None)
        extra = {}
        for k in runs[a][seeds[0]]["extra"]:
            extra[k] = {
                kind: delta_test(
                    [runs[a][s]["extra"][k][kind] for s in seeds], [runs[b][s]["extra"][k][kind] for s in seeds]
                )
                for kind in ("at_best", "final")
            }
        pi = final["delta"]["prediction_interval"]
        out[h] = {
            "compare": f"{a} - {b}",
            "per_seed": per_seed,
            "final": final,
            "best": best,
            "delta_final": final["delta"],
            "delta_best": best["delta"],
            "test": "paired t-test across seeds" if len(seeds) >= 2 else "exact McNemar (one seed)",
            "p": final["p"],
            "reason": final["reason"],
            "study_delta": sd,
            "study_in_prediction_interval": None if pi is None else bool(pi[0] <= sd["final"] <= pi[1]),
            "seeds_needed": {k: seeds_needed(sd[k], t["delta"]["std"]) for k, t in (("final", final), ("best", best))},
            "bootstrap_final": two_level_ci(
                [_correct(results[s][a]["final"], labels) for s in seeds],
                [_correct(results[s][b]["final"], labels) for s in seeds],
            ),
            "extra": extra,
        }
    adjust_family([d["final"] for d in out.values()], PRIMARY, "primary: H1 and H2 at the final epoch")
    for d in out.values():
        d.update(p_adj=d["final"]["p_adj"], family=d["final"]["family"], verdict=d["final"]["verdict"])
    return out


def secondary_family(hyp: dict, rank: dict) -> None:
    """Every other test a report makes (best-epoch H1/H2, the rank measures, the held-out sets), one
    Benjamini–Hochberg family, in place."""
    tests = [d["best"] for d in hyp.values()]
    tests += [e[kind] for d in hyp.values() for e in d["extra"].values() for kind in ("at_best", "final")]
    tests += [v for k, v in rank.items() if k in RANK_KEYS]
    adjust_family(tests, SECONDARY, "secondary: best-epoch deltas, rank measures, held-out sets")


def rank_test(models: dict) -> dict:
    """Model 2 − Model 1 on each rank measure of the pooled states, paired over seeds: does the LM
    head keep the representation higher-rank (the study's anti-collapse explanation of H1)?"""
    a, b = HYPOTHESES["H1"]
    if not all(v in models and "rank" in models[v] for v in (a, b)):
        return {}
    ra = {r["seed"]: r["analysis"]["rank"] for r in models[a]["runs"]}
    rb = {r["seed"]: r["analysis"]["rank"] for r in models[b]["runs"]}
    seeds = [s for s in ra if s in rb]
    return {
        "compare": f"{a} - {b}",
        "seeds": seeds,
        **{
            k: delta_test([ra[s][k] for s in seeds], [rb[s][k] for s in seeds], ("higher", "lower"), [margin_for(k)])
            for k in models[a]["rank"]
        },
    }


def tail_summary(runs: list[dict], threshold: float) -> dict:
    """How often untrained compressors reach `threshold` (the study's ARI), per seed and with an
    interval over seeds (the unit the draws are not independent of); where each seed's engram ARI
    falls among its own seed's draws (a percentile), and a test of those percentiles across seeds."""
    from analysis.controls import ari_percentile, percentile_test, tail_rate  # controls imports train.loop: kept lazy

    per_seed = []
    for r in runs:
        ari = np.asarray(r["analysis"]["random_compressor_tail"]["ari"])
        own = r["analysis"]["engram"]["ari"]
        per_seed.append(
            {
                "seed": r["seed"],
                "draws": len(ari),
                "at_or_above": int((ari >= threshold).sum()),
                "fraction": float((ari >= threshold).mean()),
                "max": float(ari.max()),
                "trained_ari": own,
                "fraction_at_or_above_trained": float((ari >= own).mean()),
                "percentile": ari_percentile(own, ari),
            }
        )
    draws = sum(x["draws"] for x in per_seed)
    hits = sum(x["at_or_above"] for x in per_seed)
    return {
        "threshold": threshold,
        "draws": draws,
        "at_or_above": hits,
        "fraction": hits / draws,
        "rate": tail_rate([x["fraction"] for x in per_seed]),
        "percentile_test": percentile_test([x["percentile"] for x in per_seed]),
        "max": max(x["max"] for x in per_seed),
        "per_seed": per_seed,
    }


def engram_summary(models: dict, study_ari: float | None = None) -> dict:
    """Trained engram, untrained (random) compressors and the pooled state, over the seeds of the
    model with an engram (models.engram_variant: Model 3); per seed whether the trained engram's ARI
    lies above every random draw's; and the tail: how often a random compressor reaches the study's ARI."""
    v = engram_variant(models)
    if v is None:
        return {}
    runs = [r for r in models[v]["runs"] if r["analysis"]]
    if not runs:
        return {}
    out = {k: mean_ci([r["analysis"]["engram"][k] for r in runs]) for k in ENGRAM_KEYS}
    out["per_seed"] = [{"seed": r["seed"], **r["analysis"]["engram"]} for r in runs]
    if runs and "random_compressor" in runs[0]["analysis"]:
        draws = [d for r in runs for d in r["analysis"]["random_compressor"]["per_draw"]]
        out["random_compressor"] = {
            k: {**mean_ci([d[k] for d in draws]), "min": min(d[k] for d in draws), "max": max(d[k] for d in draws)}
            for k in (*ENGRAM_KEYS, "probe_accuracy")
        }
        out["random_compressor"]["draws"] = len(draws)
        out["trained_probe_accuracy"] = mean_ci([r["analysis"]["probe_engram"]["accuracy"] for r in runs])
        out["pooled_kmeans"] = {k: mean_ci([r["analysis"]["pooled_kmeans"][k] for r in runs]) for k in ENGRAM_KEYS}
        out["pooled_probe_accuracy"] = mean_ci([r["analysis"]["probe_pooled"]["accuracy"] for r in runs])
        out["above_random"] = [
            {
                "seed": r["seed"],
                "ari": r["analysis"]["engram"]["ari"],
                "random_max": r["analysis"]["random_compressor"]["summary"]["ari"]["max"],
                "above": r["analysis"]["engram"]["ari"] > r["analysis"]["random_compressor"]["summary"]["ari"]["max"],
            }
            for r in runs
        ]
    if study_ari is not None and all("random_compressor_tail" in r["analysis"] for r in runs):
        out["random_tail"] = tail_summary(runs, study_ari)
    return out


def build_metrics(results: dict, labels, complete: bool, header: dict, study: dict, stopped: str | None = None) -> dict:
    models = {}
    # the table's order, then any variant it does not know (a run of other code) under its own name
    for v in dict.fromkeys([*VARIANTS, *(v for by_v in results.values() for v in by_v)]):
        runs = [(s, results[s][v]) for s in results if v in results[s]]
        if runs:
            models[v] = _model_summary(runs)
    variants = list(header.get("config", {}).get("variants") or VARIANTS)
    not_run = {
        h: f"needs {' and '.join(v for v in pair if v not in variants)}, which this run does not train (--variants)"
        for h, pair in HYPOTHESES.items()
        if not all(v in variants for v in pair)
    }
    hyp, rank = hypotheses(models, results, labels, study), rank_test(models)
    secondary_family(hyp, rank)
    return {
        **header,
        **from_jobs(results),
        "variants": variants,
        "complete": complete,
        "stopped": stopped,
        "models": models,
        "engram": engram_summary(models, study.get("engram", {}).get("ari")),
        "hypotheses": hyp,
        "hypotheses_not_run": not_run,
        "rank_test": rank,
        "study": study,
    }


def from_jobs(results: dict) -> dict:
    """Device, compute dtype and peak GPU memory as the jobs recorded them (the process writing
    the outputs may be a submitter on a login node): every distinct value, joined; the peak over
    jobs; and the code versions the jobs ran under when they differ from one another."""
    runs = [r for by_v in results.values() for r in by_v.values()]
    machines = [r.get("machine") or {} for r in runs]
    out = {}
    names = sorted({x["device_name"] for x in machines if x.get("device_name")})
    if names:
        out["device"] = "; ".join(names)
    dtypes = sorted(
        {str((r.get("info") or {}).get("compute_dtype")) for r in runs if (r.get("info") or {}).get("compute_dtype")}
    )
    if dtypes:
        out["compute_dtype"] = "; ".join(dtypes)
    peaks = [x["peak_gpu_gib"] for x in machines if x.get("peak_gpu_gib") is not None]
    if peaks:
        out["peak_gpu_gib"] = max(peaks)
    codes = {describe_code(c) for r in runs for c in (r.get("code") or [None])}
    if len(codes) > 1:
        out["code_versions"] = sorted(codes)
    return out


def predictions(results: dict, labels) -> dict:
    return {
        "labels": list(map(int, labels)),
        "runs": {
            str(s): {v: {"best": r["best"], "final": r["final"]} for v, r in by_v.items()}
            for s, by_v in results.items()
        },
    }
