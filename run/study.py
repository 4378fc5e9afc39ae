"""Seeds × variants, a grid of jobs: run each job (train, analyse, keep it), and rewrite every
output from the finished jobs after each, so that a crash, a full disk, Ctrl-C or a preemption
never loses a finished job; or hand the grid to an executor (launch.py) that runs the jobs as
processes or Slurm jobs, each of them this same code with --job."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from analysis.controls import analyse, random_compressor_tail
from analysis.figures import engram_clusters, learning_curves
from analysis.metrics import build_metrics, predictions, setting, subject
from models import engram_variant, free_memory
from run.grid import Job, continue_command, finished_results, grid, identity, job_states, parse_job, write_record
from run.settings import Execution, Run, Settings
from train.checkpoints import check_fresh, latest_checkpoint, prepare_checkpoints, read_result
from train.files import FolderLock, figure_png, save_figure, write_atomic, write_json, write_npz
from train.loop import Recipe, train_variant
from train.provenance import device_name
from train.stop import STOP, Interrupted, NonFiniteLoss, UsageError, check_stop

OUTPUTS = ("metrics.json", "predictions.json", "REPORT.md", "learning_curves.png", "engram_clusters.png")


def load_arrays(out: Path, seed: int, variant: str) -> dict:
    with np.load(out / "checkpoints" / f"seed{seed}" / variant / "arrays.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def add_tail(folder: Path, result: dict, seed: int) -> bool:
    """Add the tail of the random-compressor control to a dual_engram result, computed from its
    arrays.npz (the pooled states as saved); False if it has one already or has no engram."""
    analysis = result.get("analysis") or {}
    if "engram" not in analysis or "random_compressor_tail" in analysis:
        return False
    with np.load(folder / "arrays.npz", allow_pickle=False) as z:
        pooled, labels, engrams = z["pooled"], z["labels"], z["engrams"]
    analysis["random_compressor_tail"] = random_compressor_tail(pooled, labels, engrams.shape[1], seed)
    return True


def with_tail(folder: Path, result: dict, seed: int) -> dict:
    """A finished result of an earlier run, given the tail if it lacks one (written into its
    result.json once: runs made before the tail existed get it on their next --resume)."""
    if add_tail(folder, result, seed):
        write_json(folder / "result.json", result)
    return result


def run_job(job: Job, recipe: Recipe, train, evals: dict, out: Path, command: str) -> dict:
    """Train, analyse and keep one job of the grid, under its own lock; its record says how it ended.
    Resumes from the job's newest checkpoint (epoch or mid-epoch) if it has one."""
    folder = job.folder(out)
    who = identity()
    built = None
    with FolderLock(folder, "job", command, who=who):
        write_record(out, job, state="running", started_at=time.time(), error=None, **who)
        try:
            check_stop(f"{job.label}, before training")
            if recipe.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(recipe.device)
            result, built = train_variant(recipe, job.variant, job.seed, train, evals, folder, resume=True)
            result["analysis"], arrays = analyse(
                built.model, evals["validation"], recipe, built.autocast_dtype, job.seed
            )
            result["machine"] = job_machine(recipe.device, who)
            write_npz(folder / "arrays.npz", arrays)
            check_stop(f"the analysis of {job.variant}")  # before the random-compressor control, which polls no stop
            add_tail(folder, result, job.seed)
            write_json(folder / "result.json", result)  # last, and once: the job is finished when it exists
        except Interrupted as e:
            write_record(out, job, state="stopped", error=str(e))
            raise
        except BaseException as e:
            write_record(
                out, job, state="failed", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            )
            raise
        finally:
            built = None  # the last reference: the collector can free the model now
            free_memory(recipe.device)
        write_record(out, job, state="finished", ended_at=time.time())
    return result


def job_machine(device: torch.device, who: dict) -> dict:
    """Where a job ran, kept in its result: metrics.json reads device, GPU and peak GPU memory from
    the jobs, not from whichever process (a submitter, a login node) writes the outputs."""
    mine = {
        "host": who["host"],
        "threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": device_name(device),
    }
    if device.type == "cuda":
        mine.update(
            gpu=torch.cuda.get_device_name(device), peak_gpu_gib=torch.cuda.max_memory_allocated(device) / 2**30
        )
    return mine


def outputs_of(m: dict) -> list[str]:
    """The files write_outputs leaves for these metrics: each figure only once it has something to
    draw (the learning curves a finished model, the engram figure a finished model with an engram)."""
    models = m.get("models") or {}
    drawable = {"learning_curves.png": bool(models), "engram_clusters.png": engram_variant(models) is not None}
    return [o for o in OUTPUTS if drawable.get(o, True)]


def write_outputs(
    out: Path,
    results: dict,
    labels,
    complete: bool,
    header: dict,
    study: dict,
    panels,
    report_fn,
    stopped: str | None = None,
    engram_png: tuple[bytes, dict] | None = None,
) -> dict:
    """metrics.json, predictions.json, learning_curves.png, engram_clusters.png and REPORT.md, each
    written atomically. `report_fn(metrics)` returns the report's text. `engram_png` is the engram
    figure drawn beforehand (engram_figure: outside the outputs lock), or None when the one on disk
    is current."""
    m = build_metrics(results, labels, complete, header, study, stopped)
    write_json(out / "metrics.json", m)
    write_json(out / "predictions.json", predictions(results, labels))
    outputs = outputs_of(m)
    if "learning_curves.png" in outputs:
        save_figure(learning_curves(m, panels, study.get("curves", {})), out / "learning_curves.png")
    if "engram_clusters.png" in outputs and engram_png is not None:
        png, stamp = engram_png
        write_atomic(out / "engram_clusters.png", png)
        write_json(out / ENGRAM_STAMP, stamp)
    write_atomic(out / "REPORT.md", report_fn(m))
    return m


ENGRAM_STAMP = ".engram_clusters.json"  # what the engram figure on disk shows: its seed, arrays and title


def engram_stamp(out: Path, results: dict, seeds: list[int], header: dict) -> dict | None:
    """What the engram figure must show for these finished results, a pure function of them (every
    writer agrees): the first seed (in --seeds order) whose model with an engram (the first such
    variant of the table the results hold: Model 3) has finished, its arrays.npz (size and mtime)
    and the title. None when no such model with an engram analysis has finished."""
    v = _engram_variant(results)
    first = None if v is None else next((s for s in seeds if v in results.get(s, {})), None)
    e = None if first is None else (results[first][v].get("analysis") or {}).get("engram")
    if e is None:
        return None
    st = (out / "checkpoints" / f"seed{first}" / v / "arrays.npz").stat()
    title = (
        f"engrams of {subject(header)}, protocol {setting(header)} (seed {first}): "
        f"ARI {e['ari']:.3f}, cluster accuracy {100 * e['cluster_accuracy']:.1f}%"
    )
    return {"seed": first, "arrays": [st.st_size, st.st_mtime_ns], "title": title}


def _engram_variant(results: dict) -> str | None:
    """The variant the engram figure shows (models.engram_variant of those with a finished job)."""
    return engram_variant({name for by_variant in results.values() for name in by_variant})


def engram_on_disk(out: Path) -> dict | None:
    """The stamp of the engram figure on disk, None when there is none (or it cannot be read)."""
    try:
        return json.loads((out / ENGRAM_STAMP).read_text()) if (out / "engram_clusters.png").is_file() else None
    except (OSError, ValueError):
        return None


def engram_figure(out: Path, results: dict, seeds: list[int], header: dict) -> tuple[bytes, dict] | None:
    """The engram figure engram_stamp asks for, drawn (two t-SNEs: seconds to minutes) only when the
    figure on disk shows something else: not once per job. None when there is nothing to draw, or
    the one on disk is current."""
    stamp = engram_stamp(out, results, seeds, header)
    if stamp is None or engram_on_disk(out) == stamp:
        return None
    a = load_arrays(out, stamp["seed"], _engram_variant(results))
    return figure_png(
        engram_clusters(a["engrams"], a["labels"], a["clusters"], a["pooled"], stamp["title"], stamp["seed"])
    ), stamp


class Outputs:
    """Every output of a run, rebuilt from the grid's finished jobs on disk (whichever process or
    host ran them) under the output folder's short "outputs" lock."""

    LOCK_WAIT_S = 600  # how long a writer waits for another's outputs lock
    LOCK_STALE_S = 300  # another host's outputs lock unchanged this long: its writer died there

    def __init__(
        self, out: Path, jobs: list[Job], labels, header: dict, study: dict, panels, report_fn, recipe: Recipe
    ):
        self.out, self.jobs, self.labels, self.header = out, jobs, labels, header
        self.study, self.panels, self.report_fn, self.recipe = study, panels, report_fn, recipe

    def write(self, final: bool = False, stopped: str | None = None, tolerant: bool = False) -> dict:
        """Rewrite the outputs. A write that fails mid-run (tolerant) is a warning: the finished
        jobs are kept in their folders, and the next write (at the latest the final one) tries again."""
        try:
            seeds = list(dict.fromkeys(j.seed for j in self.jobs))
            # the engram figure is drawn outside the lock, and written only if it is still the one the results
            # read inside the lock ask for: a job that finished meanwhile may have moved the choice to an earlier
            # seed (each move is to an earlier seed, so the choice settles within len(seeds) tries)
            for tries_left in range(len(seeds), -1, -1):
                figure = engram_figure(self.out, finished_results(self.out, self.jobs), seeds, self.header)
                with FolderLock(
                    self.out,
                    "outputs",
                    self.header["command"],
                    wait_s=self.LOCK_WAIT_S,
                    who=identity(),
                    stale_s=self.LOCK_STALE_S,
                ):
                    results = finished_results(self.out, self.jobs)
                    want = engram_stamp(self.out, results, seeds, self.header)
                    if want is None or engram_on_disk(self.out) == want:
                        figure = None  # nothing to draw, or the one on disk is current
                    elif figure is None or figure[1] != want:
                        if tries_left:
                            continue  # drawn from older results: draw again, outside the lock
                        figure = engram_figure(self.out, results, seeds, self.header)  # the choice kept moving
                    header = {**self.header, "jobs": jobs_summary(job_states(self.out, self.jobs), self.header)}
                    complete = all(j.finished(self.out) for j in self.jobs)
                    return write_outputs(
                        self.out,
                        results,
                        self.labels,
                        complete,
                        header,
                        self.study,
                        self.panels,
                        self.report_fn,
                        stopped,
                        figure,
                    )
        except Exception as e:
            if final and not tolerant:
                raise
            print(
                f"warning: could not write the outputs now ({type(e).__name__}: {e}); the finished jobs are kept",
                file=sys.stderr,
            )
            return {}


def jobs_summary(rows: list[dict], header: dict) -> dict:
    """The grid in metrics.json: how many jobs finished, which failed and why, and the command that
    runs what is missing (the same command: a rerun skips the finished jobs)."""
    command = continue_command(header["command"], header["config"].get("executor", "serial"))
    return {
        "total": len(rows),
        "finished": sum(r["state"] == "finished" for r in rows),
        "states": {r["job"]: r["state"] for r in rows},
        "failed": [
            {k: r[k] for k in ("job", "error", "log", "job_id", "host")} for r in rows if r["state"] == "failed"
        ],
        "rerun": command,
    }


# ----------------------------------------------------------------------------- the modes

MODES = ("ladder", "status", "report_only", "submit", "one_job", "serial")


def mode_of(run: Run, execution: Execution) -> str:
    """What a command does, the one place that decides it (first match): the ladder (every rung is
    this command line again, through `main`), --status (the grid's table), --report-only (rewrite
    the outputs), submit the grid to an executor (--executor local|slurm), one job of the grid (--job,
    as an executor starts it), or every job in turn in this process (serial)."""
    if run.ladder:
        return "ladder"
    if run.status:
        return "status"
    if run.report_only:
        return "report_only"
    if execution.executor != "serial" and run.job is None:
        return "submit"
    return "one_job" if run.job is not None else "serial"


def prepare(mode: str, s: Settings, out: Path) -> None:
    """Before any data is loaded or downloaded: a fresh serial run refuses a folder with finished
    jobs it would delete (unless --overwrite); torch gets its thread count."""
    if mode == "serial" and not s.run.resume:
        check_fresh(out / "checkpoints", s.run.overwrite)
    if s.execution.threads:
        torch.set_num_threads(s.execution.threads)


def run_and_report(
    mode: str, recipe: Recipe, s: Settings, train, evals, out: Path, header: dict, study: dict, panels, report_fn
) -> dict:
    """Run the grid of seeds x --variants in `mode` (mode_of): only rewrite the outputs
    (report_only), submit it (submit), or train one job of it (one_job) or all of it (serial). The
    outputs are rewritten from every finished job on disk after each job, under the short "outputs"
    lock, so they grow as jobs finish wherever the jobs run."""
    run = s.run
    jobs = grid(run.seeds, run.variants)
    for variant in run.variants:  # refuse at the start what would fail after hours
        if recipe.steps_per_epoch(variant, len(train)) == 0:
            raise UsageError(
                f"{len(train)} training rows make no full batch of {recipe.batch_size(variant)} for {variant} "
                "(the protocol drops an epoch's short last batch); use more rows or a smaller --batch-size"
            )
    writer = Outputs(out, jobs, evals["validation"].labels, header, study, panels, report_fn, recipe)
    if mode == "report_only":
        return writer.write(final=True)
    ckpt_root = out / "checkpoints"
    if mode == "submit":
        from run import launch

        # a grid continues its folder (with --overwrite: starts it over first)
        prepare_checkpoints(
            ckpt_root,
            header["config"],
            resume=not run.overwrite,
            overwrite=run.overwrite,
            start_over="rerun with --overwrite",
        )  # an executor's grid always resumes
        return launch.submit(s.execution, header, out, jobs, writer)
    one = mode == "one_job"
    mine = [parse_job(run.job, jobs)] if one else jobs
    prepare_checkpoints(
        ckpt_root,
        header["config"],
        resume=run.resume or one,
        overwrite=run.overwrite,
        start_over="rerun the grid with --overwrite" if one else "run without --resume",
    )
    command = header["command"]
    for job in mine:
        if job.result_state(out) and (run.resume or one):
            kept = read_result(job.folder(out) / "result.json", job.label)  # unreadable: a warning, then it runs again
            if kept is not None:
                print(f"[{job.variant} seed {job.seed}] finished in an earlier run; skipping")
                with_tail(job.folder(out), kept, job.seed)
                continue
        try:
            run_job(job, recipe, train, evals, out, command)
        except Interrupted as e:
            last = latest_checkpoint(job.folder(out))
            if one:
                # a job of an executor stops within its signal's grace: its checkpoint is saved, it exits at once
                # (no outputs rewritten, no t-SNE, no lock waited for); the next job to finish rewrites them
                raise Interrupted(
                    f"{e}; kept " + (f"checkpoint {last}" if last else "no checkpoint yet"), e.signum
                ) from None
            writer.write(stopped=signal.Signals(e.signum).name)
            done = sum(j.finished(out) for j in jobs)
            kept = f"{done} finished job(s) and " + (
                f"checkpoint {last}" if last else f"no checkpoint of {job.variant} seed {job.seed} yet"
            )
            raise Interrupted(f"{e}; kept {kept}; continue with: {continue_command(command)}", e.signum) from None
        except (UsageError, NonFiniteLoss):
            writer.write(tolerant=True)
            raise
        if STOP and one:
            # the stop came after the job's last look (its result is kept): within the signal's grace it exits at
            # once, rewriting nothing; its requeue (or the next job to finish, or --report-only) writes the outputs
            raise Interrupted(
                f"{STOP.name} after {job.label} finished; its result is kept, the outputs are left to the next writer",
                STOP.signum,
            )
        if job is not mine[-1]:
            writer.write(tolerant=True)  # after the last job, the write below is the one
    m = writer.write(final=not one)
    if not one:
        print(f"wrote {out}/" + ", ".join(outputs_of(m)))  # the figures it drew, no others
    return m


def show_status(out: Path, run: Run) -> dict:
    """--status: the grid's jobs as a table, without starting anything."""
    from run.grid import status_table

    rows = job_states(out, grid(run.seeds, run.variants))
    print(f"{out}:\n\n{status_table(rows)}")
    missing = [r for r in rows if r["state"] in ("failed", "not started", "stopped")]
    if missing:
        print(f"\n{len(missing)} job(s) to run: rerun the same command (finished jobs are kept)")
    return {"jobs": rows}


def read_metrics(path: Path | None) -> dict | None:
    """Another run's metrics.json (for side-by-side tables), or None when absent or unreadable."""
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
