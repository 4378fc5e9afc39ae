"""Runs that survive, round 2: cut checkpoints, the checkpoints kept, SIGINT / SIGTERM, the
output-folder lock, unreadable data, and seeds out of range.

The end-to-end runs use a deliberately tiny model and a few dozen rows, one thread for torch
and the BLAS libraries (so that an in-process run and a subprocess compute the same numbers),
and share one uninterrupted baseline run."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import experiment
from run import cli
from tests.conftest import comparable, crash_after_saving, on_training_step, tiny_flags
from train import checkpoints
from train.checkpoints import CheckpointError, complete_checkpoints, resume_from, save_checkpoint
from train.data import Split, read_tsv
from train.stop import STOP, Interrupted, UsageError, check_stop

ROOT = Path(__file__).resolve().parents[1]
# tiny and fast, yet several steps per epoch (64 rows in batches of 16) and both labels well
# represented among the 40 validation rows; 3 epochs so that a checkpoint can be cut and another
# fallen back to, and so that a signal after epoch 1 arrives while training still goes on
FLAGS = tiny_flags(epochs=3)
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def argv(data, out, *extra):
    return ["--data-dir", str(data), "--out", str(out), *FLAGS, *extra]


def run_small(data, out, *extra):
    return experiment.main(argv(data, out, *extra))


def one_line(err: str) -> str:
    err = err.strip()
    assert err and err.count("\n") == 0, f"expected one line on stderr, got:\n{err}"
    return err


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One BLAS thread (sklearn's probes) and restore torch's thread count afterwards (--threads 1 sets it)."""
    import scipy.optimize  # noqa: F401  (load every BLAS first: threadpoolctl limits the loaded ones)
    import sklearn.cluster
    import sklearn.linear_model
    import sklearn.manifold  # noqa: F401
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_stop_left():
    """A stop request never leaks from one test into the next."""
    STOP.signum = None
    yield
    STOP.signum = None


@pytest.fixture(scope="module")
def baseline(sst2_small, tmp_path_factory) -> Path:
    """One uninterrupted run with FLAGS: what every crashed, cut or stopped run must end up equal to."""
    out = tmp_path_factory.mktemp("baseline")
    m = run_small(sst2_small, out)
    assert m["complete"] and m["stopped"] is None
    return out


class Crash(Exception):
    """Stands in for a crash (a killed process, a lost machine)."""


@pytest.fixture(scope="module")
def crashed(sst2_small, tmp_path_factory) -> Path:
    """A run that crashed right after dual_head's epoch 2 was saved: sentiment_only finished,
    dual_head has epoch_001 and epoch_002."""
    out = tmp_path_factory.mktemp("crashed")
    with pytest.MonkeyPatch.context() as mp:
        crash_after_saving(mp, "dual_head", 2, Crash)
        with pytest.raises(Crash):
            run_small(sst2_small, out)
    folder = out / "checkpoints" / "seed42" / "dual_head"
    assert [p.name for p in complete_checkpoints(folder)] == ["epoch_002", "epoch_001"]
    assert no_lock_left(out)  # the locks are released even by a crash
    return out


# ----------------------------------------------------------------------------- 1. cut checkpoints


def test_cut_newest_checkpoint_falls_back_one_epoch_and_ends_equal(crashed, baseline, sst2_small, tmp_path, capfd):
    out = tmp_path / "run"
    shutil.copytree(crashed, out)
    cut = out / "checkpoints" / "seed42" / "dual_head" / "epoch_002"
    os.truncate(cut / "trainable.safetensors", 100)
    capfd.readouterr()
    m = run_small(sst2_small, out, "--resume")  # returns normally: no exception, no SystemExit
    err = capfd.readouterr().err
    assert "Traceback" not in err
    (warning,) = warnings_in(err)
    assert warning.startswith(f"warning: checkpoint {cut} cannot be read (")
    assert warning.endswith("; falling back to epoch_001")
    assert m["complete"] and m["stopped"] is None
    assert comparable(out) == comparable(baseline)


def test_every_checkpoint_cut_starts_the_variant_over_and_ends_equal(crashed, baseline, sst2_small, tmp_path, capfd):
    out = tmp_path / "run"
    shutil.copytree(crashed, out)
    folder = out / "checkpoints" / "seed42" / "dual_head"
    for epoch in ("epoch_001", "epoch_002"):
        os.truncate(folder / epoch / "trainable.safetensors", 100)
    capfd.readouterr()
    m = run_small(sst2_small, out, "--resume")
    err = capfd.readouterr().err
    assert "Traceback" not in err
    first, last = warnings_in(err)  # one line per unreadable checkpoint, newest first
    assert first.startswith(f"warning: checkpoint {folder / 'epoch_002'} cannot be read (")
    assert first.endswith("; falling back to epoch_001")
    assert last.startswith(f"warning: checkpoint {folder / 'epoch_001'} cannot be read (")
    assert last.endswith("; starting dual_head seed 42 over")
    assert m["complete"]
    assert comparable(out) == comparable(baseline)


@pytest.mark.parametrize("damage", ["cut", "garbage_state", "no_rng"])
def test_resume_from_reports_each_unreadable_checkpoint_in_one_line(tmp_path, capsys, damage):
    model, opt = tiny_model()
    for epoch in (1, 2):
        with torch.no_grad():
            model.weight.fill_(float(epoch))
        save_checkpoint(tmp_path, epoch, model, opt, None, None, {"history": [epoch]})
    newest = tmp_path / "epoch_002"
    if damage == "cut":
        os.truncate(newest / "trainable.safetensors", 100)
    elif damage == "garbage_state":
        (newest / "state.json").write_text("{not json")
    else:
        (newest / "rng.safetensors").unlink()
    capsys.readouterr()
    fresh, opt2 = tiny_model()
    state = resume_from(tmp_path, "m seed 1", fresh, opt2, None, None)
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"warning: checkpoint {newest} cannot be read (") and err.endswith(
        "; falling back to epoch_001"
    )
    assert state["epoch"] == 1 and state["history"] == [1]
    assert torch.equal(fresh.weight, torch.ones_like(fresh.weight))  # epoch 1's weights were loaded
    for f in ("trainable.safetensors", "state.json"):
        (tmp_path / "epoch_001" / f).write_bytes(b"\x00" * 10)
    assert resume_from(tmp_path, "m seed 1", *tiny_model(), None, None) is None
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("; starting m seed 1 over")


def test_unreadable_result_json_finishes_the_variant_again_from_its_checkpoints(baseline, sst2_small, tmp_path, capfd):
    out = tmp_path / "run"
    shutil.copytree(baseline, out)
    result = out / "checkpoints" / "seed42" / "dual_engram" / "result.json"
    result.write_text(result.read_text()[:50])
    capfd.readouterr()
    m = run_small(sst2_small, out, "--resume")
    err = capfd.readouterr().err
    (warning,) = warnings_in(err)
    assert warning == (
        f"warning: {result} cannot be read (JSONDecodeError); finishing dual_engram seed 42 again from its checkpoints"
    )
    assert m["complete"] and json.loads(result.read_text())["history"]
    assert comparable(out) == comparable(baseline)


# ----------------------------------------------------------------------------- 2. the checkpoints kept


def tiny_model():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.Adam(model.parameters(), lr=0.1)


def test_save_checkpoint_keeps_the_two_newest_complete_epochs(tmp_path):
    model, opt = tiny_model()
    for epoch in range(1, 5):
        path = save_checkpoint(tmp_path, epoch, model, opt, None, None, {"history": []})
        assert path == tmp_path / f"epoch_{epoch:03d}"
        kept = [p.name for p in complete_checkpoints(tmp_path)]
        assert kept == [f"epoch_{e:03d}" for e in range(epoch, max(0, epoch - 2), -1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_003", "epoch_004"]  # no temporary folder left
    assert checkpoints.read_checkpoint(tmp_path / "epoch_004")["state"]["epoch"] == 4


def test_failed_read_back_never_deletes_older_epochs(tmp_path, monkeypatch):
    model, opt = tiny_model()
    for epoch in (1, 2):
        save_checkpoint(tmp_path, epoch, model, opt, None, None, {"history": []})
    real_read = checkpoints.read_checkpoint

    def unreadable_epoch_3(path):
        if path.name == "epoch_003":
            raise CheckpointError("simulated bad read-back")
        return real_read(path)

    monkeypatch.setattr(checkpoints, "read_checkpoint", unreadable_epoch_3)
    with pytest.raises(
        UsageError, match=r"epoch_003 did not read back \(simulated bad read-back\); the older epochs are kept"
    ):
        save_checkpoint(tmp_path, 3, model, opt, None, None, {"history": []})
    for epoch in ("epoch_001", "epoch_002"):  # both older epochs stay: one of them is what a resume falls back to
        assert (tmp_path / epoch / checkpoints.MARKER).is_file()
        real_read(tmp_path / epoch)
    # a marker-less folder (a crash mid-write) is neither counted nor pruned against
    (tmp_path / "epoch_009").mkdir()
    monkeypatch.setattr(checkpoints, "read_checkpoint", real_read)
    save_checkpoint(tmp_path, 4, model, opt, None, None, {"history": []})
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["epoch_004", "epoch_003"]


def test_epochs_past_999_are_ordered_by_number(tmp_path):
    model, opt = tiny_model()
    for epoch in (999, 1000, 1001):
        save_checkpoint(tmp_path, epoch, model, opt, None, None, {"history": []})
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["epoch_1001", "epoch_1000"]


# ----------------------------------------------------------------------------- 3. SIGINT / SIGTERM


def test_check_stop_and_cli_main_turn_a_stop_request_into_one_line_and_128_plus_signal(capsys):
    check_stop("nothing pending")  # no stop requested: returns
    before = signal.getsignal(signal.SIGTERM)

    def run(args, argv):
        assert signal.getsignal(signal.SIGTERM) == STOP.handler  # installed while running
        STOP.signum = signal.SIGTERM
        check_stop("somewhere, step 3")

    with pytest.raises(SystemExit) as e:
        cli.cli_main(lambda argv: None, run, [])
    assert e.value.code == 143
    assert one_line(capsys.readouterr().err) == "stopped: SIGTERM during somewhere, step 3"
    assert not STOP and signal.getsignal(signal.SIGTERM) == before  # reset and restored
    with pytest.raises(Interrupted) as i:
        STOP.signum = signal.SIGINT
        check_stop("x")
    assert i.value.signum == signal.SIGINT and str(i.value) == "SIGINT during x"


def test_a_second_signal_while_a_stop_is_pending_stops_at_once(capsys):
    STOP.handler(signal.SIGINT, None)
    assert STOP and STOP.name == "SIGINT"
    assert "SIGINT received: stopping after the current step" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        STOP.handler(signal.SIGINT, None)


def test_a_sigterm_after_a_usr2_only_repeats_the_stop_request(capsys):
    """Slurm sends SIGTERM at a time limit whose USR2 (submitit's warning) came first: the job must
    still save its checkpoint and exit, not die of a KeyboardInterrupt."""
    STOP.handler(signal.SIGUSR2, None)
    STOP.handler(signal.SIGTERM, None)  # no KeyboardInterrupt
    assert STOP.name == "SIGUSR2"
    assert "SIGTERM received while stopping: still stopping after the current step" in capsys.readouterr().err


def test_a_job_sent_usr2_then_sigterm_checkpoints_and_exits_with_usr2s_status(sst2_small, tmp_path, monkeypatch, capfd):
    """The same, with real signals to a job of a grid (USR2 is a stop signal there, as GridJob adds
    it): the job stops at the next step with a mid-epoch checkpoint and exits 128 + USR2 (what
    GridJob requeues), not through a KeyboardInterrupt."""
    monkeypatch.setattr(cli, "STOP_SIGNALS", [*cli.STOP_SIGNALS, signal.SIGUSR2])

    def usr2_then_sigterm(_):
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGTERM)

    on_training_step(monkeypatch, "dual_head", 2, usr2_then_sigterm)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        run_small(sst2_small, out, "--job", "42:dual_head")
    assert e.value.code == 128 + signal.SIGUSR2
    err = capfd.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    folder = out / "checkpoints" / "seed42" / "dual_head"
    assert err.strip().splitlines()[-1] == (
        "stopped: SIGUSR2 during dual_head seed 42, epoch 1, step 3; "
        f"kept checkpoint {folder / 'epoch_001_step_000002'}"
    )


class Writes:
    """Counts the outputs' writes and the engram figure's draws of a run."""

    def __init__(self, monkeypatch):
        from run import study

        self.writes, self.draws = 0, 0
        real_write, real_draw = study.Outputs.write, study.engram_clusters

        def write(writer, *a, **k):
            self.writes += 1
            return real_write(writer, *a, **k)

        def draw(*a, **k):
            self.draws += 1
            return real_draw(*a, **k)

        monkeypatch.setattr(study.Outputs, "write", write)
        monkeypatch.setattr(study, "engram_clusters", draw)


def _sigterm_after(monkeypatch, name):
    from run import study

    real = getattr(study, name)

    def wrapped(*a, **k):
        out = real(*a, **k)
        os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(study, name, wrapped)


def _sigterm_before(monkeypatch, name):
    from run import study

    real = getattr(study, name)

    def wrapped(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(study, name, wrapped)


@pytest.mark.parametrize(
    "when, last",
    [
        (
            "training",
            "stopped: SIGTERM during dual_engram seed 42, epoch 1, step 3; "
            "kept checkpoint {folder}/epoch_001_step_000002",
        ),
        ("probes", "stopped: SIGTERM during the analysis of dual_engram; kept checkpoint {folder}/epoch_003"),
        (
            "control",
            "stopped: SIGTERM after dual_engram seed 42 finished; its result is kept, the outputs are left to "
            "the next writer",
        ),
    ],
)
def test_a_stopping_job_of_a_grid_exits_without_rewriting_the_outputs(
    when, last, sst2_small, tmp_path, monkeypatch, capfd
):
    """A job of an executor (--job) that a stop reaches, mid-training, during the analysis's probes
    (which poll no stop), or during the random-compressor control after them: within the signal's
    grace (90 s before a time limit) it checkpoints and exits at once: no outputs written, no lock
    waited for, no t-SNE. Its requeue (the same --job again) writes them."""
    if when == "training":
        on_training_step(monkeypatch, "dual_engram", 2, lambda _: os.kill(os.getpid(), signal.SIGTERM))
    elif when == "probes":
        _sigterm_after(monkeypatch, "analyse")
    else:
        _sigterm_before(monkeypatch, "add_tail")
    seen = Writes(monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        run_small(sst2_small, out, "--job", "42:dual_engram")
    assert e.value.code == 143
    folder = out / "checkpoints" / "seed42" / "dual_engram"
    assert capfd.readouterr().err.strip().splitlines()[-1] == last.format(folder=folder)
    assert (seen.writes, seen.draws) == (0, 0) and not (out / "metrics.json").exists() and no_lock_left(out)
    assert (folder / "result.json").exists() == (when == "control")
    monkeypatch.undo()
    seen = Writes(monkeypatch)
    m = run_small(sst2_small, out, "--job", "42:dual_engram")  # the requeued job: finishes, or skips, then writes
    assert seen.writes == 1 and seen.draws == 1 and (out / "engram_clusters.png").is_file()
    assert list(m["models"]) == ["dual_engram"] and not m["complete"]
    assert "random_compressor_tail" in json.loads((folder / "result.json").read_text())["analysis"]


@pytest.mark.parametrize("after, where", [(2, "step 3"), (4, "before its evaluation")])
def test_a_signal_mid_epoch_stops_at_the_next_step_and_resume_ends_equal(
    after, where, baseline, sst2_small, tmp_path, monkeypatch, capfd
):
    """A real SIGTERM, sent to this process during dual_head's epoch 2 (4 steps an epoch) after
    step 2, or after its last step: the run stops before the next step, or before the epoch's
    evaluation, with a mid-epoch checkpoint (the position in the epoch and every random state),
    keeps sentiment_only, and continues from there to exactly the baseline."""
    out = tmp_path / "run"

    def send_sigterm(_):
        assert signal.getsignal(signal.SIGTERM) == STOP.handler  # else the signal would end pytest
        os.kill(os.getpid(), signal.SIGTERM)

    on_training_step(monkeypatch, "dual_head", 4 + after, send_sigterm)
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        run_small(sst2_small, out)
    assert e.value.code == 143
    err = capfd.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    folder = out / "checkpoints" / "seed42" / "dual_head"
    assert last == (
        f"stopped: SIGTERM during dual_head seed 42, epoch 2, {where}; kept 1 finished job(s) and "
        f"checkpoint {folder / f'epoch_002_step_{after:06d}'}; continue with: "
        f"python experiment.py {shlex.join(argv(sst2_small, out))} --resume"
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["complete"] is False and m["stopped"] == "SIGTERM" and list(m["models"]) == ["sentiment_only"]
    assert [p.name for p in complete_checkpoints(folder)] == [f"epoch_002_step_{after:06d}", "epoch_001"]
    state = checkpoints.read_checkpoint(folder / f"epoch_002_step_{after:06d}")["state"]
    assert (state["epoch"], state["step"], state["partial"]["sums"]["steps"]) == (1, after, after)
    assert no_lock_left(out)
    monkeypatch.undo()
    command = shlex.split(last.split("continue with: ", 1)[1])
    capfd.readouterr()
    m = experiment.main(command[2:])
    assert f"[dual_head seed 42] resuming after step {after} of epoch 2" in capfd.readouterr().out
    assert m["complete"] and m["stopped"] is None
    assert comparable(out) == comparable(baseline)


def test_a_signal_during_an_evaluation_stops_it_keeps_the_trained_epoch_and_resume_ends_equal(
    baseline, sst2_small, tmp_path, monkeypatch, capfd
):
    """A SIGTERM while epoch 2 of dual_head is evaluated (at 7B: minutes, longer than a time limit's
    grace): the evaluation stops at its next batch, the trained epoch is kept as the position after
    its last step (before it stopped there only after the evaluation and the next epoch's first
    step), and the resume evaluates epoch 2 again and ends equal to the baseline."""
    from train import loop as training

    real, seen = training.evaluate, {"n": 0}

    def evaluate(model, *a, **k):
        if model.variant == "dual_head":
            seen["n"] += 1
            if seen["n"] == 2:
                os.kill(os.getpid(), signal.SIGTERM)
        return real(model, *a, **k)

    monkeypatch.setattr(training, "evaluate", evaluate)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        run_small(sst2_small, out)
    assert e.value.code == 143
    folder = out / "checkpoints" / "seed42" / "dual_head"
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(
        "stopped: SIGTERM during dual_head seed 42, epoch 2, its evaluation; kept 1 finished job(s) and "
        f"checkpoint {folder / 'epoch_002_step_000004'}; "
    ), last
    state = checkpoints.read_checkpoint(folder / "epoch_002_step_000004")["state"]
    assert (state["epoch"], state["step"], len(state["history"])) == (1, 4, 1)  # epoch 2 trained, not yet evaluated
    monkeypatch.undo()
    m = run_small(sst2_small, out, "--resume")
    assert "[dual_head seed 42] resuming after step 4 of epoch 2 from" in capfd.readouterr().out
    assert m["complete"] and comparable(out) == comparable(baseline)


def test_a_signal_during_the_analysis_stops_it_and_resume_only_analyses_again(
    baseline, sst2_small, tmp_path, monkeypatch, capfd
):
    """After the last epoch the analysis runs (probes, controls, the zero-engram pass): a stop there
    ends the job at once with its last epoch checkpointed; the resume trains nothing and analyses."""
    from train import loop as training

    real = training.zero_prefix_states

    def zero_prefix_states(model, *a, **k):
        if model.variant == "dual_head":
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, *a, **k)

    monkeypatch.setattr(training, "zero_prefix_states", zero_prefix_states)
    monkeypatch.setattr("analysis.controls.zero_prefix_states", zero_prefix_states)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        run_small(sst2_small, out)
    assert e.value.code == 143
    last = capfd.readouterr().err.strip().splitlines()[-1]
    folder = out / "checkpoints" / "seed42" / "dual_head"
    assert last.startswith(
        "stopped: SIGTERM during the analysis of dual_head; kept 1 finished job(s) and "
        f"checkpoint {folder / 'epoch_003'}; "
    ), last
    monkeypatch.undo()
    m = run_small(sst2_small, out, "--resume")
    assert "[dual_head seed 42] resuming after epoch 3 from" in capfd.readouterr().out
    assert m["complete"] and comparable(out) == comparable(baseline)


def test_a_signal_mid_accumulation_waits_for_the_optimizer_step_and_resume_ends_equal(
    tiny_qwen, sst2_small, tmp_path, monkeypatch, capfd
):
    """Two batches per optimizer step (the 7B path accumulates): a SIGTERM after epoch 2's first
    batch must not stop before its second (that batch's gradients are in no checkpoint): the run
    trains it, steps, checkpoints after step 2 and ends equal to an uninterrupted run."""
    import experiment_7b

    def run_7b(out, *extra):
        return experiment_7b.main(
            [
                "--model",
                str(tiny_qwen),
                "--data-dir",
                str(sst2_small),
                "--out",
                str(out),
                "--variants",
                "dual_head",
                "--set",
                "accum_steps=2",
                "--batch-size",
                "8",
                "--max-train",
                "32",
                "--max-eval",
                "16",
                "--epochs",
                "2",
                "--no-progress",
                "--small-results",
                str(tmp_path / "none.json"),
                *extra,
            ]
        )

    reference = run_7b(tmp_path / "uninterrupted")
    out = tmp_path / "run"
    on_training_step(monkeypatch, "dual_head", 4 + 1, lambda _: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit) as e:
        run_7b(out)
    assert e.value.code == 143
    folder = out / "checkpoints" / "seed42" / "dual_head"
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(
        "stopped: SIGTERM during dual_head seed 42, epoch 2, step 3; kept 0 finished job(s) and "
        f"checkpoint {folder / 'epoch_002_step_000002'}; "
    ), last
    state = checkpoints.read_checkpoint(folder / "epoch_002_step_000002")["state"]
    assert (state["epoch"], state["step"], state["partial"]["sums"]["steps"]) == (1, 2, 2)
    monkeypatch.undo()
    m = run_7b(out, "--resume")
    assert "[dual_head seed 42] resuming after step 2 of epoch 2" in capfd.readouterr().out
    assert m["complete"] and reference["complete"]
    assert comparable(out) == comparable(tmp_path / "uninterrupted")


PAUSE_SITE = """
import os

if os.environ.get("PAUSE_AT_STEP"):  # the run under test, not another Python the test starts
    import time

    from run import cli
    from train import loop as training
    real, seen = training.run_batch, {"n": 0}

    def run_batch(model, *a, **k):
        out = real(model, *a, **k)
        if model.training and model.variant == "sentiment_only":
            seen["n"] += 1
            if seen["n"] == int(os.environ["PAUSE_AT_STEP"]):
                open(os.environ["PAUSE_MARKER"], "w").close()
                deadline = time.monotonic() + 120
                while not cli.STOP and time.monotonic() < deadline:  # until the test's signal has arrived
                    time.sleep(0.02)
        return out

    training.run_batch = run_batch
"""


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_cleanly_and_resume_ends_equal(sig, code, baseline, sst2_small, tmp_path, capfd):
    """A real signal from outside to a run in its own process. The run pauses after sentiment_only's
    6th step (epoch 2, step 2) until the signal has arrived: where it lands does not depend on the
    machine's speed, and it stops before step 3."""
    out = tmp_path / "run"
    err_path = tmp_path / "stderr.txt"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(PAUSE_SITE)
    marker = tmp_path / "paused"
    env = {
        **os.environ,
        **ONE_THREAD,
        "PYTHONUNBUFFERED": "1",
        "PAUSE_AT_STEP": "6",
        "PAUSE_MARKER": str(marker),
        "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    with open(err_path, "wb") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "experiment.py", *argv(sst2_small, out)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err_file,
        )
        try:
            deadline = time.monotonic() + 300
            while not marker.exists():
                assert proc.poll() is None, f"the run ended before the pause:\n{err_path.read_text()}"
                assert time.monotonic() < deadline, "not paused within 300 s"
                time.sleep(0.02)
            proc.send_signal(sig)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    err = err_path.read_text()
    name = signal.Signals(sig).name
    assert rc == code, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"stopped: {name} during sentiment_only seed 42, epoch 2, step 3; "), err
    assert "--resume" in last, err
    assert sum(line.startswith("stopped:") for line in err.splitlines()) == 1
    m = json.loads((out / "metrics.json").read_text())
    assert m["complete"] is False and m["stopped"] == name
    assert no_lock_left(out)  # released on the way out
    # the line's command continues the run, to exactly the uninterrupted result
    command = shlex.split(last.split("continue with: ", 1)[1])
    assert command[:2] == ["python", "experiment.py"] and command.count("--resume") == 1
    capfd.readouterr()
    m = experiment.main(command[2:])
    assert m["complete"] and m["stopped"] is None
    assert "Traceback" not in capfd.readouterr().err
    assert comparable(out) == comparable(baseline)


# ----------------------------------------------------------------------------- 4. the locks


def no_lock_left(out: Path) -> bool:
    return not list(Path(out).rglob(".lock-*.json"))


def write_lock(folder: Path, pid: int, host: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock-job.json"
    path.write_text(
        json.dumps(
            {
                "pid": pid,
                "host": host or socket.gethostname(),
                "started": "2024-01-01 00:00:00",
                "command": "python experiment.py",
            }
        )
    )
    return path


@pytest.fixture
def live_pid():
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield holder.pid
    holder.kill()
    holder.wait()


def test_a_fresh_run_over_a_running_job_is_refused_in_one_line(sst2_small, tmp_path, capsys, live_pid):
    out = tmp_path / "run"
    lock = write_lock(out / "checkpoints" / "seed42" / "dual_head", live_pid)
    with pytest.raises(SystemExit) as e:
        run_small(sst2_small, out)
    assert e.value.code == 2
    err = one_line(capsys.readouterr().err)
    assert "in use by jobs still running: seed42/dual_head" in err and f"pid {live_pid}" in err
    assert json.loads(lock.read_text())["pid"] == live_pid  # the holder's lock is left alone
    assert not (out / "metrics.json").exists()  # nothing was cleared or written


def test_the_same_job_started_twice_is_refused_in_one_line(sst2_small, tmp_path, capsys, live_pid):
    out = tmp_path / "run"
    folder = out / "checkpoints" / "seed42" / "sentiment_only"
    lock = write_lock(folder, live_pid)
    with pytest.raises(SystemExit) as e:
        run_small(sst2_small, out, "--resume")
    assert e.value.code == 2
    err = one_line(capsys.readouterr().err)
    assert f"{folder} is in use by a run still going (pid {live_pid}" in err
    assert json.loads(lock.read_text())["pid"] == live_pid


def test_a_job_lock_from_another_host_is_refused_in_one_line(sst2_small, tmp_path, capsys):
    out = tmp_path / "run"
    lock = write_lock(out / "checkpoints" / "seed42" / "sentiment_only", 12345, "some-other-machine")
    with pytest.raises(SystemExit) as e:
        run_small(sst2_small, out, "--resume")
    err = one_line(capsys.readouterr().err)
    assert e.value.code == 2 and "pid 12345 on some-other-machine" in err and str(lock) in err


def test_a_requeued_slurm_job_takes_its_own_lock_back_from_another_host(tmp_path, capsys):
    from train.files import FolderLock

    lock = tmp_path / ".lock-job.json"
    lock.write_text(json.dumps({"pid": 12345, "host": "node-a", "slurm_job_id": "77_3", "restarts": 0}))
    with pytest.raises(UsageError, match="pid 12345 on node-a"):  # another job, or the same run: refused
        FolderLock(tmp_path, "job", who={"slurm_job_id": "77_3", "restarts": 0}).acquire()
    with pytest.raises(UsageError, match="pid 12345 on node-a"):
        FolderLock(tmp_path, "job", who={"slurm_job_id": "77_4", "restarts": 1}).acquire()
    with FolderLock(tmp_path, "job", who={"slurm_job_id": "77_3", "restarts": 1}):
        held = json.loads(lock.read_text())
        assert held["pid"] == os.getpid() and held["slurm_job_id"] == "77_3" and held["restarts"] == 1
    assert "taking over the lock" in capsys.readouterr().err and not lock.exists()


@pytest.mark.parametrize("kind", ["dead_pid", "unreadable"])
def test_a_stale_job_lock_is_taken_over_with_a_note(kind, baseline, sst2_small, tmp_path, capfd):
    out = tmp_path / "run"
    shutil.copytree(
        baseline, out
    )  # a finished run, less dual_engram's result: --resume finishes it from its checkpoint
    folder = out / "checkpoints" / "seed42" / "dual_engram"
    (folder / "result.json").unlink()
    if kind == "dead_pid":
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        lock = write_lock(folder, gone.pid)
        what = f"pid {gone.pid}, no longer running"
    else:
        lock = folder / ".lock-job.json"
        lock.write_text('{"pid": 12')  # a write cut short
        what = "unreadable"
    capfd.readouterr()
    m = run_small(sst2_small, out, "--resume")
    err = capfd.readouterr().err
    notes = [line for line in err.splitlines() if "taking over the lock" in line]
    assert notes == [f"note: taking over the lock {lock} left by an earlier run ({what})"]
    assert m["complete"] and comparable(out) == comparable(baseline)
    assert no_lock_left(out)


def test_the_job_lock_holds_pid_host_and_command_while_running(sst2_small, tmp_path, monkeypatch):
    out = tmp_path / "run"
    seen = {}

    def look(recipe, variant, seed, *a, **k):
        seen.update(json.loads((out / "checkpoints" / f"seed{seed}" / variant / ".lock-job.json").read_text()))
        raise Crash("stop here")

    monkeypatch.setattr("run.study.train_variant", look)
    with pytest.raises(Crash):
        run_small(sst2_small, out)
    assert seen["pid"] == os.getpid() and seen["host"] == socket.gethostname()
    assert seen["command"].startswith("python experiment.py --data-dir")
    assert no_lock_left(out)
    record = json.loads((out / "jobs" / "seed42-sentiment_only.json").read_text())
    assert record["state"] == "failed" and record["error"] == "Crash: stop here" and record["pid"] == os.getpid()


# ----------------------------------------------------------------------------- 5. data


def test_non_utf8_training_file_is_one_line_naming_file_line_and_flag(sst2_small, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(sst2_small / "dev.tsv", data / "dev.tsv")
    (data / "train.tsv").write_bytes(b"sentence\tlabel\na fine film\t1\nna\xefve \xff\xfe film\t0\ndull\t0\n")
    with pytest.raises(SystemExit) as e:
        experiment.main(["--data-dir", str(data), "--out", str(tmp_path / "out"), *FLAGS])
    err = one_line(capsys.readouterr().err)
    assert e.value.code == 2
    assert f"{data / 'train.tsv'}:3" in err and "not UTF-8" in err and "--data-dir" in err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_missing_extra_eval_file_names_extra_eval_only(sst2_small, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_small(sst2_small, tmp_path / "out", "--extra-eval", "x=/nonexistent.tsv")
    err = one_line(capsys.readouterr().err)
    assert e.value.code == 2
    assert "/nonexistent.tsv" in err and "--extra-eval" in err and "--data-dir" not in err


def test_bad_extra_eval_file_names_extra_eval_only(sst2_small, tmp_path, capsys):
    bad = tmp_path / "extra.tsv"
    bad.write_bytes(b"sentence\tlabel\ngood\t1\nbad\t7\n")
    with pytest.raises(SystemExit) as e:
        run_small(sst2_small, tmp_path / "out", "--extra-eval", f"x={bad}")
    err = one_line(capsys.readouterr().err)
    assert e.value.code == 2 and f"{bad}:3" in err and "--extra-eval" in err and "--data-dir" not in err


@pytest.mark.parametrize("rows", [[("a fine film", 1)], [(f"film {i}", 1) for i in range(20)]])
def test_too_small_validation_set_is_refused_before_any_training(rows, sst2_small, tmp_path, capsys):
    from tests.conftest import write_tsv

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(sst2_small / "train.tsv", data / "train.tsv")
    write_tsv(data / "dev.tsv", rows)  # one example; or twenty, all positive
    with pytest.raises(SystemExit) as e:
        experiment.main(["--data-dir", str(data), "--out", str(tmp_path / "out"), *FLAGS])
    err = one_line(capsys.readouterr().err)
    assert e.value.code == 2
    assert err.startswith("error: the validation set") and "need at least 5 of each label" in err
    assert "0 negative" in err
    assert not (tmp_path / "out" / "checkpoints").exists() and not (tmp_path / "out" / "metrics.json").exists()


# ----------------------------------------------------------------------------- 6. read_tsv on any bytes


@pytest.fixture(scope="module")
def tsv_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tsv") / "any.tsv"


def check_read(path: Path, raw: bytes) -> Split | UsageError:
    """read_tsv's contract on any bytes: a consistent Split, or one UsageError in one line naming the file."""
    path.write_bytes(raw)
    try:
        s = read_tsv(path)
    except UsageError as e:
        msg = str(e)
        assert str(path) in msg, msg
        assert "\n" not in msg and len(msg.splitlines()) == 1, repr(msg)
        return e
    assert isinstance(s, Split) and s.source == str(path)
    assert len(s.sentences) == len(s.labels) == len(s) > 0
    assert set(s.labels) <= {0, 1} and all(type(label) is int for label in s.labels)
    for sentence in s.sentences:
        assert sentence == sentence.strip() and sentence.split() and "\t" not in sentence and "\n" not in sentence
    return s


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300))
def test_read_tsv_on_arbitrary_bytes_returns_a_split_or_one_usage_error(tsv_file, raw):
    check_read(tsv_file, raw)


TEXT = st.text(alphabet=st.sampled_from(list("ab é\t\r\u00a0\ufeff\u2028\x0b\x85好😀")), max_size=8)
LABELS = st.sampled_from(
    ["0", "1", " 1", "0 ", "1\r", "\x0b1\u2028", "2", "", "-1", "1.0", "０", "01", "1\r0", "0\x0b1", "1\u20280"]
)


@st.composite
def near_valid_tsv(draw):
    """A header and rows that are mostly right: random text, labels, tabs, \\r, BOM and invalid UTF-8.
    Returns (bytes, {line number: (sentence, label)} for valid rows, set of bad line numbers)."""
    header = draw(
        st.sampled_from(
            [
                "sentence\tlabel",
                "\ufeffsentence\tlabel",
                "sentence\tlabel\r",
                "sentence\tlabel\r\r",
                "sentence label",
                "label\tsentence",
                "sentence\tlabel\t",
                " sentence\tlabel",
            ]
        )
    )
    lines = [header.encode()]
    bad = set() if header.removeprefix("\ufeff").rstrip("\r").split("\t") == ["sentence", "label"] else {1}
    good = {}
    for n in range(2, 2 + draw(st.integers(0, 6))):
        sentence, label = draw(TEXT), draw(LABELS)
        sep = draw(st.sampled_from(["\t", "\t", "\t", " ", "\t\t"]))
        end = draw(st.sampled_from(["", "", "\r"]))
        line = f"{sentence}{sep}{label}{end}".encode()
        if draw(st.integers(0, 9)) == 0:  # bytes that are not UTF-8
            cut = draw(st.integers(0, len(line)))
            line = (
                line[:cut]
                + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80abc", b"\xe4\xbd"]))
                + line[cut:]
            )
        try:
            cols = line.decode("utf-8").rstrip("\r").split("\t")
        except UnicodeDecodeError:
            bad.add(n)
        else:
            if len(cols) == 2 and cols[0].split() and cols[1].strip() in ("0", "1"):
                good[n] = (cols[0].strip(), int(cols[1].strip()))
            else:
                bad.add(n)
        lines.append(line)
    raw = b"\n".join(lines)
    if draw(st.booleans()):
        raw += draw(st.sampled_from([b"\n", b"\r\n"]))
    return raw, good, bad


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=near_valid_tsv())
def test_read_tsv_on_near_valid_files_matches_a_reference(tsv_file, case):
    raw, good, bad = case
    got = check_read(tsv_file, raw)
    if not bad and good:
        assert isinstance(got, Split), got
        assert list(zip(got.sentences, got.labels)) == [good[n] for n in sorted(good)]
    elif not bad:
        assert isinstance(got, UsageError) and "has a header but no examples" in str(got)
    else:
        assert isinstance(got, UsageError), f"bad lines {sorted(bad)} were accepted"
        assert any(f"{tsv_file}:{n}:" in str(got) for n in bad), (str(got), sorted(bad))


# ----------------------------------------------------------------------------- 7. seeds


@pytest.mark.parametrize("seed", ["-1", "4294967296", "1e3", "x"])
def test_seed_outside_the_range_numpy_and_torch_accept_is_an_argparse_error(seed, sst2_small, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_small(sst2_small, tmp_path / "out", "--seeds", seed)
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # argparse prints its usage above
    assert last.endswith(f"argument --seeds: must be an integer in [0, 2**32), got {seed}"), last
    assert not (tmp_path / "out").exists()


def test_seed_range_edges_are_accepted():
    assert experiment.parse_args(["--seeds", "0", "4294967295"]).seeds == [0, 2**32 - 1]


def test_the_lock_works_on_a_filesystem_without_hard_links(tmp_path, monkeypatch):
    """os.link fails with EPERM on some filesystems: the lock falls back to an exclusive create,
    still refuses a second holder, and leaves no temporary file behind."""
    from train.files import FolderLock

    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    lock = FolderLock(tmp_path, "run", "python experiment.py").acquire()
    assert json.loads((tmp_path / ".lock-run.json").read_text())["pid"] == os.getpid()
    assert not FolderLock(tmp_path, "run", "other")._try_create()
    assert [p.name for p in tmp_path.iterdir()] == [".lock-run.json"]
    lock.release()
    assert not (tmp_path / ".lock-run.json").exists()
