"""Executors for a study's grid of jobs, through submitit: `--executor local` (processes on this
machine, --jobs at once, one GPU each where there are GPUs) and `--executor slurm` (one job array).

A job is this project's own command line with `--job SEED:VARIANT` added: the cluster is a
setting, not a second code path (as DETR's and DeiT's run_with_submitit.py wrap their main).

Stops, preemption and time limits meet the project's own stop handling (cli.STOP) like this:
- Slurm's time limit: submitit asks sbatch for USR2 90 s before it; the job's STOP handler takes
  it, the training loop checkpoints at the next step boundary (the position in the epoch and every
  random state) and exits with 128 + USR2; GridJob then calls submitit's own handler, which
  requeues the job. The requeued job resumes from that checkpoint.
- Preemption and `scontrol requeue`: Slurm sends SIGTERM (submitit would ignore it); the job's
  STOP handler checkpoints at the next step boundary and exits; Slurm runs it again.
- Ctrl-C in the submitting process: the local jobs run in their own sessions, so the terminal's
  SIGINT never reaches them; the submitter stops waiting, says how to watch them, and exits.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from run.grid import Job, continue_command, job_states, status_table, write_record
from run.settings import Execution
from train.stop import STOP, STOP_SIGNALS, Interrupted, JobsFailed, UsageError

ROOT = Path(__file__).resolve().parents[1]
LOCAL_TIMEOUT_MIN = 60 * 24 * 30  # a local job has no time limit worth the name (submitit's default is 2 min)
LOCAL_SIGNAL_DELAY_S = 30  # USR2 this long before a local time limit (tests shorten both)
MAX_REQUEUES = 20  # time limits a job may run into before submitit gives up on it


class GridJob:
    """One job of the grid as submitit runs it: the script's main() with the user's arguments
    and --job. Checkpointable the submitit way (a `checkpoint` method): on USR2 it is requeued
    as it was submitted, and resumes from the checkpoint the training loop wrote."""

    def __init__(self, script: str, argv: list[str], job: Job, cwd: str, gpu: str | None = None):
        self.script, self.argv, self.job, self.cwd = script, list(argv), job, cwd
        self.gpu = gpu  # the GPU as the submitter's CUDA_VISIBLE_DEVICES names it (an index, a UUID, a MIG id)

    def checkpoint(self, *call, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *call, **kwargs)

    def __call__(self) -> dict:
        os.chdir(self.cwd)
        sys.path.insert(0, str(ROOT))
        if self.gpu is not None:  # before anything starts CUDA, which reads it once
            os.environ["CUDA_VISIBLE_DEVICES"] = self.gpu
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue handler
        STOP_SIGNALS.append(signal.SIGUSR2)  # main() turns it into a stop at the next step boundary
        try:
            importlib.import_module(self.script).main([*self.argv, "--job", self.job.key])
        except SystemExit as e:
            if e.code == 128 + signal.SIGUSR2 and callable(requeue):
                requeue(signal.SIGUSR2, None)  # the checkpoint is on disk: requeue, and exit
            if e.code in (128 + signal.SIGTERM, 128 + signal.SIGINT):
                raise  # preempted or requeued by Slurm, or cancelled: it runs again from its checkpoint
            raise RuntimeError(f"{self.job.name} ended with exit status {e.code} (see its log)") from None
        finally:
            STOP_SIGNALS.remove(signal.SIGUSR2)
        return {"job": self.job.name, "finished": True}


@contextlib.contextmanager
def _own_sessions():
    """submitit starts a local job's controller with a plain Popen, in the terminal's process
    group: a Ctrl-C meant for the submitter would stop every job. Start them in new sessions."""
    import submitit.local.local as local

    real = local.subprocess.Popen
    local.subprocess.Popen = lambda *a, **k: real(*a, start_new_session=True, **k)
    try:
        yield
    finally:
        local.subprocess.Popen = real


def _to_submit(out: Path, jobs: list[Job]) -> tuple[list[Job], list[dict]]:
    """The jobs without a result that are neither running nor waiting in a queue."""
    rows = job_states(out, jobs)
    todo = [j for j, r in zip(jobs, rows) if r["state"] in ("not started", "failed", "stopped")]
    return todo, rows


def _environment() -> None:
    """What a job's process needs to unpickle GridJob: this folder on its PYTHONPATH (submitit's
    workers, local or under sbatch, inherit the submitter's environment)."""
    paths = [str(ROOT), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))


def submit(execution: Execution, header: dict, out: Path, jobs: list[Job], writer) -> dict:
    """Submit every job of the grid that has no result and is not running or queued."""
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise UsageError("--executor local|slurm needs submitit: pip install submitit") from None
    todo, rows = _to_submit(out, jobs)
    busy = [r for r in rows if r["state"] in ("running", "pending")]
    if busy:
        print(
            f"{len(busy)} job(s) already running or queued, not submitted again: " + ", ".join(r["job"] for r in busy)
        )
    if not todo:
        print("nothing to submit: " + ("every job has finished" if not busy else "the rest is running or queued"))
        return writer.write(final=not busy, tolerant=bool(busy))
    _environment()
    words = shlex.split(header["command"])  # python SCRIPT.py ARGS...: the user's own command line
    script, argv = Path(words[1]).stem, words[2:]
    folder = out / "jobs"
    if execution.executor == "slurm":
        return _submit_slurm(execution, header, out, todo, folder, script, argv)
    return _run_local(execution, header, out, jobs, todo, folder, script, argv, writer)


def _submit_slurm(x: Execution, header, out, todo, folder, script, argv) -> dict:
    import submitit

    try:
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=MAX_REQUEUES)
    except RuntimeError as e:  # no srun on PATH: not a Slurm cluster (submitit's words)
        raise UsageError(f"--executor slurm: {e}") from None
    # the array runs as wide as the queue lets it, unless --jobs caps it (submitit's default is 1: %1)
    params = dict(
        time=x.slurm_time,
        job_name=f"engram-{out.resolve().name}",
        array_parallelism=x.jobs or len(todo),
        stderr_to_stdout=True,
        additional_parameters=dict(x.slurm_extra),
    )
    if x.slurm_partition:
        params["partition"] = x.slurm_partition
    if x.slurm_gpus:
        params["gpus_per_node"] = x.slurm_gpus
    if x.slurm_cpus:
        params["cpus_per_task"] = x.slurm_cpus
    executor.update_parameters(**params)
    try:
        with executor.batch():
            submitted = [(job, executor.submit(GridJob(script, argv, job, os.getcwd()))) for job in todo]
    except Exception as e:  # sbatch's own message (a wrong partition, an unknown option) in one line
        raise UsageError(
            f"sbatch refused the job array: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
        ) from None
    for job, sj in submitted:
        write_record(
            out,
            job,
            state="submitted",
            slurm_job_id=sj.job_id,
            local_job_id=None,
            gpu=None,
            log=str(sj.paths.stdout),
            submitted_at=time.time(),
            error=None,
        )
    print(
        f"submitted {len(submitted)} job(s) to Slurm as array {submitted[0][1].job_id.split('_')[0]}"
        + (f", {x.jobs} at a time" if x.jobs else "")
        + f"; logs in {folder}/"
    )
    watch = continue_command(header["command"], "slurm")
    print(f"watch them with: {watch} --status   (the last job to finish writes the complete report)")
    return {"submitted": [sj.job_id for _, sj in submitted]}


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (torch's ordinal i is the
    i-th of that list; without it, the i-th GPU of the machine)."""
    import torch

    if not torch.cuda.is_available():
        return []
    n = torch.cuda.device_count()
    parent = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    return parent[:n] if "CUDA_VISIBLE_DEVICES" in os.environ else [str(i) for i in range(n)]


def _gpus(x: Execution) -> list[str]:
    if x.device == "cpu":
        return []
    gpus = visible_gpus()
    if gpus and (x.jobs or 1) > len(gpus):
        raise UsageError(f"--jobs {x.jobs} exceeds the {len(gpus)} GPU(s) of this machine: one job per GPU")
    return gpus


def _others_gpus(out: Path, jobs: list[Job], mine: set) -> set[str]:
    """GPUs held by jobs of this grid that an earlier submitter started and that still run here."""
    import socket

    return {
        r["gpu"]
        for j, r in zip(jobs, job_states(out, jobs))
        if j not in mine
        and r["state"] in ("running", "pending")
        and r["gpu"] is not None
        and r["submit_host"] == socket.gethostname()
    }


def _run_local(x: Execution, header, out, jobs, todo, folder, script, argv, writer) -> dict:
    """Run the jobs as local processes, --jobs at once (one GPU each where there are GPUs, never one
    that a job of an earlier submitter still holds), and wait for them."""
    import socket

    import submitit

    gpus, width = _gpus(x), x.jobs or 1
    executor = submitit.LocalExecutor(folder=folder, max_num_timeout=MAX_REQUEUES)
    executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN, signal_delay_s=LOCAL_SIGNAL_DELAY_S)
    queue, running = list(todo), {}
    print(
        f"running {len(todo)} job(s), {width} at a time, {x.threads} thread(s) each"
        + (f", one GPU each ({len(gpus)} here)" if gpus else "")
        + f"; logs in {folder}/"
    )
    checked, taken = 0.0, set()
    again = continue_command(header["command"], "local")  # never --overwrite: it would delete what has finished since
    try:
        while queue or running:
            if queue and gpus and time.monotonic() - checked > 5:  # GPUs an earlier submitter's jobs hold
                taken, checked = _others_gpus(out, jobs, set(running)), time.monotonic()
            while queue and len(running) < width:
                free = [g for g in gpus if g not in taken and g not in {gpu for _, gpu in running.values()}]
                if gpus and not free:
                    break  # every GPU busy: wait for one
                job, gpu = queue.pop(0), (free[0] if gpus else None)
                if gpu is not None:
                    # submitit takes integers; GridJob sets the submitter's own name of the GPU (maybe a UUID)
                    executor.update_parameters(gpus_per_node=1, visible_gpus=(int(gpu) if gpu.isdigit() else 0,))
                with _own_sessions():
                    sj = executor.submit(GridJob(script, argv, job, os.getcwd(), gpu))
                write_record(
                    out,
                    job,
                    state="submitted",
                    local_job_id=sj.job_id,
                    slurm_job_id=None,
                    gpu=gpu,
                    submit_host=socket.gethostname(),
                    log=str(sj.paths.stderr),
                    submitted_at=time.time(),
                    error=None,
                )
                running[job] = (sj, gpu)
            time.sleep(0.5)
            if STOP:
                raise Interrupted(f"{STOP.name}: stopped waiting", STOP.signum)
            for job, (sj, gpu) in list(running.items()):
                if sj.done():
                    del running[job]
                    print(f"[{job.name}] {'finished' if job.finished(out) else 'ended without a result'}")
    except Interrupted as e:
        left = [j.name for j in running]
        raise Interrupted(
            f"{e}; {len(left)} job(s) keep running ({', '.join(left) or 'none'}), {len(queue)} not started; "
            f"watch them with: {again} --status; start the rest with: {again}",
            e.signum,
        ) from None
    rows = job_states(out, jobs)
    others = [r["job"] for r in rows if r["state"] in ("running", "pending")]  # an earlier submitter's, still going
    m = writer.write(final=not others, tolerant=bool(others))
    failed = [r for r in rows if r["state"] not in ("finished", "running", "pending")]
    if failed:
        print(status_table(rows), file=sys.stderr)
        raise JobsFailed(
            f"{len(failed)} of {len(rows)} job(s) did not finish ("
            + "; ".join(f"{r['job']}: {r['error'] or r['state']}" for r in failed)
            + f"); the others' results are kept; rerun what is "
            f"missing with: {again}"
        )
    if others:
        print(
            f"{len(others)} job(s) started by an earlier command still run ({', '.join(others)}); each rewrites the "
            f"report when it finishes; watch them with: {again} --status"
        )
    return m
