"""What a folder's finished results and checkpoints are owed: a fresh run never deletes a finished
result unless told to; a resume may change where and how it runs (executor, jobs, threads) but
not what it computes; every result and checkpoint names the code that made it, and a resume under
other code says so; a checkpoint restores only the training GPU's generator, and one made without
a loss scaler loads into a run that has one."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch

import experiment
from tests.conftest import on_training_step, tiny_flags
from train import checkpoints
from train import loop as training

FLAGS = tiny_flags(epochs=2)


def run(data, out, *extra):
    return experiment.main(["--data-dir", str(data), "--out", str(out), *FLAGS, *extra])


@pytest.fixture(scope="module")
def finished(sst2_small, tmp_path_factory) -> Path:
    """A finished run of Model 1 alone."""
    out = tmp_path_factory.mktemp("finished")
    assert run(sst2_small, out, "--variants", "sentiment_only")["complete"]
    return out


def files_of(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_fresh_run_over_finished_jobs_is_refused_in_one_line_and_deletes_nothing(
    finished, sst2_small, tmp_path, capsys
):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    before = files_of(out)
    with pytest.raises(SystemExit) as e:
        run(sst2_small, out, "--variants", "sentiment_only")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert err == (
        f"error: {out} holds 1 finished job(s) (seed42/sentiment_only); continue them with --resume, delete "
        "them with --overwrite, or pass another --out"
    )
    assert files_of(out) == before
    # --overwrite says so in one line, and starts over
    m = run(sst2_small, out, "--variants", "sentiment_only", "--overwrite")
    assert m["complete"] and "--overwrite" in m["command"] and "--overwrite" not in m["jobs"]["rerun"]
    assert (
        f"--overwrite: deleting the 1 finished job(s) and every checkpoint in {out / 'checkpoints'}"
        in capsys.readouterr().err
    )


def git(folder: Path, *words: str) -> str:
    return subprocess.run(
        ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t", *words],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_a_fresh_run_replaces_the_committed_study_and_refuses_results_git_does_not_hold(
    finished, sst2_small, tmp_path, capsys
):
    """A newcomer's first command trains: finished jobs exactly as git holds them (the committed study)
    are replaced, with one line saying how to bring them back; one finished job git does not hold (a
    user's own hours) or a committed one changed since is refused as before, deleting nothing."""
    import shutil

    out = tmp_path / "results"
    shutil.copytree(finished, out)
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-q", "-m", "the committed study")
    committed = files_of(out)

    # a user's own finished job beside the committed ones: refused, nothing deleted
    shutil.copytree(out / "checkpoints" / "seed42", out / "checkpoints" / "seed43")
    with pytest.raises(SystemExit) as e:
        run(sst2_small, out, "--variants", "sentiment_only")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "holds 2 finished job(s)" in err
    shutil.rmtree(out / "checkpoints" / "seed43")
    # a committed result changed since the commit: refused too
    result = out / "checkpoints" / "seed42" / "sentiment_only" / "result.json"
    result.write_bytes(result.read_bytes() + b" ")
    with pytest.raises(SystemExit) as e:
        run(sst2_small, out, "--variants", "sentiment_only")
    assert e.value.code == 2 and "holds 1 finished job(s)" in capsys.readouterr().err
    git(tmp_path, "checkout", "--", ".")
    assert files_of(out) == committed

    # the committed study unchanged: replaced, saying how to bring it back, and git restore does
    m = run(sst2_small, out, "--variants", "sentiment_only", "--epochs", "1")
    err = capsys.readouterr().err
    assert m["complete"] and len(m["models"]["sentiment_only"]["runs"][0]["history"]) == 1
    assert (
        f"note: replacing the committed study in {out} (1 finished job(s), unchanged since the last commit); "
        f"bring it back with: git restore {out}"
    ) in err
    assert git(tmp_path, "status", "--porcelain").strip()  # the run changed the committed files
    git(tmp_path, "restore", str(out))
    assert files_of(out) == committed


@pytest.mark.parametrize(
    "command, executor, expected",
    [
        ("python experiment.py --overwrite --seeds 42 43", "serial", "python experiment.py --seeds 42 43 --resume"),
        (
            "python experiment.py --resume --report-only --out 'a b'",
            "serial",
            "python experiment.py --resume --out 'a b'",
        ),
        (
            "python experiment.py --ladder --overwrite --executor slurm",
            "slurm",
            "python experiment.py --ladder --executor slurm",
        ),
    ],
)
def test_the_command_that_continues_a_run_never_overwrites_and_resumes_a_serial_run(command, executor, expected):
    """Every "continue with" / "rerun" line (a stopped run, a stopped ladder, metrics.json's rerun):
    with --overwrite kept it would be refused (--overwrite with --resume) or delete what finished."""
    from run.grid import continue_command

    assert continue_command(command, executor) == expected


def test_overwrite_and_resume_together_are_refused(sst2_small, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run(sst2_small, tmp_path / "x", "--overwrite", "--resume")
    assert e.value.code == 2 and "--overwrite starts over and --resume continues" in capsys.readouterr().err


def test_a_resume_may_change_executor_jobs_and_threads_but_not_what_is_computed(tmp_path):
    root = tmp_path / "checkpoints"
    settings = {"lr": 3e-4, "executor": "serial", "jobs": None, "threads": None, "seeds": [42]}
    checkpoints.prepare_checkpoints(root, settings, resume=False)
    checkpoints.prepare_checkpoints(root, {**settings, "executor": "local", "jobs": 2, "threads": 1}, resume=True)
    # a run.json written before threads was free (it names threads) still resumes
    (root / "run.json").write_text(json.dumps({"lr": 3e-4, "threads": None}))
    checkpoints.prepare_checkpoints(root, {**settings, "threads": 1}, resume=True)
    # a setting that did not exist then, at its default, is no difference; a changed one is
    checkpoints.prepare_checkpoints(root, {**settings, "tf32": False}, resume=True)
    with pytest.raises(checkpoints.UsageError, match=r"lr: 0.0003 -> 0.001"):
        checkpoints.prepare_checkpoints(root, {**settings, "lr": 1e-3}, resume=True)


@pytest.mark.parametrize("value", [0, 0.0, 1, "x", [1]])
def test_a_setting_absent_from_old_checkpoints_equals_only_its_default_not_an_explicit_zero(value, tmp_path):
    """0 == False in Python: a new setting set explicitly to 0 (or 0.0) is a difference from checkpoints
    made before it existed (which ran without it), as any other value is; None, False or [] is not."""
    root = tmp_path / "checkpoints"
    checkpoints.prepare_checkpoints(root, {"lr": 3e-4}, resume=False)
    for unset in (None, False, []):
        checkpoints.prepare_checkpoints(root, {"lr": 3e-4, "warmup": unset}, resume=True)
        (root / "run.json").write_text(json.dumps({"lr": 3e-4}))  # as the old checkpoints wrote it
    with pytest.raises(checkpoints.UsageError, match=re.escape(f"warmup: None -> {value}")):
        checkpoints.prepare_checkpoints(root, {"lr": 3e-4, "warmup": value}, resume=True)


def test_an_executor_run_over_other_settings_advises_overwrite_not_dropping_resume(
    finished, sst2_small, tmp_path, capsys
):
    """A grid under --executor local|slurm always resumes its folder: the way to start it over is
    --overwrite (as a serial run's is to drop --resume)."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    capsys.readouterr()
    for extra in (["--executor", "local"], ["--executor", "slurm", "--slurm-time", "5"]):
        with pytest.raises(SystemExit) as e:
            run(sst2_small, out, "--variants", "sentiment_only", "--lr", "1e-3", *extra)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "\n" not in err and "lr: 0.0003 -> 0.001" in err, err
        assert err.endswith("resume with the same flags, or rerun with --overwrite to start over"), err
    with pytest.raises(SystemExit):
        run(sst2_small, out, "--variants", "sentiment_only", "--lr", "1e-3", "--resume")
    assert capsys.readouterr().err.strip().endswith("or run without --resume to start over")


def test_results_and_checkpoints_name_their_code_and_a_resume_under_other_code_says_so(
    sst2_small, tmp_path, monkeypatch, capfd
):
    from train.provenance import code_version

    here = code_version()
    assert len(here["sources"]) == 16 and set(here) == {"sources", "commit", "dirty"}
    out = tmp_path / "run"
    on_training_step(
        monkeypatch, "sentiment_only", 6, lambda _: os.kill(os.getpid(), signal.SIGTERM)
    )  # epoch 2, step 2
    with pytest.raises(SystemExit):
        run(sst2_small, out, "--variants", "sentiment_only")
    folder = out / "checkpoints" / "seed42" / "sentiment_only"
    saved = checkpoints.read_checkpoint(checkpoints.latest_checkpoint(folder))["state"]
    assert saved["code"] == [here]
    monkeypatch.undo()
    edited = {**here, "sources": "0123456789abcdef", "dirty": True}
    monkeypatch.setattr(training, "code_version", lambda: edited)
    capfd.readouterr()
    m = run(sst2_small, out, "--variants", "sentiment_only", "--resume")
    err = capfd.readouterr().err
    notes = [
        line for line in err.splitlines() if line.startswith("note: sentiment_only seed 42: its checkpoint was made by")
    ]
    assert notes == [
        f"note: sentiment_only seed 42: its checkpoint was made by sources {here['sources']}"
        + (f" (commit {here['commit'][:7]}{', edited' if here['dirty'] else ''})" if here["commit"] else "")
        + ", this is sources 0123456789abcdef"
        + (f" (commit {here['commit'][:7]}, edited)" if here["commit"] else "")
        + "; it continues, and its result names both"
    ]
    result = json.loads((folder / "result.json").read_text())
    assert result["code"] == [here, edited]
    assert m["code"] == here and len(m["code_versions"]) == 2  # metrics.json: the writer's, and the jobs' two
    assert "**Trained under 2 code versions**" in (out / "REPORT.md").read_text()


def test_a_checkpoint_restores_only_the_training_gpus_generator(monkeypatch):
    """Saved on a GPU, resumed where fewer GPUs are visible: one generator is kept and set (a list
    of every GPU's raised IndexError); older checkpoints with cuda0..cudaN give the training one's."""
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda state, device=None: calls.append((state.tolist(), str(device)))
    )
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    tensors, meta = checkpoints.rng_state(torch.device("cuda", 3))
    assert sorted(k for k in tensors if k.startswith("cuda")) == ["cuda"]
    checkpoints.set_rng_state(tensors, meta, torch.device("cuda", 0))
    assert calls == [([7], "cuda:0")]
    old = {
        **{k: v for k, v in tensors.items() if k != "cuda"},
        "cuda0": torch.tensor([1], dtype=torch.uint8),
        "cuda1": torch.tensor([2], dtype=torch.uint8),
        "cuda2": torch.tensor([3], dtype=torch.uint8),
    }
    calls.clear()
    checkpoints.set_rng_state(old, meta, torch.device("cuda", 1))
    assert calls == [([2], "cuda:1")]
    calls.clear()
    checkpoints.set_rng_state(tensors, meta, torch.device("cpu"))  # a CPU resume touches no GPU
    assert calls == [] and "cuda" not in checkpoints.rng_state(torch.device("cpu"))[0]


def test_a_checkpoint_without_a_scaler_state_loads_into_a_run_with_a_scaler(tmp_path, capsys):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    checkpoints.save_checkpoint(tmp_path, 1, model, opt, None, None, {"history": []})
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    state = checkpoints.resume_from(tmp_path, "x", model, opt, None, scaler)
    assert state["epoch"] == 1 and scaler.get_scale() == 1024.0
    assert "has no loss-scaler state; the scaler starts at its initial scale" in capsys.readouterr().err


def test_metrics_take_device_dtype_and_gpu_memory_from_the_jobs_not_the_writer():
    from analysis.metrics import from_jobs

    def result(device, dtype, peak, code="a" * 16):
        return {
            "machine": {"device_name": device, "peak_gpu_gib": peak},
            "info": {"compute_dtype": dtype},
            "code": [{"sources": code, "commit": None, "dirty": None}],
        }

    results = {
        42: {"sentiment_only": result("cuda (NVIDIA H200)", "bfloat16", 9.5)},
        43: {
            "sentiment_only": result("cuda (NVIDIA H200)", "bfloat16", 11.25),
            "dual_head": result("cuda (Tesla T4)", "float32", None),
        },
    }
    got = from_jobs(results)
    assert got == {
        "device": "cuda (NVIDIA H200); cuda (Tesla T4)",
        "compute_dtype": "bfloat16; float32",
        "peak_gpu_gib": 11.25,
    }
    results[43]["dual_head"]["code"].append({"sources": "b" * 16, "commit": None, "dirty": None})
    assert from_jobs(results)["code_versions"] == ["sources " + "a" * 16, "sources " + "b" * 16]
    assert from_jobs({}) == {}  # a writer with nothing finished keeps its own header


def test_a_finished_jobs_model_is_freed_before_the_next_job_builds_its_own(sst2_small, tmp_path, monkeypatch):
    """4-bit layers hold their weights in a reference cycle that only the cycle collector frees:
    run_job collects after each job. A cycle is planted in the small model to stand in for it."""
    import gc
    import weakref

    from run import study

    refs, real = [], study.train_variant

    def train_variant(*a, **k):
        result, built = real(*a, **k)
        built.model.cycle = [built.model]  # freed only by gc.collect()
        refs.append(weakref.ref(built.model))
        return result, built

    monkeypatch.setattr(study, "train_variant", train_variant)
    gc.disable()  # no automatic collection may stand in for the one under test
    try:
        run(sst2_small, tmp_path / "run", "--variants", "sentiment_only", "dual_head", "--epochs", "1")
        assert len(refs) == 2 and [r() for r in refs] == [None, None]
    finally:
        gc.enable()


ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"  # the real SST-2 beside the checkout (CI has it there)


@pytest.mark.skipif(not (SST2 / "dev.tsv").is_file(), reason=f"the real SST-2 is not at {SST2}")
def test_a_committed_study_made_before_the_package_move_still_resumes_and_reports(tmp_path, monkeypatch):
    """The committed seed 42 of results/ was made by the flat-layout code (another code version):
    copied into a fresh folder, its run's own command with --resume takes its three finished jobs
    (nothing trains) and writes every output from them, with their numbers."""
    committed = ROOT / "results" / "checkpoints"
    out = tmp_path / "old"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "run.json").write_bytes((committed / "run.json").read_bytes())
    for variant in ("sentiment_only", "dual_head", "dual_engram"):
        folder = out / "checkpoints" / "seed42" / variant
        folder.mkdir(parents=True)
        for name in ("result.json", "arrays.npz"):
            (folder / name).write_bytes((committed / "seed42" / variant / name).read_bytes())
    before = json.loads((ROOT / "results" / "metrics.json").read_text())["models"]
    old = json.loads((committed / "seed42" / "dual_engram" / "result.json").read_text())
    assert (old.get("code") or [{}])[-1].get("sources") != training.code_version()["sources"]  # by other code
    monkeypatch.setattr("run.study.train_variant", lambda *a, **k: pytest.fail("a finished job trained again"))
    monkeypatch.chdir(ROOT)  # run.json records --data-dir as the run typed it
    argv = ["--data-dir", "../shared/data/sst2", "--seeds", "42", "--no-progress", "--resume", "--out", str(out)]
    m = experiment.main(argv)
    assert m["complete"] and sorted(m["models"]) == ["dual_engram", "dual_head", "sentiment_only"]
    for variant, model in m["models"].items():
        (seed42,) = [r for r in before[variant]["runs"] if r["seed"] == 42]
        (now,) = model["runs"]
        for key in ("best_val_acc", "best_epoch", "final_val_acc"):
            assert now[key] == seed42[key], (variant, key)
    assert m["models"]["dual_engram"]["runs"][0]["analysis"]["engram"]["ari"] == old["analysis"]["engram"]["ari"]
    for name in ("metrics.json", "predictions.json", "REPORT.md", "learning_curves.png", "engram_clusters.png"):
        assert (out / name).stat().st_size > 0


def test_the_code_version_hashes_every_source_file_in_any_package_and_not_the_tests(tmp_path):
    from train.provenance import ROOT as project
    from train.provenance import source_files, sources_hash

    for name in ("experiment.py", "pkg/__init__.py", "pkg/deep/er.py", "tests/__init__.py", "tests/test_x.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"# {name}\n")
    (tmp_path / "notes" / "x.py").parent.mkdir()
    (tmp_path / "notes" / "x.py").write_text("# not a package\n")
    files = source_files(tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["experiment.py", "pkg/__init__.py", "pkg/deep/er.py"]
    before = sources_hash(tmp_path, files)
    (tmp_path / "pkg" / "deep" / "er.py").write_text("# edited\n")
    assert sources_hash(tmp_path, files) != before  # an edit two folders down is another version
    (tmp_path / "tests" / "test_x.py").write_text("# edited test\n")
    (tmp_path / "pkg" / "deep" / "er.py").write_text("# pkg/deep/er.py\n")
    assert sources_hash(tmp_path, source_files(tmp_path)) == before  # the tests are not the code that ran
    shipped = {f.relative_to(project).as_posix() for f in source_files(project)}
    assert {"experiment.py", "train/loop.py", "run/study.py", "analysis/metrics.py", "nets/losses.py"} <= shipped
    assert not any(s.startswith("tests/") for s in shipped)
