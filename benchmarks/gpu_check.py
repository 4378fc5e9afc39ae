"""The prepared GPU check of the 7B path, run by `bash benchmarks/gpu_check.sh OUTDIR` (which first
installs the brought-along wheels a bare GPU machine lacks). Each step is a command line of
experiment_7b.py in its own process, with its own time limit; a failed step does not stop the next.

    a  the dry run at Qwen2.5-7B's shape on random weights (`--dry-run tiny` on the CPU): the table of
       seconds per step and peak memory with checkpointing on and off
    b  both presets (`--protocol written`, `--protocol published`) end to end on a tiny random Qwen2
       and tiny SST-2-like TSVs
    c  a stop (SIGTERM once the first epoch checkpoint exists) and `--resume` of the written run of
       two variants (sentiment_only, dual_engram), compared with b's uninterrupted run: the max abs
       difference of the validation accuracies (each job is seeded on its own, so the variants
       trained match b's)
    d  `--executor local --jobs 1` of the same two variants (two jobs, one after the other),
       compared the same way

Writes OUTDIR/gpu_check.json (each step's command, exit code, seconds and key numbers; versions,
device) and beside it at most six logs (setup.log, one per step). Settings come from the
environment: DEVICE (auto|cpu|cuda), STEPS (default abcd), MAX_TRAIN, MAX_EVAL, EPOCHS, BUDGET_S
(all steps together; default 450 s times LIMIT_FACTOR), LIMIT_FACTOR (the steps' own limits times
this; default 1 on a GPU, 4 on the CPU), DRY_RUN_PROTOCOLS (default "written"), DRY_RUN_ARGS (more
dry-run flags, e.g. "--max-length 16"), KEEP_WORK=1 (keep the runs' folders; gpu_check.sh).
"""

from __future__ import annotations

import json
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the shared real SST-2 beside the checkout (this project's machines) or inside it (a device machine's copy)
SST2 = next(
    (d for d in (ROOT.parent / "shared" / "data" / "sst2", ROOT / "shared" / "data" / "sst2") if d.is_dir()),
    ROOT.parent / "shared" / "data" / "sst2",
)
LOG_LIMIT = 15 * 2**20  # bytes kept of a log (its end): what comes back from a device is at most 16 MiB a file
# each step's own limit in seconds on a GPU; LIMIT_FACTOR times as long (default: 4 on the CPU)
LIMITS = {"a": 150, "b_written": 75, "b_published": 75, "c": 90, "d": 90}
TWO = ["--variants", "sentiment_only", "dual_engram"]  # steps c and d: the plain model and the pair step
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "submitit", "gguf", "numpy", "scikit-learn")


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


# ----------------------------------------------------------------------------- the machine


def versions() -> dict:
    """Each package's version, and where the ones gpu_check.sh may install are imported from."""
    import importlib.util
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    spec = {m: importlib.util.find_spec(m) for m in ("bitsandbytes", "submitit", "gguf")}
    out["imported_from"] = {m: str(Path(s.origin).parent.parent) if s and s.origin else None for m, s in spec.items()}
    return out


PROBE = """
import json, os, platform, torch
info = {"torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "host": platform.node(),
        "cpus": os.cpu_count()}
if info["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 2), compute_capability=f"{p.major}.{p.minor}",
                gpus=torch.cuda.device_count())
print(json.dumps(info))
"""


def machine() -> dict:
    """The device, asked in a child process: a CUDA context here would hold GPU memory all along."""
    p = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def pick_device(info: dict) -> str:
    want = os.environ.get("DEVICE", "auto")
    if want not in ("auto", "cpu", "cuda"):
        raise SystemExit(f"DEVICE must be auto, cpu or cuda, not {want!r}")
    if want != "auto":
        return want
    return "cuda" if info.get("cuda_available") else "cpu"


# ----------------------------------------------------------------------------- the tiny inputs


def sst2_rows(out: Path, n_train: int, n_dev: int, seed: int = 0) -> str:
    """GLUE-layout train.tsv and dev.tsv: the first rows of the shared SST-2 where it exists, else
    generated rows of both labels in turn (a device machine may have no copy of the data)."""
    out.mkdir(parents=True, exist_ok=True)
    if (SST2 / "train.tsv").is_file() and (SST2 / "dev.tsv").is_file():
        for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
            lines = (SST2 / name).read_text().split("\n")
            (out / name).write_text("\n".join(lines[: n + 1]) + "\n")
        return str(SST2)
    rng = random.Random(seed)
    good, bad = "good great fine lovely superb".split(), "bad awful dull poor boring".split()
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            label = i % 2  # alternating: any first rows hold both labels alike (the probes need 5 of each)
            rows.append(" ".join(rng.choice(good if label else bad) for _ in range(rng.randrange(2, 9))) + f"\t{label}")
        (out / name).write_text("\n".join(rows) + "\n")
    return "generated"


def tiny_qwen(folder: Path, data: Path) -> None:
    """A tiny random Qwen2 and its tokenizer trained on the rows, saved as a model folder (the one
    the tests use: dry_run.save_tiny_qwen)."""
    from transformers.utils import logging as hf_logging

    sys.path.insert(0, str(ROOT))
    from qlora.dry_run import save_tiny_qwen

    hf_logging.disable_progress_bar()  # save_pretrained's bar, in setup.log
    sentences = [
        line.split("\t")[0]
        for name in ("train.tsv", "dev.tsv")
        for line in (data / name).read_text().split("\n")[1:]
        if line
    ]
    save_tiny_qwen(folder, sentences)


# ----------------------------------------------------------------------------- running a step


class Clock:
    """What is left of BUDGET_S: a step gets its own limit or what is left, whichever is less."""

    def __init__(self, budget: float):
        self.end = time.monotonic() + budget

    def limit(self, own: float) -> float:
        return max(0.0, min(own, self.end - time.monotonic()))


def run(argv: list[str], log: Path, limit: float, stop_when=None, header: str = "") -> dict:
    """Run argv in ROOT with its output appended to log; past `limit` seconds its process group is
    killed (exit code 124, as timeout(1)). stop_when(): once true, the process gets one SIGTERM
    (a stop request, as Slurm's preemption sends). Returns command, exit code, seconds."""
    if limit < 5:
        return {"command": shlex.join(argv), "exit_code": None, "seconds": 0.0, "skipped": "no time left in BUDGET_S"}
    with open(log, "a") as f:
        f.write(f"{header}$ {shlex.join(argv)}\n")
        f.flush()
        t0 = time.monotonic()
        p = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={"HF_HUB_OFFLINE": "1", **os.environ, "PYTHONUNBUFFERED": "1"},
        )  # no network there
        stopped_at, code = None, None
        while code is None:
            try:
                code = p.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                if time.monotonic() - t0 > limit:
                    os.killpg(p.pid, signal.SIGTERM)
                    try:
                        p.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        os.killpg(p.pid, signal.SIGKILL)
                        p.wait()
                    code = 124
                elif stop_when is not None and stopped_at is None and stop_when():
                    p.send_signal(signal.SIGTERM)
                    stopped_at = time.monotonic() - t0
        seconds = time.monotonic() - t0
        f.write(f"[exit code {code} after {seconds:.1f} s]\n\n")
    out = {"command": shlex.join(argv), "exit_code": code, "seconds": round(seconds, 2), "limit_s": round(limit)}
    if stop_when is not None:
        out["sigterm_after_s"] = None if stopped_at is None else round(stopped_at, 2)
    return out


def trim_log(log: Path) -> None:
    if log.is_file() and log.stat().st_size > LOG_LIMIT:
        tail = log.read_bytes()[-LOG_LIMIT:]
        log.write_bytes(b"[... the start of this log is cut: it was over 15 MiB]\n" + tail)


def val_accuracies(out: Path) -> dict | None:
    """Each variant's validation accuracy per epoch (first seed) from a run's metrics.json."""
    try:
        m = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return {v: [h["val_acc"] for h in mm["runs"][0]["history"]] for v, mm in m["models"].items()}


def compare(ours: dict | None, reference: dict | None) -> dict:
    """Max abs difference of validation accuracies (percentage points) over the variants both runs
    trained, against the reference run; on a GPU bitwise equality need not hold (non-deterministic
    kernels), so it is recorded, not judged."""
    both = sorted(set(ours or {}) & set(reference or {}))
    diffs = [abs(a - b) for v in both for a, b in zip(ours[v], reference[v])]
    same = bool(both) and all(len(ours[v]) == len(reference[v]) for v in both) and not any(diffs)
    return {
        "compared": both,
        "max_abs_val_acc_diff": max(diffs) if diffs else None,
        "identical": same,
        "val_acc": ours,
        "reference_val_acc": {v: reference[v] for v in both} if both else reference,
    }


# ----------------------------------------------------------------------------- the steps


def dry_run_step(py: str, device: str, out: Path, work: Path, clock: Clock, factor: int) -> dict:
    """Step a: experiment_7b.main, exactly what `python experiment_7b.py --dry-run` runs, in a child
    process that also writes the returned report (the table's numbers) to a JSON file."""
    shape = "7b" if device == "cuda" else "tiny"
    log, runs = out / "a_dry_run.log", []
    for protocol in os.environ.get("DRY_RUN_PROTOCOLS", "written").split():
        report = work / f"dry_run_{protocol}.json"
        keep = (
            "import json, sys; import experiment_7b as e; r = e.main(sys.argv[2:]); "
            "open(sys.argv[1], 'w').write(json.dumps(r, default=str))"
        )
        flags = [
            "--dry-run",
            shape,
            "--protocol",
            protocol,
            "--device",
            device,
            "--no-progress",
            *shlex.split(os.environ.get("DRY_RUN_ARGS", "")),
        ]
        r = run(
            [py, "-c", keep, str(report), *flags],
            log,
            clock.limit(LIMITS["a"] * factor),
            header=f"# the dry run, protocol {protocol}\n",
        )
        r["cli"] = shlex.join(["python", "experiment_7b.py", *flags])
        r["protocol"] = protocol
        if report.is_file():
            rep = json.loads(report.read_text())
            keys = (
                "variant",
                "gradient_checkpointing",
                "batch_size",
                "max_length",
                "seconds_per_step",
                "peak_allocated_gib",
                "peak_reserved_gib",
                "fits_16gb",
                "margin_gib",
                "oom",
            )
            r.update(
                shape=shape,
                compute_dtype=rep["compute_dtype"],
                device_name=rep["device"],
                rows=[{k: x.get(k) for k in keys} for x in rep["runs"]],
                table=rep["table"],
            )
        r["ok"] = r["exit_code"] == 0 and len(r.get("rows", [])) == 6
        runs.append(r)
    trim_log(log)
    return {"log": log.name, "runs": runs, "ok": bool(runs) and all(r["ok"] for r in runs)}


def tiny_argv(py: str, model: Path, data: Path, device: str, work: Path) -> list[str]:
    return [
        py,
        "experiment_7b.py",
        "--model",
        str(model),
        "--data-dir",
        str(data),
        "--device",
        device,
        "--no-progress",
        "--epochs",
        os.environ.get("EPOCHS", "2"),
        "--max-train",
        os.environ.get("MAX_TRAIN", "200"),
        "--max-eval",
        os.environ.get("MAX_EVAL", "64"),
        "--seeds",
        "42",
        "--small-results",
        str(work / "none.json"),
    ]


def end_to_end_step(base: list[str], out: Path, work: Path, clock: Clock, factor: int) -> dict:
    """Step b: both presets; the published run, in b/published, is compared with the written one
    in b (the report's "As written vs as run" tables)."""
    res = {}
    for protocol, folder in (("written", work / "b"), ("published", work / "b" / "published")):
        log = out / f"b_{protocol}.log"
        r = run(
            [*base, "--protocol", protocol, "--out", str(folder)], log, clock.limit(LIMITS[f"b_{protocol}"] * factor)
        )
        acc = val_accuracies(folder)
        r.update(
            log=log.name,
            val_acc=acc,
            ok=r["exit_code"] == 0 and acc is not None and len(acc) == 3,
            report=(folder / "REPORT.md").is_file(),
        )
        trim_log(log)
        res[protocol] = r
    return {**res, "ok": all(r["ok"] for r in res.values())}


def reference(base: list[str], work: Path, log: Path, clock: Clock, factor: int) -> dict | None:
    """b's uninterrupted written run; if b did not run, the two variants' run here (once, into the
    step's log)."""
    for folder in (work / "b", work / "reference"):
        if val_accuracies(folder) is not None:
            return val_accuracies(folder)
    run(
        [*base, *TWO, "--out", str(work / "reference")],
        log,
        clock.limit(LIMITS["b_written"] * factor),
        header="# the uninterrupted reference run (step b did not run)\n",
    )
    return val_accuracies(work / "reference")


def stop_resume_step(base: list[str], out: Path, work: Path, clock: Clock, factor: int) -> dict:
    """Step c: SIGTERM once the first epoch checkpoint of any job is complete, then --resume."""
    log, folder = out / "c_stop_resume.log", work / "c"
    ref = reference(base, work, log, clock, factor)
    limit = LIMITS["c"] * factor
    t0 = time.monotonic()

    def first_checkpoint() -> bool:
        return any((folder / "checkpoints").glob("seed*/*/epoch_*/COMPLETE"))

    stop = run(
        [*base, *TWO, "--out", str(folder)],
        log,
        clock.limit(limit),
        stop_when=first_checkpoint,
        header="# the run to stop\n",
    )
    resume = run(
        [*base, *TWO, "--out", str(folder), "--resume"],
        log,
        clock.limit(limit - (time.monotonic() - t0)),
        header="# its --resume\n",
    )
    text = log.read_text()
    stopped = [line for line in text.splitlines() if "stopped at step" in line or line.startswith("stopped:")]
    trim_log(log)
    # 143 = 128 + SIGTERM: stopped at a step boundary; 0: it finished before the signal (a fast GPU)
    ok = stop["exit_code"] in (0, 143) and resume["exit_code"] == 0 and val_accuracies(folder) is not None
    return {
        "log": log.name,
        "stopped_run": stop,
        "resumed_run": resume,
        "stop_lines": stopped[:4],
        **compare(val_accuracies(folder), ref),
        "ok": ok,
    }


def local_executor_step(base: list[str], out: Path, work: Path, clock: Clock, factor: int) -> dict:
    """Step d: the same run as jobs started by submitit on this machine, one at a time."""
    log, folder = out / "d_local.log", work / "d"
    ref = reference(base, work, log, clock, factor)
    r = run(
        [*base, *TWO, "--out", str(folder), "--executor", "local", "--jobs", "1"],
        log,
        clock.limit(LIMITS["d"] * factor),
    )
    trim_log(log)
    acc = val_accuracies(folder)
    return {"log": log.name, **r, **compare(acc, ref), "ok": r["exit_code"] == 0 and acc is not None and len(acc) == 2}


# ----------------------------------------------------------------------------- main


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder for gpu_check.json and the logs")
    p.add_argument("--work", type=Path, required=True, help="folder for the runs (a temporary one)")
    p.add_argument("--installed", default="", help="the wheels gpu_check.sh installed (space-separated)")
    p.add_argument("--started", type=float, default=None, help="when gpu_check.sh started (epoch seconds)")
    args = p.parse_args(argv)
    t_start = args.started or time.time()
    out, work = args.out, args.work
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    info = machine()
    device = pick_device(info)
    factor = env_int("LIMIT_FACTOR", 1 if device == "cuda" else 4)
    clock = Clock(env_int("BUDGET_S", 450 * factor) - (time.time() - t_start))
    steps = os.environ.get("STEPS", "abcd")
    summary = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t_start)),
        "steps_asked": steps,
        "machine": {"device": device, **info},
        "versions": versions(),
        "wheels_installed": args.installed.split(),
        "settings": {
            k: os.environ.get(k)
            for k in (
                "DEVICE",
                "MAX_TRAIN",
                "MAX_EVAL",
                "EPOCHS",
                "BUDGET_S",
                "LIMIT_FACTOR",
                "DRY_RUN_PROTOCOLS",
                "DRY_RUN_ARGS",
            )
            if os.environ.get(k)
        },
        "steps": {},
    }
    json_path = out / "gpu_check.json"

    def save() -> None:
        summary["seconds"] = round(time.time() - t_start, 1)
        summary["passed"] = bool(summary["steps"]) and all(s.get("ok") for s in summary["steps"].values())
        json_path.write_text(json.dumps(summary, indent=1, default=str) + "\n")

    py, base = sys.executable, None
    if set(steps) & set("bcd"):
        t0 = time.monotonic()
        data = work / "sst2"
        try:
            summary["data"] = sst2_rows(data, env_int("MAX_TRAIN", 200), env_int("MAX_EVAL", 64))
            tiny_qwen(work / "tiny_qwen", data)
            base = tiny_argv(py, work / "tiny_qwen", data, device, work)
        except Exception as e:
            summary["setup_error"] = f"{type(e).__name__}: {e}"
        summary["tiny_model_seconds"] = round(time.monotonic() - t0, 1)
    for name, step in (
        ("a", lambda: dry_run_step(py, device, out, work, clock, factor)),
        ("b", lambda: end_to_end_step(base, out, work, clock, factor)),
        ("c", lambda: stop_resume_step(base, out, work, clock, factor)),
        ("d", lambda: local_executor_step(base, out, work, clock, factor)),
    ):
        if name not in steps:
            continue
        t0 = time.monotonic()
        try:
            if name != "a" and base is None:
                raise RuntimeError(f"no tiny model and data ({summary.get('setup_error')})")
            summary["steps"][name] = step()
        except Exception as e:  # a broken step is recorded; the next one still runs
            summary["steps"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        summary["steps"][name]["step_seconds"] = round(time.monotonic() - t0, 1)
        print(
            f"gpu_check step {name}: {'ok' if summary['steps'][name]['ok'] else 'FAILED'} "
            f"({summary['steps'][name]['step_seconds']:.0f} s)",
            flush=True,
        )
        save()
    save()
    print(f"gpu_check: {'passed' if summary['passed'] else 'FAILED'} in {summary['seconds']:.0f} s; {json_path}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
