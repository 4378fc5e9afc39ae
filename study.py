"""Seeds × variants: train each in turn, analyse it, keep it, and rewrite every output after each,
so that a crash, a full disk or Ctrl-C never loses a finished variant."""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from analysis import analyse, random_compressor_tail
from checkpoints import latest_checkpoint, prepare_checkpoints, read_result
from cli import Interrupted, UsageError, check_stop
from figures import engram_clusters, learning_curves
from files import FolderLock, save_figure, write_atomic, write_json, write_npz
from metrics import build_metrics, predictions, subject
from models import VARIANTS
from training import Recipe, train_variant

OUTPUTS = ("metrics.json", "predictions.json", "REPORT.md", "learning_curves.png", "engram_clusters.png")


def load_arrays(out: Path, seed: int, variant: str) -> dict:
    with np.load(out / "checkpoints" / f"seed{seed}" / variant / "arrays.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def with_tail(folder: Path, result: dict, seed: int) -> dict:
    """A finished dual_engram result with the tail of its random-compressor control, computed from
    its arrays.npz and written into its result.json once (older runs get it on their next --resume)."""
    analysis = result.get("analysis") or {}
    if "engram" not in analysis or "random_compressor_tail" in analysis:
        return result
    with np.load(folder / "arrays.npz", allow_pickle=False) as z:
        pooled, labels, engrams = z["pooled"], z["labels"], z["engrams"]
    analysis["random_compressor_tail"] = random_compressor_tail(pooled, labels, engrams.shape[1], seed)
    write_json(folder / "result.json", result)
    return result


def run_study(recipe: Recipe, seeds: list[int], train, evals: dict, out: Path, resume: bool, settings: dict, on_progress) -> dict:
    """Train every variant once per seed, in turn. Each finished variant's result is kept in its
    checkpoint folder (so --resume skips it) and `on_progress(results, complete, stopped)` rewrites
    the outputs after every finished variant, and once more if a stop request ends the run."""
    ckpt_root = out / "checkpoints"
    prepare_checkpoints(ckpt_root, settings, resume)
    results: dict[int, dict[str, dict]] = {}
    current = None
    try:
        for seed in seeds:
            results[seed] = {}
            for variant in VARIANTS:
                current = (seed, variant)
                folder = ckpt_root / f"seed{seed}" / variant
                kept = read_result(folder / "result.json", f"{variant} seed {seed}") if resume else None
                if kept is not None and (folder / "arrays.npz").is_file():
                    print(f"[{variant} seed {seed}] finished in an earlier run; skipping")
                    results[seed][variant] = with_tail(folder, kept, seed)
                    continue
                check_stop(f"{variant} seed {seed}, before training")
                result, built = train_variant(recipe, variant, seed, train, evals, folder, resume)
                result["analysis"], arrays = analyse(built.model, evals["validation"], recipe, built.autocast_dtype, seed)
                write_npz(folder / "arrays.npz", arrays)
                write_json(folder / "result.json", result)
                result = with_tail(folder, result, seed)
                results[seed][variant] = result
                del built
                if recipe.device.type == "cuda":
                    torch.cuda.empty_cache()
                on_progress(results, False, None)
    except Interrupted as e:
        seed, variant = current
        on_progress(results, False, signal.Signals(e.signum).name)
        last = latest_checkpoint(ckpt_root / f"seed{seed}" / variant)
        done = sum(len(v) for v in results.values())
        kept = f"{done} finished variant(s) and " + (f"checkpoint {last}" if last else f"no checkpoint of {variant} seed {seed} yet")
        raise Interrupted(f"{e}; kept {kept}", e.signum) from None
    on_progress(results, True, None)
    return results


def write_outputs(out: Path, results: dict, labels, complete: bool, header: dict, study: dict, panels,
                  report_fn, stopped: str | None = None, drawn: dict | None = None) -> dict:
    """metrics.json, predictions.json, learning_curves.png, engram_clusters.png and REPORT.md, each
    written atomically. `report_fn(metrics)` returns the report's text. `drawn` remembers which
    seed's engram figure is on disk, so its two t-SNEs are computed once per run, not per variant."""
    m = build_metrics(results, labels, complete, header, study, stopped)
    write_json(out / "metrics.json", m)
    write_json(out / "predictions.json", predictions(results, labels))
    if m["models"]:
        save_figure(learning_curves(m, panels, study.get("curves", {})), out / "learning_curves.png")
    first = next((s for s in m["seeds"] if "dual_engram" in results.get(s, {})), None)
    drawn = {} if drawn is None else drawn
    if first is not None and (drawn.get("engram_seed") != first or not (out / "engram_clusters.png").is_file()):
        drawn["engram_seed"] = first
        a = load_arrays(out, first, "dual_engram")
        e = results[first]["dual_engram"]["analysis"]["engram"]
        title = (f"engrams of {subject(header)}, protocol {header['protocol']} (seed {first}): "
                 f"ARI {e['ari']:.3f}, cluster accuracy {100 * e['cluster_accuracy']:.1f}%")
        save_figure(engram_clusters(a["engrams"], a["labels"], a["clusters"], a["pooled"], title, first),
                    out / "engram_clusters.png")
    write_atomic(out / "REPORT.md", report_fn(m))
    return m


def run_and_report(recipe: Recipe, args, train, evals, out: Path, header: dict, study: dict, panels, report_fn) -> dict:
    """Hold the output folder's lock, run every variant for every seed, and rewrite all outputs
    after each finished variant."""
    for variant in VARIANTS:  # refuse at the start what would fail after hours
        if recipe.steps_per_epoch(variant, len(train)) == 0:
            raise UsageError(f"{len(train)} training rows make no full batch of {recipe.batch_size(variant)} for {variant} "
                             "(the protocol drops an epoch's short last batch); use more rows or a smaller --batch-size")
    state, drawn = {}, {}

    def on_progress(results, complete, stopped):
        if recipe.device.type == "cuda":
            header["peak_gpu_gib"] = torch.cuda.max_memory_allocated(recipe.device) / 2**30
        try:
            state["metrics"] = write_outputs(out, results, evals["validation"].labels, complete, header, study, panels,
                                             report_fn, stopped, drawn)
        except Exception as e:
            if complete:
                raise
            # a report that fails mid-run must not stop the training: the finished variants are kept
            # in their checkpoint folders, and the next write (at the latest the final one) tries again
            print(f"warning: could not write the outputs after this variant ({type(e).__name__}: {e}); "
                  "training goes on", file=sys.stderr)

    with FolderLock(out, "run", header["command"]):
        try:
            run_study(recipe, args.seeds, train, evals, out, args.resume, header["config"], on_progress)
        except Interrupted as e:
            again = header["command"] + ("" if args.resume else " --resume")
            raise Interrupted(f"{e}; continue with: {again}", e.signum) from None
    print(f"wrote {out}/" + ", ".join(OUTPUTS))
    return state["metrics"]


def read_metrics(path: Path | None) -> dict | None:
    """Another run's metrics.json (for side-by-side tables), or None when absent or unreadable."""
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
