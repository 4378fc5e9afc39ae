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
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from checkpoints import read_result
from cli import UsageError
from files import alive, write_json


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

    def finished(self, out: Path) -> bool:
        f = self.folder(out)
        return (f / "result.json").is_file() and (f / "arrays.npz").is_file()


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
    return {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job_id": slurm,
            "restarts": int(env.get("SLURM_RESTART_COUNT", "0") or 0),
            "local_job_id": env.get("SUBMITIT_LOCAL_JOB_ID")}


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


def slurm_states(ids: list[str]) -> dict[str, str]:
    """squeue's state (PENDING, RUNNING, ...) of each Slurm job id still in the queue; {} without
    squeue. (sacct would also know finished jobs, but needs accounting, which many clusters lack.)"""
    if not ids:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(sorted(set(ids)))], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    states = {}
    for line in out.stdout.splitlines():
        jid, _, state = line.strip().partition(" ")
        states[jid] = state
    return states


def last_line(path) -> str | None:
    """The last non-empty line of a log file (what a failed job said last)."""
    try:
        lines = [x for x in Path(path).read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return None
    return lines[-1].strip()[:300] if lines else None


def job_states(out: Path, jobs: list[Job]) -> list[dict]:
    """One row per job: state (finished / running / pending / failed / stopped / not started), the
    executor's job id, host, minutes, and for a failed job its error line and log."""
    records = {j: read_record(out, j) for j in jobs}
    queued = slurm_states([r["slurm_job_id"] for r in records.values() if r.get("slurm_job_id")])
    rows = []
    for job in jobs:
        rec = records[job]
        row = {"job": job.name, "seed": job.seed, "variant": job.variant, "state": "not started",
               "job_id": rec.get("slurm_job_id") or rec.get("local_job_id"), "host": rec.get("host"),
               "minutes": None, "error": None, "log": rec.get("log")}
        if job.finished(out):
            result = read_result(job.folder(out) / "result.json", job.label) or {}
            row.update(state="finished", minutes=result.get("seconds", 0) / 60)
        elif rec:
            state = rec.get("state")
            in_queue = queued.get(str(rec.get("slurm_job_id")))
            if state == "submitted":
                state = {"RUNNING": "running", "PENDING": "pending"}.get(in_queue, "pending" if rec.get("slurm_job_id") is None
                                                                          or in_queue else "failed")
                if state == "failed":
                    row["error"] = "left the queue without starting"
            elif state == "running":
                gone = (rec.get("host") == socket.gethostname() and not alive(int(rec.get("pid", 0))))
                if rec.get("slurm_job_id") and queued and in_queue is None:
                    gone = True
                if gone:
                    state = "failed"
                    row["error"] = "the process is gone without a result (killed, out of memory, node lost)"
                else:
                    row["minutes"] = (time.time() - rec.get("started_at", time.time())) / 60
            elif state == "failed":
                row["error"] = rec.get("error")
            if state == "stopped" and in_queue in ("PENDING", "RUNNING", "REQUEUED"):
                state = "pending"  # stopped for a requeue: Slurm runs it again
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
        lines.append(f"| {r['job']} | {r['state']} | {r['job_id'] or ''} | {r['host'] or ''} | {minutes} | "
                     f"{(r['error'] or '') if r['state'] == 'failed' else ''} |")
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    return "\n".join(lines) + f"\n\n{len(rows)} jobs: {summary}"
