"""A grid's job states read against a queue that answers as a real one does: a fake `squeue` on
PATH (Slurm 22.05's answers: pending array elements in one combined line without -r, an error for
one forgotten id, none at all when the controller is down), local jobs whose process is gone,
records that outlive their results, unreadable results; and the lock's takeover under a race."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from run import grid, launch
from run.grid import Job, job_states, slurm_states, write_record

FAKE_SQUEUE = r'''#!/usr/bin/env python3
"""squeue as Slurm 22.05 answers `squeue -h [-r] -o "%i %T" -j IDS`, from the queue in $FAKE_QUEUE
("ID STATE" lines, one per array element); $FAKE_SQUEUE_MODE: ok, down, or ignore_r (an squeue
that answers as without -r)."""
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_SQUEUE_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
if os.environ.get("FAKE_SQUEUE_MODE") == "down":
    sys.exit("slurm_load_jobs error: Unable to contact slurm controller (connect failure)")
queue = [line.split() for line in open(os.environ["FAKE_QUEUE"]) if line.strip()]
wanted = args[args.index("-j") + 1].split(",")
known = [(i, s) for i, s in queue if i in wanted]
if not known and len(wanted) == 1:
    sys.exit("slurm_load_jobs error: Invalid job id specified")
if "-r" in args and os.environ.get("FAKE_SQUEUE_MODE") != "ignore_r":
    for i, s in known:
        print(i, s)
else:  # pending elements of one array in one line, as squeue prints them without -r
    pending = {}
    for i, s in queue:  # every pending element of an array asked about, as Slurm does
        base = i.split("_")[0]
        if s == "PENDING" and "_" in i and any(w.split("_")[0] == base for w, _ in known):
            pending.setdefault(base, []).append(int(i.split("_")[1]))
    for base, ids in pending.items():
        print(f"{base}_[{min(ids)}-{max(ids)}] PENDING" if len(ids) > 1 else f"{base}_{ids[0]} PENDING")
    for i, s in known:
        if s != "PENDING" or "_" not in i:
            print(i, s)
'''


@pytest.fixture
def queue(tmp_path, monkeypatch):
    """Write the fake queue's contents; the fake squeue is first on PATH while the test runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(FAKE_SQUEUE)
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_QUEUE", str(tmp_path / "queue.txt"))
    monkeypatch.setenv("FAKE_SQUEUE_LOG", str(tmp_path / "squeue.log"))
    monkeypatch.setenv("FAKE_SQUEUE_MODE", "ok")

    def set_queue(lines: dict[str, str], mode: str = "ok"):
        (tmp_path / "queue.txt").write_text("".join(f"{i} {s}\n" for i, s in lines.items()))
        monkeypatch.setenv("FAKE_SQUEUE_MODE", mode)

    set_queue({})
    return set_queue


JOBS = [Job(42, v) for v in ("sentiment_only", "dual_head", "dual_engram")]


def submitted(out: Path, ids: list[str]) -> None:
    for job, jid in zip(JOBS, ids):
        write_record(
            out, job, state="submitted", slurm_job_id=jid, local_job_id=None, log=None, submitted_at=time.time()
        )


def finish(out: Path, job: Job, result: str = '{"seconds": 60}') -> None:
    folder = job.folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(result)
    (folder / "arrays.npz").write_bytes(b"")


def states(out: Path) -> list[str]:
    return [r["state"] for r in job_states(out, JOBS)]


def test_expand_ids_reads_squeues_combined_array_lines():
    assert grid.expand_ids("7_[2-4,9%2]") == ["7_2", "7_3", "7_4", "7_9"]
    assert grid.expand_ids("7_[3]") == ["7_3"] and grid.expand_ids("7_3") == ["7_3"] and grid.expand_ids("12") == ["12"]


def test_pending_array_elements_are_pending_and_not_submitted_again(queue, tmp_path):
    out = tmp_path / "run"
    queue({"1_0": "RUNNING", "1_1": "PENDING", "1_2": "PENDING"})
    submitted(out, ["1_0", "1_1", "1_2"])
    assert states(out) == ["running", "pending", "pending"]
    assert "-r" in json.loads((tmp_path / "squeue.log").read_text().splitlines()[-1])  # one line per element
    todo, _ = launch._to_submit(out, JOBS)
    assert todo == []
    # an squeue that answers as without -r: "1_[1-2] PENDING" in one line, read the same way
    queue({"1_0": "RUNNING", "1_1": "PENDING", "1_2": "PENDING"}, mode="ignore_r")
    assert subprocess.run(
        ["squeue", "-h", "-r", "-o", "%i %T", "-j", "1_1,1_2"], capture_output=True, text=True
    ).stdout.splitlines() == ["1_[1-2] PENDING"]
    assert slurm_states(["1_0", "1_1", "1_2"]) == {"1_0": "RUNNING", "1_1": "PENDING", "1_2": "PENDING"}
    assert states(out) == ["running", "pending", "pending"] and launch._to_submit(out, JOBS)[0] == []


def test_a_running_job_gone_from_the_queue_is_failed_even_when_it_was_the_only_one_asked(queue, tmp_path):
    out = tmp_path / "run"
    job = JOBS[1]
    write_record(out, job, state="running", slurm_job_id="5_1", pid=999999, host="node-b", started_at=time.time())
    queue({})  # squeue's answer for one id it no longer knows: "Invalid job id specified", exit 1
    assert slurm_states(["5_1"]) == {}
    row = job_states(out, JOBS)[1]
    assert row["state"] == "failed" and row["error"].startswith("the process is gone without a result")
    assert launch._to_submit(out, JOBS)[0] == JOBS  # resubmitted (with the two never started)
    # several ids, none known: an empty answer, exit 0; the same reading
    queue({"9_0": "RUNNING"})
    assert slurm_states(["5_1", "5_2"]) == {} and job_states(out, JOBS)[1]["state"] == "failed"


def test_a_queue_that_cannot_be_asked_leaves_a_running_job_running(queue, tmp_path, monkeypatch):
    out = tmp_path / "run"
    write_record(out, JOBS[0], state="running", slurm_job_id="5_0", pid=999999, host="node-b", started_at=time.time())
    write_record(out, JOBS[1], state="submitted", slurm_job_id="5_1")
    queue({}, mode="down")
    assert slurm_states(["5_0", "5_1"]) is None
    assert states(out) == ["running", "pending", "not started"]
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))  # no squeue at all
    assert slurm_states(["5_0"]) is None and states(out) == ["running", "pending", "not started"]


def test_a_submitted_job_that_left_the_queue_without_starting_is_failed(queue, tmp_path):
    out = tmp_path / "run"
    submitted(out, ["3_0", "3_1", "3_2"])
    queue({"3_0": "RUNNING", "3_2": "REQUEUED"})
    rows = job_states(out, JOBS)
    assert [r["state"] for r in rows] == ["running", "failed", "pending"]
    assert rows[1]["error"] == "left the queue without starting"


def test_records_that_outlive_their_results_are_stale(queue, tmp_path):
    """'To start over, remove OUT/checkpoints': the records in OUT/jobs/ still say finished."""
    out = tmp_path / "run"
    for job in JOBS:
        finish(out, job)
        write_record(out, job, state="finished", slurm_job_id=f"4_{job.variant}")
    assert states(out) == ["finished"] * 3
    import shutil

    shutil.rmtree(out / "checkpoints")
    assert states(out) == ["not started"] * 3
    assert launch._to_submit(out, JOBS)[0] == JOBS


def test_a_local_job_that_died_before_training_is_failed_and_resubmitted(tmp_path):
    out = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = socket.gethostname()
    write_record(out, JOBS[0], state="submitted", local_job_id=str(dead.pid), submit_host=here, log=None)
    write_record(out, JOBS[1], state="submitted", local_job_id=str(os.getpid()), submit_host=here, log=None)  # alive
    write_record(out, JOBS[2], state="submitted", local_job_id="12345", submit_host="another-host", log=None)
    rows = job_states(out, JOBS)
    assert [r["state"] for r in rows] == ["failed", "pending", "pending"]
    assert rows[0]["error"] == "its process ended before training started (see its log)"
    assert launch._to_submit(out, JOBS)[0] == [JOBS[0]]


def test_a_zombie_counts_as_ended(tmp_path):
    from train.files import alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not alive(child.pid)  # ended, not yet reaped
    child.wait()
    assert not alive(child.pid) and alive(os.getpid())


def test_an_unreadable_result_is_failed_not_finished_and_the_grid_is_incomplete(tmp_path):
    out = tmp_path / "run"
    finish(out, JOBS[0])
    finish(out, JOBS[1], '{"seconds": 6')  # cut short
    write_record(out, JOBS[1], state="finished")
    rows = job_states(out, JOBS)
    assert [r["state"] for r in rows] == ["finished", "failed", "not started"]
    assert "result.json cannot be read" in rows[1]["error"]
    assert not JOBS[1].finished(out) and launch._to_submit(out, JOBS)[0] == JOBS[1:]
    assert list(grid.finished_results(out, JOBS)[42]) == ["sentiment_only"]


def test_gpus_an_earlier_submitters_running_jobs_hold_are_not_given_out(tmp_path):
    out = tmp_path / "run"
    here = socket.gethostname()
    write_record(
        out,
        JOBS[0],
        state="running",
        local_job_id=str(os.getpid()),
        pid=os.getpid(),
        host=here,
        submit_host=here,
        gpu="GPU-5b2c",
        started_at=time.time(),
    )
    write_record(out, JOBS[1], state="failed", local_job_id="1", submit_host=here, gpu="3")
    assert launch._others_gpus(out, JOBS, mine=set()) == {"GPU-5b2c"}
    assert launch._others_gpus(out, JOBS, mine={JOBS[0]}) == set()


def test_visible_gpus_are_the_parents_names_and_a_job_gets_its_own(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert launch.visible_gpus() == ["4", "5"]  # torch's cuda:1 is the machine's GPU 5
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aa,MIG-bb")
    assert launch.visible_gpus() == ["GPU-aa", "MIG-bb"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert launch.visible_gpus() == ["0", "1"]
    # the job sets the name it was given before anything starts CUDA
    (tmp_path / "fake_script.py").write_text(
        "import os, json\ndef main(argv):\n"
        "    json.dump({'gpu': os.environ.get('CUDA_VISIBLE_DEVICES'), 'argv': argv}, "
        f"open({str(tmp_path / 'seen.json')!r}, 'w'))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert launch.GridJob("fake_script", ["--seeds", "42"], JOBS[0], str(tmp_path), gpu="5")() == {
        "job": "seed42-sentiment_only",
        "finished": True,
    }
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen == {"gpu": "5", "argv": ["--seeds", "42", "--job", "42:sentiment_only"]}


# ----------------------------------------------------------------------------- the lock under a race


def _contend(folder: str, barrier, results, index: int) -> None:
    from train.files import FolderLock
    from train.stop import UsageError

    lock = FolderLock(Path(folder), "outputs", "contender")
    barrier.wait()
    try:
        lock.acquire()
    except UsageError:
        results[index] = 0
        return
    time.sleep(0.05)  # hold it while the other one tries
    mine = json.loads((Path(folder) / ".lock-outputs.json").read_text())["pid"] == os.getpid()
    results[index] = 1 if mine else -1  # -1: it believes it holds a lock the file says is another's
    lock.release()


def test_two_processes_taking_over_one_stale_lock_never_both_hold_it(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ctx = multiprocessing.get_context("fork")
    for attempt in range(25):
        folder = tmp_path / f"try{attempt}"
        folder.mkdir()
        stale = {"pid": dead.pid, "host": socket.gethostname(), "started": "earlier", "command": "killed"}
        (folder / ".lock-outputs.json").write_text(json.dumps(stale))
        barrier, results = ctx.Barrier(2), ctx.Array("i", [9, 9])
        procs = [ctx.Process(target=_contend, args=(str(folder), barrier, results, i)) for i in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert sorted(results[:]) == [0, 1], f"attempt {attempt}: {results[:]}"
        assert not (folder / ".lock-outputs.json").exists()  # the winner released its own


def test_a_release_never_removes_a_lock_another_process_holds(tmp_path):
    from train.files import FolderLock

    lock = FolderLock(tmp_path, "outputs").acquire()
    theirs = {"pid": 1, "host": "elsewhere", "started": "now", "command": "another"}
    (tmp_path / ".lock-outputs.json").write_text(json.dumps(theirs))  # taken over meanwhile
    lock.release()
    assert json.loads((tmp_path / ".lock-outputs.json").read_text()) == theirs


def test_another_hosts_lock_is_taken_over_once_seen_unchanged_for_stale_s(tmp_path, capsys):
    from train.files import FolderLock
    from train.stop import UsageError

    path = tmp_path / ".lock-outputs.json"
    path.write_text(json.dumps({"pid": 4242, "host": "node-a", "started": "then", "command": "x"}))
    with pytest.raises(UsageError, match="pid 4242 on node-a"):
        FolderLock(tmp_path, "outputs", wait_s=0.3).acquire()  # no stale_s: never taken over
    lock = FolderLock(tmp_path, "outputs", wait_s=5, stale_s=0.5)
    t0 = time.monotonic()
    lock.acquire()
    assert 0.5 <= time.monotonic() - t0 < 5 and json.loads(path.read_text())["pid"] == os.getpid()
    assert capsys.readouterr().err.strip() == (
        f"note: taking over the lock {path} left by pid 4242 on node-a "
        "(unchanged for 0.5 s: that run is taken for gone)"
    )
    lock.release()


def test_a_local_record_of_earlier_code_without_a_host_is_judged_here_and_its_dead_process_is_failed(tmp_path):
    """Records written before submit_host existed name no submitter, and no host when the job never
    started: a dead controller there is failed (and resubmitted), not pending forever."""
    out = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_record(out, JOBS[0], state="submitted", local_job_id=str(dead.pid), log=None)  # never started: no host
    write_record(
        out,
        JOBS[1],
        state="running",
        local_job_id=str(dead.pid),
        pid=dead.pid,
        host=socket.gethostname(),
        started_at=time.time(),
        log=None,
    )
    write_record(out, JOBS[2], state="submitted", local_job_id=str(os.getpid()), log=None)  # its controller is alive
    rows = job_states(out, JOBS)
    assert [r["state"] for r in rows] == ["failed", "failed", "pending"]
    assert rows[0]["error"] == "its process ended before training started (see its log)"
    assert launch._to_submit(out, JOBS)[0] == JOBS[:2]


def test_a_takeover_guard_is_judged_by_this_process_clock_not_by_its_mtime(tmp_path, monkeypatch, capsys):
    """A guard written by a host whose clock is an hour behind looks an hour old by its mtime: it
    must still count as a takeover in progress until this process has seen it unchanged for
    GUARD_STALE_S; then it is removed and the stale lock taken over."""
    from train.files import FolderLock
    from train.stop import UsageError

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / ".lock-outputs.json"
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "then", "command": "x"}))
    guard = tmp_path / ".lock-outputs.json.takeover"
    guard.write_text("")
    an_hour_ago = time.time() - 3600
    os.utime(guard, (an_hour_ago, an_hour_ago))
    monkeypatch.setattr(FolderLock, "GUARD_STALE_S", 1.5)
    with pytest.raises(UsageError, match="another run keeps taking it"):
        FolderLock(tmp_path, "outputs", wait_s=0.5).acquire()  # within 1.5 s of this process's first look
    assert guard.exists() and json.loads(lock.read_text())["pid"] == dead.pid
    taker = FolderLock(tmp_path, "outputs", wait_s=10)
    t0 = time.monotonic()
    taker.acquire()
    assert time.monotonic() - t0 >= 1.5 and json.loads(lock.read_text())["pid"] == os.getpid()
    assert not guard.exists() and "taking over the lock" in capsys.readouterr().err
    taker.release()


FAKE_SBATCH = r'''#!/usr/bin/env python3
"""sbatch as a Slurm controller answers a submission: the script is kept for the test to read."""
import os, shutil, sys
shutil.copy(sys.argv[-1], os.environ["FAKE_SBATCH_SCRIPT"])
print("Submitted batch job 4711")
'''


@pytest.mark.parametrize("extra, array", [((), "#SBATCH --array=0-2%3"), (("--jobs", "1"), "#SBATCH --array=0-2%1")])
def test_a_slurm_array_runs_as_wide_as_the_grid_unless_jobs_caps_it(extra, array, sst2_small, tmp_path, monkeypatch):
    """submitit's own default parallelism is 1 (%1: one job at a time): the array asks for the whole
    grid at once, or --jobs at once, as the script that sbatch is given says."""
    import experiment

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for it (a job's script would run it)
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SBATCH_SCRIPT", str(tmp_path / "script.sh"))
    out = tmp_path / "run"
    m = experiment.main(
        [
            "--data-dir",
            str(sst2_small),
            "--out",
            str(out),
            "--max-train",
            "32",
            "--max-eval",
            "40",
            "--epochs",
            "1",
            "--no-progress",
            "--executor",
            "slurm",
            "--slurm-time",
            "5",
            *extra,
        ]
    )
    assert m["submitted"] == ["4711_0", "4711_1", "4711_2"]
    script = (tmp_path / "script.sh").read_text()
    assert array in script.splitlines() and "#SBATCH --time=5" in script.splitlines()
    assert [record_of(out, j)["slurm_job_id"] for j in JOBS] == m["submitted"]


def record_of(out: Path, job: Job) -> dict:
    return json.loads((out / "jobs" / f"{job.name}.json").read_text())
