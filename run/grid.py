"""A study is a grid of independent jobs, one per (seed, variant) of one protocol and one output
folder. This module names the jobs, keeps each job's record in OUT/jobs/<job>.json (who runs it,
where, since when, how it ended), reads the finished ones back, and tells the state of each.

A job's own files live in its checkpoint folder, OUT/checkpoints/seed<S>/<variant>/: its lock
(.lock-job.json, held while it trains), its epoch and mid-epoch checkpoints, and once finished its
result.json and arrays.npz. A job is finished exactly when result.json and arrays.npz exist.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from train.checkpoints import read_result
from train.files import alive, write_json
from train.stop import UsageError


@dataclass(frozen=True)
class Job:
    seed: int
    variant: str

    @property
    def name(self) -> str:  # file names and logs
        return f"seed{self.seed}-{self.variant}"

    @property
    def label(self) -> str:  # messages, as the training loop names a variant
        return f"{self.variant} seed {self.seed}"

    @property
    def key(self) -> str:  # the hidden --job flag's value
        return f"{self.seed}:{self.variant}"

    def folder(self, out: Path) -> Path:
        return Path(out) / "checkpoints" / f"seed{self.seed}" / self.variant

    def result_state(self, out: Path) -> str | None:
        """ "finished" (result.json reads back and arrays.npz exists), "unreadable" (result.json is
        there but cannot be parsed: a cut copy; the job runs again and finishes from its
        checkpoints), or None (no result)."""
        f = self.folder(out)
        if not (f / "result.json").is_file():
            return None
        try:
            json.loads((f / "result.json").read_text())
        except (OSError, ValueError):
            return "unreadable"
        return "finished" if (f / "arrays.npz").is_file() else None

    def finished(self, out: Path) -> bool:
        return self.result_state(out) == "finished"


def continue_command(command: str, executor: str = "serial") -> str:
    """The command that continues a run: the same command line, less --report-only (a rewrite
    trains nothing) and --overwrite (it would delete what has finished since), with --resume for a
    serial run (a grid under an executor always continues its folder)."""
    words = [w for w in shlex.split(command) if w not in ("--report-only", "--overwrite")]
    if executor == "serial" and "--resume" not in words:
        words.append("--resume")
    return shlex.join(words)


def grid(seeds, variants) -> list[Job]:
    """Seeds in the given order, each with its variants in the study's order (Model 1, 2, 3)."""
    return [Job(s, v) for s in seeds for v in variants]


def parse_job(text: str, jobs: list[Job]) -> Job:
    """--job SEED:VARIANT, which must be a job of this command's grid."""
    seed, _, variant = text.partition(":")
    found = [j for j in jobs if str(j.seed) == seed and j.variant == variant]
    if not found:
        raise UsageError(f"--job {text} is not a job of this grid ({', '.join(j.key for j in jobs)})")
    return found[0]


def finished_results(out: Path, jobs: list[Job]) -> dict[int, dict[str, dict]]:
    """{seed: {variant: result}} of every finished job of the grid, in the grid's order."""
    results: dict[int, dict[str, dict]] = {}
    for job in jobs:
        if job.finished(out):
            r = read_result(job.folder(out) / "result.json", job.label)
            if r is not None:
                results.setdefault(job.seed, {})[job.variant] = r
    return results


# ----------------------------------------------------------------------------- who runs a job


def identity() -> dict:
    """This process as a job: pid and host, and under Slurm its job id (array task included) and
    restart count, which a requeued job uses to take its own lock back from another host."""
    env = os.environ
    slurm = None
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        slurm = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    elif env.get("SLURM_JOB_ID"):
        slurm = env["SLURM_JOB_ID"]
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "slurm_job_id": slurm,
        "restarts": int(env.get("SLURM_RESTART_COUNT", "0") or 0),
        "local_job_id": env.get("SUBMITIT_LOCAL_JOB_ID"),
    }


def record_path(out: Path, job: Job) -> Path:
    return Path(out) / "jobs" / f"{job.name}.json"


def read_record(out: Path, job: Job) -> dict:
    try:
        return json.loads(record_path(out, job).read_text())
    except (OSError, ValueError):
        return {}


def write_record(out: Path, job: Job, **fields) -> dict:
    """Merge `fields` into the job's record (written atomically; each job writes only its own)."""
    rec = {**read_record(out, job), **fields, "updated": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_json(record_path(out, job), rec)
    return rec


# ----------------------------------------------------------------------------- states


# squeue's states (%T) of a job that is still in the queue, as a job of the grid reads them
SLURM_RUNNING = ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESIZING")
SLURM_PENDING = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SPECIAL_EXIT")


def expand_ids(text: str) -> list[str]:
    """squeue's job ids, one element each: "7_[2-4,9%2]" (pending elements of an array that squeue
    answers in one line without -r) -> 7_2, 7_3, 7_4, 7_9; "7_3" and "12" stay as they are."""
    base, bracket, rest = text.partition("_[")
    if not bracket:
        return [text]
    out = []
    for part in rest.rstrip("]").split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            out += [f"{base}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def slurm_states(ids: list[str]) -> dict[str, str] | None:
    """squeue's state (PENDING, RUNNING, ...) of each of the Slurm job ids still in the queue; a job
    not in the answer has left the queue. None when squeue could not be asked (not installed,
    no controller, a timeout): then nothing is known. (sacct would also know finished jobs, but
    needs accounting, which many clusters lack.)"""
    if not ids:
        return {}
    try:
        # -r: one line per array element (without it, pending elements come as one "7_[2-4]" line)
        out = subprocess.run(
            ["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(sorted(set(ids)))],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        # one id that Slurm has forgotten (left the queue a while ago) is an error, not an empty answer
        return {} if "Invalid job id" in out.stderr else None
    states = {}
    for line in out.stdout.splitlines():
        jid, _, state = line.strip().partition(" ")
        for one in expand_ids(jid):
            states[one] = state.strip()
    return states


def queue_state(rec: dict, queued: dict | None) -> str:
    """Where a job's executor has it: "running", "pending" (waiting in a queue, or requeued),
    "gone" (no longer in the queue, or its process has ended) or "unknown" (cannot be asked here:
    squeue failed, or a local job of another host)."""
    if rec.get("slurm_job_id"):
        if queued is None:
            return "unknown"
        state = queued.get(str(rec["slurm_job_id"]))
        return (
            "gone"
            if state is None
            else "running"
            if state in SLURM_RUNNING
            else "pending"
            if state in SLURM_PENDING
            else "gone"
        )
    if rec.get("local_job_id"):  # submitit's local job id is its controller's pid, on the submitter's host
        # a record of earlier code names no submitter (and no host when its job never started): the local
        # executor started it on some host sharing this folder, taken to be this one, or its dead pid would
        # stay pending forever; a wrong guess cannot run a job twice (the job's own lock refuses the second)
        if (rec.get("submit_host") or rec.get("host") or socket.gethostname()) != socket.gethostname():
            return "unknown"
        controller = alive(int(rec["local_job_id"]))
        if rec.get("state") == "running":
            return "running" if controller or alive(int(rec.get("pid", 0))) else "gone"
        return "pending" if controller else "gone"
    if rec.get("state") == "running" and rec.get("host") == socket.gethostname():  # a serial run's own process
        return "running" if alive(int(rec.get("pid", 0))) else "gone"
    return "unknown"


def last_line(path) -> str | None:
    """The last non-empty line of a log file (what a failed job said last)."""
    try:
        lines = [x for x in Path(path).read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return None
    return lines[-1].strip()[:300] if lines else None


def job_states(out: Path, jobs: list[Job]) -> list[dict]:
    """One row per job: state (finished / running / pending / failed / stopped / not started), the
    executor's job id, host, minutes, and for a failed job its error line and log. The result files
    decide first: a record that claims more than they show (finished, but its result was removed)
    is stale and ignored."""
    records = {j: read_record(out, j) for j in jobs}
    queued = slurm_states([r["slurm_job_id"] for r in records.values() if r.get("slurm_job_id")])
    rows = []
    for job in jobs:
        rec = records[job]
        found = job.result_state(out)
        if found is None and rec.get("state") == "finished":
            rec = {}  # stale: the result it names is gone (the folder was cleared)
        row = {
            "job": job.name,
            "seed": job.seed,
            "variant": job.variant,
            "state": "not started",
            "job_id": rec.get("slurm_job_id") or rec.get("local_job_id"),
            "host": rec.get("host"),
            "gpu": rec.get("gpu"),
            "submit_host": rec.get("submit_host"),
            "minutes": None,
            "error": None,
            "log": rec.get("log"),
        }
        where = queue_state(rec, queued) if rec else "unknown"
        if found == "finished":
            result = read_result(job.folder(out) / "result.json", job.label) or {}
            row.update(state="finished", minutes=result.get("seconds", 0) / 60)
        elif found == "unreadable" and where not in ("running", "pending"):
            row.update(
                state="failed", error="its result.json cannot be read; a rerun finishes it again from its checkpoints"
            )
        elif rec:
            state = rec.get("state")
            if state == "submitted":
                state = {"running": "running", "gone": "failed"}.get(where, "pending")
                if state == "failed":
                    row["error"] = (
                        "left the queue without starting"
                        if rec.get("slurm_job_id")
                        else "its process ended before training started (see its log)"
                    )
            elif state == "running":
                if where == "gone":
                    state = "failed"
                    row["error"] = "the process is gone without a result (killed, out of memory, node lost)"
                else:
                    row["minutes"] = (time.time() - rec.get("started_at", time.time())) / 60
            elif state == "failed":
                row["error"] = rec.get("error")
            elif state == "stopped" and where in ("running", "pending"):
                state = "pending"  # stopped for a requeue: the executor runs it again
            row["state"] = state
            if state == "failed" and not row["error"]:
                row["error"] = last_line(rec["log"]) if rec.get("log") else None
        rows.append(row)
    return rows


def status_table(rows: list[dict]) -> str:
    counts = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    lines = ["| Job | State | Job id | Host | Minutes | Last line (failed) |", "|---|---|---|---|---|---|"]
    for r in rows:
        minutes = "" if r["minutes"] is None else f"{r['minutes']:.1f}"
        lines.append(
            f"| {r['job']} | {r['state']} | {r['job_id'] or ''} | {r['host'] or ''} | {minutes} | "
            f"{(r['error'] or '') if r['state'] == 'failed' else ''} |"
        )
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    return "\n".join(lines) + f"\n\n{len(rows)} jobs: {summary}"
