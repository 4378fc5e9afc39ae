"""A study as a grid of jobs: the local executor (submitit subprocesses) gives the serial run's
numbers; a local job that runs into its time limit mid-epoch is requeued and ends identical; a
killed job leaves the others' results and a report that names it, and the same command finishes
it; --status and --report-only start nothing. A real single-node Slurm (.ci/slurm-up) runs a
2-seed study as a job array, one job requeued mid-run with `scontrol requeue`: nothing is lost.

All runs: one thread per job (the same numbers in every process), a tiny model, real SST-2 rows."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import experiment
from run import launch
from tests.conftest import comparable, sst2_rows, tiny_flags

FLAGS = tiny_flags(epochs=3, max_train=None)


@pytest.fixture(scope="module")
def sst2_2k(tmp_path_factory) -> Path:
    """2,000 training rows (an epoch of a few seconds: long enough to be interrupted in) and 96
    validation rows."""
    return sst2_rows(tmp_path_factory.mktemp("sst2_2k"), 2000, 96, seed=1)


def args_of(data, out, *extra):
    return ["--data-dir", str(data), "--out", str(out), *FLAGS, *extra]


@pytest.fixture(scope="module")
def serial(sst2_2k, tmp_path_factory) -> Path:
    """The uninterrupted serial run of two seeds, one thread: what every grid must end equal to."""
    out = tmp_path_factory.mktemp("serial")
    m = experiment.main(args_of(sst2_2k, out, "--seeds", "42", "43"))
    assert m["complete"]
    return out


def record(out: Path, name: str) -> dict:
    try:
        return json.loads((out / "jobs" / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}


def runs_of(out: Path, seed: int) -> dict:
    """Each variant's run of `seed`, as comparable() gives it (no times, commands or paths)."""
    models = comparable(out)[0]["models"]
    return {v: [r for r in mm["runs"] if r["seed"] == seed] for v, mm in models.items()}


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# ----------------------------------------------------------------------------- local


def test_local_executor_two_jobs_at_once_gives_the_serial_numbers(serial, sst2_2k, tmp_path, capsys):
    out = tmp_path / "local"
    m = experiment.main(args_of(sst2_2k, out, "--seeds", "42", "43", "--executor", "local", "--jobs", "2"))
    assert m["complete"] and m["jobs"] == {**m["jobs"], "total": 6, "finished": 6, "failed": []}
    assert comparable(out) == comparable(serial)
    assert m["command"].endswith("--executor local --jobs 2") and "--job " not in m["command"]
    runs = [r for mm in m["models"].values() for r in mm["runs"]]
    assert len(runs) == 6
    for job in ("seed42-sentiment_only", "seed43-dual_engram"):
        rec = record(out, job)
        assert rec["state"] == "finished" and rec["local_job_id"] and rec["pid"] != os.getpid()
    result = json.loads((out / "checkpoints" / "seed43" / "dual_head" / "result.json").read_text())
    assert result["machine"]["threads"] == 1  # recorded in each result
    # nothing left to do: the same command submits nothing, and --status starts nothing
    capsys.readouterr()
    experiment.main(args_of(sst2_2k, out, "--seeds", "42", "43", "--executor", "local", "--jobs", "2"))
    assert "nothing to submit: every job has finished" in capsys.readouterr().out
    status = experiment.main(args_of(sst2_2k, out, "--seeds", "42", "43", "--status"))
    assert [r["state"] for r in status["jobs"]] == ["finished"] * 6
    assert "6 jobs: 6 finished" in capsys.readouterr().out


def startup_seconds() -> float:
    """What a job's process spends before it trains, as this machine is loaded now: a Python
    started and this project's modules (torch, transformers' tokenizers ...) imported, twice (the
    local executor's controller starts first, then the job's own process)."""
    import sys

    t0 = time.monotonic()
    root = Path(experiment.__file__).parent
    subprocess.run([sys.executable, "-c", "import submitit, experiment"], cwd=root, check=True)
    return 2 * (time.monotonic() - t0)


def test_a_local_job_past_its_time_limit_checkpoints_mid_epoch_is_requeued_and_ends_identical(
    sst2_2k, tmp_path, monkeypatch
):
    """submitit's local executor sends USR2 before the job's time limit (its own timer: the one test
    that relies on it): the job checkpoints at the next step boundary, submitit requeues it, and it
    resumes where it stopped, as many times as it takes. The limit comes from this machine's measured
    speed: USR2 after a job's startup and a quarter of its training (the uninterrupted run, timed
    here), so that a machine that runs the job twice as fast as it ran the reference (seen here when
    the load eased between the two: half would then come after the job's end) still stops it mid-run,
    and one twice as slow still makes progress each try (submitit requeues up to MAX_REQUEUES times).
    Where in an epoch the USR2 lands is up to the clock (each case is pinned in test_robustness)."""
    long = ["--seeds", "42", "--variants", "dual_head", "--epochs", "12"]
    t0 = time.monotonic()
    reference = experiment.main(args_of(sst2_2k, tmp_path / "uninterrupted", *long))
    training_s = time.monotonic() - t0
    grace = 15  # from USR2 to the kill: the current step, a checkpoint and the exit
    usr2_after = startup_seconds() + training_s / 4
    monkeypatch.setattr(launch, "LOCAL_TIMEOUT_MIN", (usr2_after + grace) / 60)
    monkeypatch.setattr(launch, "LOCAL_SIGNAL_DELAY_S", grace)
    out = tmp_path / "timeout"
    m = experiment.main(args_of(sst2_2k, out, *long, "--executor", "local"))
    assert m["complete"] and reference["complete"]
    logs = "".join(p.read_text() for p in sorted((out / "jobs").glob("*_log.*")))
    assert "SIGUSR2 received: stopping after the current step" in logs and "Requeued job" in logs, (
        f"USR2 after {usr2_after:.1f} s (training {training_s:.1f} s): no requeue"
    )
    # each stop resumes exactly where it checkpointed: mid-epoch (after a step; after the last step,
    # when the USR2 came before or during the evaluation), at an epoch's first step (the last epoch's
    # checkpoint holds everything), or during the analysis after the last epoch (it analyses again)
    positions = re.findall(r"stopped at step (\d+) of epoch (\d+): checkpoint", logs)
    boundaries = re.findall(r"stopped: SIGUSR2 during dual_head seed 42, epoch (\d+), step 1(?!\d)", logs)
    analysed = logs.count("stopped: SIGUSR2 during the analysis of dual_head")
    assert len(positions) + len(boundaries) + analysed == logs.count("stopped: SIGUSR2 during") > 0
    for step, epoch in positions:
        assert f"resuming after step {step} of epoch {epoch} from" in logs
    for epoch in boundaries:
        assert f"resuming after epoch {int(epoch) - 1} from" in logs
    assert logs.count("resuming after epoch 12 from") >= analysed
    assert comparable(out) == comparable(tmp_path / "uninterrupted")


HOOK_SITE = """
import json
import os
import signal
import time

if os.environ.get("SUBMITIT_LOCAL_JOB_ID") and os.environ.get("JOB_HOOK"):  # a job's process, not its controller's
    from train import loop as training
    hook, real, seen = json.loads(os.environ["JOB_HOOK"]), training.run_batch, {}

    def run_batch(model, *a, **k):
        out = real(model, *a, **k)
        if model.training and model.variant in hook["variants"]:
            n = seen[model.variant] = seen.get(model.variant, 0) + 1
            marker = hook["marker"] + "-" + model.variant
            if n == hook["step"] and not os.path.exists(marker):  # the first try only
                open(marker, "w").close()
                if hook["action"] == "crash":
                    raise RuntimeError("simulated crash")
                if hook["action"] == "kill":  # a lost node, an out-of-memory kill: no chance to clean up
                    os.kill(os.getpid(), signal.SIGKILL)
                deadline = time.monotonic() + 600
                while hook["action"] == "pause" and not os.path.exists(hook["release"]) and time.monotonic() < deadline:
                    time.sleep(0.05)  # still running, for as long as the test needs
        return out

    training.run_batch = run_batch
"""


def job_hook(monkeypatch, tmp_path, action: str, variants: list[str], step: int) -> dict:
    """Make each job of `variants` (in its own process, started by the local executor) crash, be
    killed, or pause until hook["release"] exists, after its step-th training batch, on its first
    try: where the job is when it happens is chosen, not left to the machine's speed. A file
    hook["marker"]-<variant> says it has happened."""
    site = tmp_path / "hook_site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HOOK_SITE)
    hook = {
        "action": action,
        "variants": variants,
        "step": step,
        "marker": str(tmp_path / "hooked"),
        "release": str(tmp_path / "release"),
    }
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("JOB_HOOK", json.dumps(hook))
    return hook


SLOW_EVAL_SITE = """
import os
import signal

if os.environ.get("SUBMITIT_LOCAL_JOB_ID"):  # a job's process, not the submitter's nor submitit's controller
    from train import loop as training
    real, seen = training.run_batch, {"n": 0}

    def run_batch(model, *a, **k):
        out = real(model, *a, **k)
        if not model.training and model.variant == "dual_head":
            seen["n"] += 1
            marker = os.environ["USR2_MARKER"]
            if seen["n"] == 4 and not os.path.exists(marker):  # epoch 2's evaluation, first batch; first try only
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGUSR2)  # as submitit's controller does before a time limit
        return out

    training.run_batch = run_batch
"""


def test_a_local_job_sent_usr2_during_its_evaluation_is_requeued_and_ends_identical(
    serial, sst2_2k, tmp_path, monkeypatch
):
    """At 7B an evaluation takes minutes: USR2 (the time limit is near) must not wait for its end,
    nor lose the trained epoch. The job stops at the evaluation's next batch with the epoch kept
    as the position after its last step, is requeued, evaluates that epoch again and ends equal."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_EVAL_SITE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("USR2_MARKER", str(tmp_path / "usr2-sent"))
    out = tmp_path / "usr2"
    m = experiment.main(args_of(sst2_2k, out, "--seeds", "42", "--variants", "dual_head", "--executor", "local"))
    assert (tmp_path / "usr2-sent").exists() and m["complete"]
    logs = "".join(p.read_text() for p in sorted((out / "jobs").glob("*_log.*")))
    steps = -(-2000 // 16)  # the epoch's batches
    assert "stopped: SIGUSR2 during dual_head seed 42, epoch 2, its evaluation" in logs
    assert f"stopped at step {steps} of epoch 2: checkpoint" in logs and "Requeued job" in logs
    assert f"resuming after step {steps} of epoch 2 from" in logs
    assert runs_of(out, 42)["dual_head"] == runs_of(serial, 42)["dual_head"]


def test_a_killed_job_leaves_the_others_and_a_report_naming_it_and_the_same_command_finishes_it(
    serial, sst2_2k, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "killed"
    argv = args_of(sst2_2k, out, "--seeds", "42", "--executor", "local", "--jobs", "2")
    victim = "seed42-dual_head"
    steps = -(-2000 // 16)  # an epoch's batches
    # SIGKILLed 10 steps into its second epoch, by itself: on any machine, after epoch 1's checkpoint
    hook = job_hook(monkeypatch, tmp_path, "kill", ["dual_head"], steps + 10)
    with pytest.raises(SystemExit) as e:
        experiment.main(argv)
    assert e.value.code == 1 and Path(hook["marker"] + "-dual_head").exists()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(
        "error: 1 of 3 job(s) did not finish (seed42-dual_head: the process is gone"
    ) and err.endswith(
        f"the others' results are kept; rerun what is missing with: "
        f"{json.loads((out / 'metrics.json').read_text())['command']}"
    )
    m = json.loads((out / "metrics.json").read_text())
    assert not m["complete"] and sorted(m["models"]) == ["dual_engram", "sentiment_only"]
    assert [f["job"] for f in m["jobs"]["failed"]] == [victim]
    report = (out / "REPORT.md").read_text()
    assert f"**1 job(s) failed**: `{victim}`: the process is gone" in report and m["jobs"]["rerun"] in report
    status = experiment.main(args_of(sst2_2k, out, "--seeds", "42", "--status"))
    assert [r["state"] for r in status["jobs"]] == ["finished", "failed", "finished"]
    # the same command runs only what is missing, from the killed job's last checkpoint
    capsys.readouterr()
    m = experiment.main(argv)
    assert m["complete"] and not m["jobs"]["failed"]
    assert "running 1 job(s)" in capsys.readouterr().out
    assert "resuming after epoch 1 from" in "".join(p.read_text() for p in (out / "jobs").glob("*_log.out"))
    assert runs_of(out, 42) == runs_of(serial, 42)


def test_the_rerun_advice_after_a_failed_job_of_an_overwrite_run_drops_overwrite(
    sst2_2k, tmp_path, capsys, monkeypatch
):
    """--overwrite started the grid over; the rerun it advises after a job failed must not: run as
    advised it would delete the finished jobs and train them again (at 7B, a day of GPU)."""
    out = tmp_path / "overwrite"
    argv = args_of(
        sst2_2k,
        out,
        "--seeds",
        "42",
        "--variants",
        "sentiment_only",
        "dual_head",
        "--max-train",
        "64",
        "--executor",
        "local",
        "--overwrite",
    )
    job_hook(monkeypatch, tmp_path, "crash", ["dual_head"], 2)
    with pytest.raises(SystemExit) as e:
        experiment.main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    advised = shlex.join(["python", "experiment.py", *argv[:-1]])
    assert err.startswith("error: 1 of 2 job(s) did not finish (seed42-dual_head: ") and err.endswith(
        f"rerun what is missing with: {advised}"
    ), err
    m = json.loads((out / "metrics.json").read_text())
    assert m["jobs"]["rerun"] == advised and advised in (out / "REPORT.md").read_text()
    kept = (out / "checkpoints" / "seed42" / "sentiment_only" / "result.json").read_bytes()
    capsys.readouterr()
    m = experiment.main(shlex.split(advised)[2:])  # as advised: the finished job is kept, the failed one runs
    assert m["complete"] and "running 1 job(s)" in capsys.readouterr().out
    assert (out / "checkpoints" / "seed42" / "sentiment_only" / "result.json").read_bytes() == kept


def test_ctrl_c_in_the_local_submitter_leaves_its_jobs_running_and_says_how_to_watch_them(
    serial, sst2_2k, tmp_path, monkeypatch
):
    """A terminal's Ctrl-C reaches the whole foreground process group: the submitter stops waiting,
    the jobs (in their own sessions) go on and finish, and the same command later runs the rest.
    The two jobs pause at their first step until the submitter has answered, however fast they train."""
    import sys

    out = tmp_path / "ctrlc"
    argv = args_of(sst2_2k, out, "--seeds", "42", "--executor", "local", "--jobs", "2", "--overwrite")
    hook = job_hook(monkeypatch, tmp_path, "pause", ["sentiment_only", "dual_head"], 1)
    root = Path(experiment.__file__).parent
    err_path = tmp_path / "submitter.err"
    with open(err_path, "w") as err_file:  # a file, not a pipe: the paused jobs inherit it and keep it open
        proc = subprocess.Popen(
            [sys.executable, "experiment.py", *argv],
            cwd=root,
            stdout=subprocess.DEVNULL,
            stderr=err_file,
            start_new_session=True,
        )
    try:
        wait_for(
            lambda: all(Path(f"{hook['marker']}-{v}").exists() for v in ("sentiment_only", "dual_head")),
            300,
            "two jobs running",
        )
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        proc.wait(timeout=60)
    finally:
        Path(hook["release"]).touch()
        if proc.poll() is None:
            proc.kill()
    err = err_path.read_text()
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        "stopped: SIGINT: stopped waiting; 2 job(s) keep running (seed42-sentiment_only, seed42-dual_head), "
        "1 not started; watch them with: python experiment.py "
    ) and last.endswith("--status; start the rest with: " + shlex.join(["python", "experiment.py", *argv[:-1]])), last
    assert "--overwrite" not in last  # it would delete what the running jobs finish
    # the two jobs were not stopped: they finish on their own
    wait_for(
        lambda: all(record(out, j).get("state") == "finished" for j in ("seed42-sentiment_only", "seed42-dual_head")),
        300,
        "the running jobs to finish",
    )
    m = experiment.main(argv[:-1])
    assert m["complete"] and runs_of(out, 42) == runs_of(serial, 42)


def test_rerunning_the_local_command_while_an_earlier_submitters_job_runs_leaves_it_be(
    serial, sst2_2k, tmp_path, capsys
):
    """An earlier submitter (stopped with Ctrl-C) left a job running: the same command runs only the
    others, neither calls that one failed nor exits 1, and says it still runs; once it is gone
    without a result, the next rerun runs it."""
    import socket
    import sys

    out = tmp_path / "rerun"
    argv = args_of(sst2_2k, out, "--seeds", "42", "--executor", "local", "--jobs", "2")
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # that job's process
    try:
        here = socket.gethostname()
        launch.write_record(
            out,
            launch.Job(42, "dual_engram"),
            state="running",
            local_job_id=str(stand_in.pid),
            pid=stand_in.pid,
            host=here,
            submit_host=here,
            started_at=time.time(),
            log=None,
        )
        capsys.readouterr()
        m = experiment.main(argv)
        said = capsys.readouterr().out
        assert "1 job(s) already running or queued, not submitted again: seed42-dual_engram" in said
        assert "running 2 job(s)" in said
        assert "1 job(s) started by an earlier command still run (seed42-dual_engram)" in said
        assert not m["complete"] and sorted(m["models"]) == ["dual_head", "sentiment_only"]
    finally:
        stand_in.kill()
        stand_in.wait()
    status = experiment.main([*argv, "--status"])
    assert [r["state"] for r in status["jobs"]] == ["finished", "finished", "failed"]
    m = experiment.main(argv)
    assert m["complete"] and runs_of(out, 42) == runs_of(serial, 42)


def test_report_only_rewrites_the_outputs_from_the_finished_jobs_and_trains_nothing(
    serial, sst2_2k, tmp_path, monkeypatch
):
    out = tmp_path / "copy"
    shutil.copytree(serial, out)
    for name in ("metrics.json", "REPORT.md", "learning_curves.png"):
        (out / name).unlink()
    monkeypatch.setattr("run.study.train_variant", lambda *a, **k: pytest.fail("--report-only trained"))
    m = experiment.main(args_of(sst2_2k, out, "--seeds", "42", "43", "--report-only"))
    assert m["complete"] and comparable(out) == comparable(serial)
    assert (out / "REPORT.md").is_file() and (out / "learning_curves.png").is_file()


def finished_copy(serial: Path, to: Path) -> Path:
    """The two-seed serial run's folder, with no engram figure on disk."""
    shutil.copytree(serial, to)
    for name in ("engram_clusters.png", ".engram_clusters.json"):
        (to / name).unlink()
    return to


def test_the_engram_figure_is_drawn_once_and_outside_the_outputs_lock(serial, sst2_2k, tmp_path, monkeypatch):
    """Its two t-SNEs take minutes at 7B: other writers must not wait for them, and a rewrite of the
    outputs does not draw them again while the figure on disk is current."""
    from run import study

    out = finished_copy(serial, tmp_path / "copy")
    real, draws = study.engram_clusters, []

    def draw(*a, **k):
        draws.append(not (out / ".lock-outputs.json").exists())  # True: drawn with the lock free
        return real(*a, **k)

    monkeypatch.setattr(study, "engram_clusters", draw)
    argv = args_of(sst2_2k, out, "--seeds", "42", "43", "--report-only")
    experiment.main(argv)
    assert draws == [True] and (out / "engram_clusters.png").is_file()
    assert json.loads((out / ".engram_clusters.json").read_text())["seed"] == 42
    experiment.main(argv)
    assert draws == [True]  # current: not drawn again


def test_the_engram_figure_shows_the_first_seed_even_when_a_later_seeds_writer_draws_first(
    serial, sst2_2k, tmp_path, monkeypatch
):
    """Seed 43's job finishes first and draws its figure outside the lock; meanwhile seed 42's Model 3
    finishes and its writer draws and writes seed 42's. Seed 43's writer, once it holds the lock,
    must not put its own over it (on Slurm no later write would mend it): it reads the results again
    inside the lock and sees that they now ask for seed 42's."""
    from run import study

    out = finished_copy(serial, tmp_path / "race")
    result = out / "checkpoints" / "seed42" / "dual_engram" / "result.json"
    aside = result.with_name("result.json.aside")
    result.rename(aside)  # seed 42's Model 3 has not finished yet
    argv = args_of(sst2_2k, out, "--seeds", "42", "43", "--report-only")
    monkeypatch.setattr(study.Outputs, "LOCK_WAIT_S", 30)  # a writer that drew inside the lock would make this wait
    real, drawn = study.engram_clusters, []

    def draw(engrams, labels, clusters, pooled, title, seed):
        drawn.append(seed)
        if len(drawn) == 1:  # seed 43's writer, between its drawing and its lock: seed 42 finishes and writes
            aside.rename(result)
            experiment.main(argv)
            assert json.loads((out / ".engram_clusters.json").read_text())["seed"] == 42
        return real(engrams, labels, clusters, pooled, title, seed)

    monkeypatch.setattr(study, "engram_clusters", draw)
    experiment.main(argv)
    assert drawn == [43, 42]  # and not drawn again: the one on disk was current
    assert json.loads((out / ".engram_clusters.json").read_text())["seed"] == 42
    m = json.loads((out / "metrics.json").read_text())
    assert m["complete"] and comparable(out) == comparable(serial)


def test_an_outputs_lock_left_on_another_host_is_taken_over_by_a_writer_after_lock_stale_s(
    serial, sst2_2k, tmp_path, monkeypatch, capsys
):
    """A writer that died on its node leaves the outputs lock: the next writer (here --report-only,
    through study.Outputs) takes it over once it has seen it unchanged for LOCK_STALE_S (5 minutes;
    here 1 s), and not before."""
    from run import study

    out = tmp_path / "copy"
    shutil.copytree(serial, out)
    (out / "metrics.json").unlink()
    lock = out / ".lock-outputs.json"
    lock.write_text(json.dumps({"pid": 4242, "host": "node-a", "started": "then", "command": "python experiment.py"}))
    argv = args_of(sst2_2k, out, "--seeds", "42", "43", "--report-only")
    monkeypatch.setattr(study.Outputs, "LOCK_STALE_S", 1.0)
    monkeypatch.setattr(study.Outputs, "LOCK_WAIT_S", 0.5)  # gives up before it would take it over
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        experiment.main(argv)
    assert e.value.code == 2 and "pid 4242 on node-a" in capsys.readouterr().err and lock.exists()
    monkeypatch.setattr(study.Outputs, "LOCK_WAIT_S", 30)
    t0 = time.monotonic()
    m = experiment.main(argv)
    assert time.monotonic() - t0 >= 1.0 and m["complete"] and comparable(out) == comparable(serial)
    assert f"note: taking over the lock {lock} left by pid 4242 on node-a" in capsys.readouterr().err
    assert not lock.exists()


def test_executor_settings_that_cannot_work_are_one_line_errors(sst2_2k, tmp_path, capsys):
    for extra, message in (
        (["--executor", "slurm"], "--executor slurm needs --slurm-time MINUTES"),
        (["--jobs", "2"], "--jobs 2 needs --executor local or slurm"),
        (["--variants", "dual_head", "dual_head"], "--variants repeats a variant"),
    ):
        with pytest.raises(SystemExit) as e:
            experiment.main(args_of(sst2_2k, tmp_path / "x", *extra))
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith(f"error: {message}") and "\n" not in err, err


# ----------------------------------------------------------------------------- a real Slurm


def slurm_up() -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s.strip() in ("idle", "mixed", "allocated") for s in out.stdout.splitlines())


@pytest.fixture(scope="module")
def slurm():
    if not slurm_up():
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but no Slurm node is up: .ci/slurm-up must start one before the tests")
        pytest.skip("no Slurm here (sinfo shows no idle node); .ci/slurm-up starts a single-node one")


def test_a_slurm_job_array_requeued_mid_run_ends_equal_to_the_serial_run(slurm, serial, sst2_2k, tmp_path):
    out = tmp_path / "slurm"
    argv = args_of(
        sst2_2k, out, "--seeds", "42", "43", "--executor", "slurm", "--slurm-time", "20", "--slurm-cpus", "1"
    )
    submitted = experiment.main(argv)["submitted"]
    assert len(submitted) == 6 and len({j.split("_")[0] for j in submitted}) == 1  # one array
    # as wide as the grid when --jobs is not given (submitit's own default, %1, would run one at a time)
    assert "#SBATCH --array=0-5%6" in next((out / "jobs").glob("*submission*")).read_text()
    victim = "seed42-dual_head"
    folder = out / "checkpoints" / "seed42" / "dual_head"
    wait_for(
        lambda: record(out, victim).get("state") == "running" and (folder / "epoch_001").is_dir(),
        300,
        "dual_head seed 42 to train an epoch under Slurm",
    )
    job_id = record(out, victim)["slurm_job_id"]
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
    array = job_id.split("_")[0]
    wait_for(
        lambda: not subprocess.run(["squeue", "-h", "-j", array], capture_output=True, text=True).stdout.strip(),
        600,
        "the array to leave the queue",
    )
    rec = record(out, victim)
    assert rec["state"] == "finished" and rec["restarts"] >= 1  # it ran again after the requeue
    log = (out / "jobs" / f"{job_id}_0_log.out").read_text()
    assert "SIGTERM received: stopping after the current step" in log and "resuming after" in log
    assert comparable(out) == comparable(serial)
    status = experiment.main([*argv, "--status"])
    assert [r["state"] for r in status["jobs"]] == ["finished"] * 6


def squeue_ids(array: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", array], capture_output=True, text=True, timeout=30)
    return sorted(out.stdout.split())


def test_a_throttled_slurm_array_pending_jobs_are_not_resubmitted_and_a_killed_or_cancelled_job_is_rerun_alone(
    slurm, serial, sst2_2k, tmp_path, capsys
):
    """Three jobs, one at a time (--jobs 1): the two waiting are pending (squeue answers for them in
    one line without -r), and a rerun submits nothing; a job whose process is killed while it runs
    is failed once Slurm has it out of the queue, and a rerun submits it alone; a job cancelled with
    scancel is stopped, and a rerun submits it alone; the study ends with the serial run's numbers."""
    out = tmp_path / "throttled"
    argv = args_of(
        sst2_2k, out, "--seeds", "42", "--executor", "slurm", "--jobs", "1", "--slurm-time", "20", "--slurm-cpus", "1"
    )
    submitted = experiment.main(argv)["submitted"]
    array = submitted[0].split("_")[0]
    script = next((out / "jobs").glob("*submission*")).read_text()
    assert "#SBATCH --array=0-2%1" in script
    wait_for(lambda: record(out, "seed42-sentiment_only").get("state") == "running", 300, "the first job to start")
    status = experiment.main([*argv, "--status"])
    assert [r["state"] for r in status["jobs"]] == ["running", "pending", "pending"]
    capsys.readouterr()
    experiment.main(argv)  # nothing is submitted twice
    assert "nothing to submit: the rest is running or queued" in capsys.readouterr().out
    assert squeue_ids(array) == sorted(submitted)
    # a job killed while it trains (out of memory, a lost node): no chance to checkpoint or to write its
    # record. (scancel would not do: Slurm's SIGTERM reaches the job first, and it stops cleanly.)
    victim = "seed42-sentiment_only"
    wait_for(lambda: (out / "checkpoints" / "seed42" / "sentiment_only" / "epoch_001").is_dir(), 300, "its first epoch")
    os.kill(record(out, victim)["pid"], signal.SIGKILL)
    wait_for(
        lambda: record(out, victim)["slurm_job_id"] not in squeue_ids(array), 120, "the killed job to leave the queue"
    )
    status = experiment.main([*argv, "--status"])
    row = status["jobs"][0]
    assert row["state"] == "failed" and row["error"].startswith("the process is gone"), row
    capsys.readouterr()
    again = experiment.main(argv)["submitted"]
    assert len(again) == 1 and again[0] not in submitted
    # scancel of the next running job: Slurm's SIGTERM reaches it first, it checkpoints and is "stopped";
    # a rerun submits it alone, and it resumes from that checkpoint
    cancelled = "seed42-dual_head"
    wait_for(
        lambda: (
            record(out, cancelled).get("state") == "running"
            and (out / "checkpoints" / "seed42" / "dual_head" / "epoch_001").is_dir()
        ),
        300,
        "dual_head's first epoch",
    )
    cancelled_id = record(out, cancelled)["slurm_job_id"]
    subprocess.run(["scancel", cancelled_id], check=True, timeout=30)
    wait_for(lambda: cancelled_id not in squeue_ids(array), 120, "the cancelled job to leave the queue")
    row = experiment.main([*argv, "--status"])["jobs"][1]
    assert row["state"] == "stopped" and record(out, cancelled)["error"].startswith("SIGTERM"), (
        row,
        record(out, cancelled),
    )
    third = experiment.main(argv)["submitted"]
    assert len(third) == 1 and third[0] not in submitted + again
    arrays = [array, again[0].split("_")[0], third[0].split("_")[0]]
    wait_for(lambda: not any(squeue_ids(a) for a in arrays), 900, "every job to leave the queue")
    status = experiment.main([*argv, "--status"])
    assert [r["state"] for r in status["jobs"]] == ["finished"] * 3
    for rerun in (again[0], third[0]):
        assert "resuming after" in next((out / "jobs").glob(f"{rerun}_*log.out")).read_text()
    m = json.loads((out / "metrics.json").read_text())
    assert m["complete"] and runs_of(out, 42) == runs_of(serial, 42)
