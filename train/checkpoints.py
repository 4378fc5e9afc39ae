"""Per-epoch checkpoints: save, read back to verify, load, and fall back to an older epoch when
the newest cannot be read; every random generator's state; the settings a resume must match."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from train.files import write_json
from train.stop import UsageError

MARKER = "COMPLETE"
KEEP = 2  # complete epochs kept per variant: the newest, and one to fall back to
FILES = ("trainable.safetensors", "train_state.pt", "rng.safetensors", "state.json", MARKER)


class CheckpointError(Exception):
    """A checkpoint folder that cannot be read back whole."""


# ----------------------------------------------------------------------------- random state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def rng_state(device: torch.device | None = None) -> tuple[dict, dict]:
    """(tensors, json) capturing the Python, NumPy and torch generators and, when training on a
    GPU, that GPU's generator (only that one: a resume may see fewer GPUs, or another one)."""
    tensors = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    np_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    py = random.getstate()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict, device: torch.device | None = None) -> None:
    torch.set_rng_state(tensors["torch"])
    if device is not None and device.type == "cuda":
        # "cuda": the training GPU's; "cuda<i>": every GPU's, as older checkpoints kept them
        index = device.index if device.index is not None else torch.cuda.current_device()
        saved = tensors.get("cuda", tensors.get(f"cuda{index}", tensors.get("cuda0")))
        if saved is not None:
            torch.cuda.set_rng_state(saved, device)
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))


def training_device(model: torch.nn.Module) -> torch.device:
    """Where the model's trainable parameters live (the GPU it trains on, or the CPU)."""
    return next((p.device for p in model.parameters() if p.requires_grad), torch.device("cpu"))


# ----------------------------------------------------------------------------- save, read, load


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters only: the whole small model, or LoRA adapters and heads of a 7B run."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def read_checkpoint(path: Path) -> dict:
    """Everything in a checkpoint folder, read into memory; CheckpointError if any part is missing
    or cannot be parsed (a cut file, a bad copy). Nothing is applied to a model here."""
    from safetensors.torch import load_file

    if not (path / MARKER).is_file():
        raise CheckpointError("no COMPLETE marker")
    try:
        state = json.loads((path / "state.json").read_text())
        return {
            "weights": load_file(str(path / "trainable.safetensors")),
            "train_state": torch.load(path / "train_state.pt", weights_only=True, map_location="cpu"),
            "rng": load_file(str(path / "rng.safetensors")),
            "state": state,
            "rng_meta": state.pop("rng"),
        }
    except Exception as e:  # safetensors, pickle, JSON and OS errors all mean "unreadable"
        raise CheckpointError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}") from None


def checkpoint_name(epoch: int, step: int = 0) -> str:
    """epoch_003: epoch 3 complete; epoch_004_step_000120: 120 steps into epoch 4 (a checkpoint
    taken mid-epoch, at a stop request or a preemption)."""
    return f"epoch_{epoch:03d}" if not step else f"epoch_{epoch + 1:03d}_step_{step:06d}"


def _position(p: Path) -> tuple[int, float] | None:
    """(epoch, step) of a checkpoint folder's name, a complete epoch after all of its steps; None
    for another name. By number, not by name: epoch_1000 is newer than epoch_999."""
    parts = p.name.split("_")
    if len(parts) == 2 and parts[0] == "epoch" and parts[1].isdigit():
        return int(parts[1]), float("inf")
    if len(parts) == 4 and parts[0] == "epoch" and parts[2] == "step" and parts[1].isdigit() and parts[3].isdigit():
        return int(parts[1]), int(parts[3])
    return None


def save_checkpoint(folder: Path, epoch: int, model, optimizer, scheduler, scaler, state: dict, step: int = 0) -> Path:
    """Write the state after epoch `epoch` (and `step` steps of the next one) into a temporary
    folder, the marker last, rename it into place, read it back whole, and only then drop
    checkpoints older than the KEEP newest. A folder without the marker is never loaded, and a
    failed read-back leaves the older ones in place."""
    from safetensors.torch import save_file

    final = folder / checkpoint_name(epoch, step)
    tmp = folder / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    train_state = {"optimizer": optimizer.state_dict()}
    if scheduler is not None:
        train_state["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        train_state["scaler"] = scaler.state_dict()
    torch.save(train_state, tmp / "train_state.pt")
    rng_tensors, rng_meta = rng_state(training_device(model))
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(
        json.dumps({**state, "epoch": epoch, "step": step, "rng": rng_meta}, allow_nan=False)
    )
    (tmp / MARKER).write_text("ok\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    try:
        read_checkpoint(final)  # verify before any older epoch is removed
    except CheckpointError as e:
        raise UsageError(
            f"checkpoint {final} did not read back ({e}); the older epochs are kept in {folder}; "
            "check the disk, then continue with --resume"
        ) from None
    for old in complete_checkpoints(folder)[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint folders with the COMPLETE marker, newest first."""
    found = [p for p in folder.glob("epoch_*") if _position(p) is not None and (p / MARKER).is_file()]
    return sorted(found, key=_position, reverse=True)


def latest_checkpoint(folder: Path) -> Path | None:
    done = complete_checkpoints(folder)
    return done[0] if done else None


def _apply(ck: dict, path: Path, model, optimizer, scheduler, scaler) -> dict:
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(ck["weights"]) != expected:
        raise UsageError(f"checkpoint {path} does not match this model's trainable parameters; rerun without --resume")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, w in ck["weights"].items():
            params[n].copy_(w)
    optimizer.load_state_dict(ck["train_state"]["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(ck["train_state"]["scheduler"])
    if scaler is not None and "scaler" in ck["train_state"]:
        scaler.load_state_dict(ck["train_state"]["scaler"])
    elif scaler is not None:  # made without a loss scaler (on bf16 or fp32): this one starts fresh
        print(
            f"note: checkpoint {path} has no loss-scaler state; the scaler starts at its initial scale", file=sys.stderr
        )
    set_rng_state(ck["rng"], ck["rng_meta"], training_device(model))
    return ck["state"]


def resume_from(folder: Path, label: str, model, optimizer, scheduler, scaler) -> dict | None:
    """Load the newest readable checkpoint of `folder` into the model, optimizer, scheduler, scaler
    and random generators, and return its state (history, best, epoch ...); None when there is
    none to load. Each unreadable one is reported in one line and the next older one is tried."""
    found = complete_checkpoints(folder)
    for i, path in enumerate(found):
        try:
            ck = read_checkpoint(path)
        except CheckpointError as e:
            then = f"falling back to {found[i + 1].name}" if i + 1 < len(found) else f"starting {label} over"
            print(f"warning: checkpoint {path} cannot be read ({e}); {then}", file=sys.stderr)
            continue
        return _apply(ck, path, model, optimizer, scheduler, scaler)
    return None


def read_result(path: Path, label: str) -> dict | None:
    """A finished variant's result.json, or None (with a one-line note) when it cannot be read."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(
            f"warning: {path} cannot be read ({type(e).__name__}); finishing {label} again from its checkpoints",
            file=sys.stderr,
        )
        return None


# ----------------------------------------------------------------------------- the settings a resume must match

# settings a resumed run may change: where and how it runs, and which jobs of the grid (seeds and
# variants may be added); never what a job computes
# (threads too: each result records its own, and the same seed gives the same numbers only at one thread count)
RESUME_FREE = (
    "resume",
    "no_progress",
    "seeds",
    "variants",
    "out",
    "device",
    "executor",
    "jobs",
    "threads",
    "status",
    "report_only",
    "overwrite",
    "slurm_partition",
    "slurm_time",
    "slurm_gpus",
    "slurm_cpus",
    "slurm_extra",
    "job",
    "ladder",
    "report_to",
    "log_steps",
)


def live_job_locks(ckpt_root: Path) -> list[str]:
    """The jobs of this folder whose lock is held by a process still running (here or elsewhere)."""
    import socket

    from train.files import alive

    held = []
    for lock in ckpt_root.glob("seed*/*/.lock-job.json"):
        try:
            holder = json.loads(lock.read_text())
        except (OSError, ValueError):
            continue
        if holder.get("host") != socket.gethostname() or alive(int(holder.get("pid", 0))):
            held.append(
                f"{lock.parent.parent.name}/{lock.parent.name} (pid {holder.get('pid')} on {holder.get('host')})"
            )
    return held


def finished_jobs(ckpt_root: Path) -> list[str]:
    """seed<S>/<variant> of every job of this folder with a result."""
    return sorted(f"{r.parent.parent.name}/{r.parent.name}" for r in ckpt_root.glob("seed*/*/result.json"))


def committed_study(ckpt_root: Path, done: list[str]) -> bool:
    """Every finished job of the folder is as git holds it at HEAD (each result.json tracked, nothing
    under the folder modified, deleted or new): the committed study, which `git restore` brings back,
    so a fresh run may replace it. False outside a git checkout or when git cannot be asked: then
    nothing says the results are anywhere else, and they are kept."""
    root = ckpt_root.resolve()
    git = ["git", "-C", str(root)]
    try:
        tracked = subprocess.run(
            [*git, "ls-files", "--error-unmatch", "--", *(str(root / d / "result.json") for d in done)],
            capture_output=True,
            timeout=60,
        )
        changed = subprocess.run(
            [*git, "status", "--porcelain", "--", str(root)], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return bool(done) and tracked.returncode == 0 and changed.returncode == 0 and not changed.stdout.strip()


def check_fresh(ckpt_root: Path, overwrite: bool) -> list[str]:
    """The finished jobs a fresh run would delete; refused in one line unless --overwrite, or unless
    they are the committed study unchanged (a newcomer's first command trains; git brings them back)."""
    done = finished_jobs(ckpt_root)
    if done and not overwrite and not committed_study(ckpt_root, done):
        raise UsageError(
            f"{ckpt_root.parent} holds {len(done)} finished job(s) ({', '.join(done[:4])}"
            f"{', ...' if len(done) > 4 else ''}); continue them with --resume, delete them with --overwrite, "
            "or pass another --out"
        )
    return done


def prepare_checkpoints(
    ckpt_root: Path, settings: dict, resume: bool, overwrite: bool = False, start_over: str = "run without --resume"
) -> None:
    """A fresh run starts its folder over, unless a job of that folder is still running, and never
    deletes a finished job's result unless told to (--overwrite); a resumed one only continues
    checkpoints made with the same settings (seeds and variants may be added). `start_over` is what
    the refusal advises: a grid under an executor always resumes, and starts over only with --overwrite."""
    if not resume:
        held = live_job_locks(ckpt_root)
        if held:
            raise UsageError(
                f"{ckpt_root.parent} is in use by jobs still running: {', '.join(held)}; wait for them, stop "
                "them, or pass another --out"
            )
        done = check_fresh(ckpt_root, overwrite)
        if done and overwrite:
            print(
                f"--overwrite: deleting the {len(done)} finished job(s) and every checkpoint in {ckpt_root}",
                file=sys.stderr,
            )
        elif done:
            print(
                f"note: replacing the committed study in {ckpt_root.parent} ({len(done)} finished job(s), "
                "unchanged since "
                f"the last commit); bring it back with: git restore {ckpt_root.parent}",
                file=sys.stderr,
            )
        elif complete_checkpoints_below(ckpt_root):
            print(
                f"note: starting over: the unfinished jobs' checkpoints in {ckpt_root} are removed "
                "(--resume continues them)",
                file=sys.stderr,
            )
        shutil.rmtree(ckpt_root, ignore_errors=True)
    path = ckpt_root / "run.json"
    mine = {k: v for k, v in settings.items() if k not in RESUME_FREE}
    if resume and path.is_file():
        try:
            theirs = json.loads(path.read_text())
        except (OSError, ValueError):
            raise UsageError(
                f"{path} cannot be read, so the settings of its checkpoints are unknown; {start_over} to start over"
            ) from None
        theirs = {k: v for k, v in theirs.items() if k not in RESUME_FREE}  # written before a setting was freed
        # a setting that did not exist when they were made counts as its default, and equals only that
        diff = [
            f"{k}: {theirs.get(k)} -> {mine.get(k)}"
            for k in sorted(set(mine) | set(theirs))
            if theirs.get(k) != mine.get(k) and not (k not in theirs and is_unset(mine.get(k)))
        ]
        if diff:
            raise UsageError(
                f"checkpoints in {ckpt_root} were made with other settings ({'; '.join(diff)}); "
                f"resume with the same flags, or {start_over} to start over"
            )
    write_json(path, mine)


def is_unset(value) -> bool:
    """A setting at the default every flag added since the first checkpoints has: None, False or
    empty. By identity, not ==: 0 and 0.0 equal False in Python, yet set a number explicitly."""
    return value is None or value is False or (isinstance(value, (list, tuple, dict, str)) and not value)


def complete_checkpoints_below(ckpt_root: Path) -> bool:
    return any(complete_checkpoints(f) for f in ckpt_root.glob("seed*/*") if f.is_dir())
