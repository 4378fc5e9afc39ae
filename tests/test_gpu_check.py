"""benchmarks/gpu_check.sh, the prepared GPU check, run whole on the CPU with tiny sizes: the dry
run (step a), both presets end to end (b), a stop and --resume against the uninterrupted run (c),
and --executor local (d); and its offline install of the brought-along wheels, where they are."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def gpu_check(out: Path, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", **env}
    env.pop("OUT", None)
    return subprocess.run(
        ["bash", str(SCRIPT), str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_without_an_output_folder_it_says_how_to_run_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    p = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.strip() == "usage: bash benchmarks/gpu_check.sh OUTDIR (or set OUT)"


TINY = dict(
    DEVICE="cpu",
    MAX_TRAIN="16",
    MAX_EVAL="16",
    EPOCHS="2",
    DRY_RUN_ARGS="--batch-size 4 --max-length 16 --dry-run-steps 1",
    LIMIT_FACTOR="20",
)  # generous limits: a shared CPU can be many times slower than an idle one


def test_every_step_passes_on_the_cpu(tmp_path):
    out = tmp_path / "check"
    p = gpu_check(out, **TINY)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["passed"] is True and list(summary["steps"]) == ["a", "b", "c", "d"]
    assert (
        summary["machine"]["device"] == "cpu" and summary["versions"]["torch"] and summary["versions"]["bitsandbytes"]
    )
    # a: the tiny dry run's six rows (3 variants x checkpointing on/off); the CPU: no memory to judge
    (dry,) = summary["steps"]["a"]["runs"]
    assert (
        dry["exit_code"] == 0
        and dry["shape"] == "tiny"
        and dry["cli"].startswith("python experiment_7b.py --dry-run tiny")
    )
    assert [(r["variant"], r["gradient_checkpointing"]) for r in dry["rows"]] == [
        (v, gc) for gc in (True, False) for v in ("sentiment_only", "dual_head", "dual_engram")
    ]
    assert all(r["seconds_per_step"] > 0 and r["oom"] is False and r["fits_16gb"] is None for r in dry["rows"])
    # b: both presets, every variant, two epochs, a report each
    for protocol in ("written", "published"):
        b = summary["steps"]["b"][protocol]
        assert b["exit_code"] == 0 and b["report"] and f"--protocol {protocol}" in b["command"]
        assert sorted(b["val_acc"]) == ["dual_engram", "dual_head", "sentiment_only"]
        assert all(len(v) == 2 for v in b["val_acc"].values())
    # c: the stopped run exits 128 + SIGTERM at a step boundary, the resume finishes, and on the CPU
    # its numbers equal b's uninterrupted run's
    c = summary["steps"]["c"]
    assert c["stopped_run"]["exit_code"] == 143 and c["stopped_run"]["sigterm_after_s"] > 0
    assert c["resumed_run"]["exit_code"] == 0 and any("SIGTERM" in line for line in c["stop_lines"])
    assert (
        c["compared"] == ["dual_engram", "sentiment_only"]
        and c["identical"] is True
        and c["max_abs_val_acc_diff"] == 0.0
    )
    # d: two jobs through submitit, one at a time, with b's numbers
    d = summary["steps"]["d"]
    assert d["exit_code"] == 0 and "--executor local --jobs 1" in d["command"]
    assert d["compared"] == ["dual_engram", "sentiment_only"] and d["identical"] is True
    # the JSON and six logs beside it, each with what its step ran
    assert sorted(f.name for f in out.iterdir()) == [
        "a_dry_run.log",
        "b_published.log",
        "b_written.log",
        "c_stop_resume.log",
        "d_local.log",
        "gpu_check.json",
        "setup.log",
    ]
    log = (out / "c_stop_resume.log").read_text()
    assert log.count("[exit code ") == 2 and "--resume" in log and "[exit code 143 " in log
    assert "[seed42-sentiment_only] finished" in (out / "d_local.log").read_text()


@pytest.mark.skipif(
    not list((ROOT / "benchmarks" / "wheels").glob("bitsandbytes-*.whl")),
    reason="no wheels in benchmarks/wheels (bash benchmarks/fetch_wheels.sh downloads them)",
)
def test_the_wheels_install_offline_and_are_used(tmp_path):
    out = tmp_path / "check"
    p = gpu_check(out, **TINY, STEPS="a", FORCE_INSTALL="1", PIP_FIND_LINKS="", PIP_INDEX_URL="http://127.0.0.1:9/none")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["wheels_installed"] == ["bitsandbytes", "submitit", "cloudpickle", "typing_extensions", "gguf"]
    site = summary["versions"]["imported_from"]
    assert all(folder.endswith("/site") and "gpu_check." in folder for folder in site.values()), site
    assert summary["passed"] is True and summary["steps"]["a"]["runs"][0]["exit_code"] == 0


def test_an_unknown_device_is_refused(tmp_path):
    p = gpu_check(tmp_path / "check", DEVICE="tpu")
    assert p.returncode == 2 and p.stderr.strip() == "DEVICE must be auto, cpu or cuda, not tpu"
    assert not (tmp_path / "check").exists()
