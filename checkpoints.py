"""Per-epoch checkpoints: save, read back to verify, load, and fall back to an older epoch when
the newest cannot be read; every random generator's state; the settings a resume must match."""
from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from cli import UsageError
from files import write_json

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


def rng_state() -> tuple[dict, dict]:
    """(tensors, json) capturing the Python, NumPy, torch and CUDA generators."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    np_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    py = random.getstate()
    meta = {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))


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
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "epoch": epoch, "step": step, "rng": rng_meta}, allow_nan=False))
    (tmp / MARKER).write_text("ok\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    try:
        read_checkpoint(final)  # verify before any older epoch is removed
    except CheckpointError as e:
        raise UsageError(f"checkpoint {final} did not read back ({e}); the older epochs are kept in {folder}; "
                         "check the disk, then continue with --resume") from None
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
    if scaler is not None:
        scaler.load_state_dict(ck["train_state"]["scaler"])
    set_rng_state(ck["rng"], ck["rng_meta"])
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
        print(f"warning: {path} cannot be read ({type(e).__name__}); finishing {label} again from its checkpoints",
              file=sys.stderr)
        return None


# ----------------------------------------------------------------------------- the settings a resume must match

# settings a resumed run may change: where and how it runs, and which jobs of the grid (seeds and
# variants may be added); never what a job computes
RESUME_FREE = ("resume", "no_progress", "seeds", "variants", "out", "device", "executor", "jobs", "status", "report_only",
               "slurm_partition", "slurm_time", "slurm_gpus", "slurm_cpus", "slurm_extra", "job", "ladder")


def live_job_locks(ckpt_root: Path) -> list[str]:
    """The jobs of this folder whose lock is held by a process still running (here or elsewhere)."""
    import socket

    from files import alive

    held = []
    for lock in ckpt_root.glob("seed*/*/.lock-job.json"):
        try:
            holder = json.loads(lock.read_text())
        except (OSError, ValueError):
            continue
        if holder.get("host") != socket.gethostname() or alive(int(holder.get("pid", 0))):
            held.append(f"{lock.parent.parent.name}/{lock.parent.name} (pid {holder.get('pid')} on {holder.get('host')})")
    return held


def prepare_checkpoints(ckpt_root: Path, settings: dict, resume: bool) -> None:
    """A fresh run clears old checkpoints, unless a job of that folder is still running; a resumed
    one only continues checkpoints made with the same settings (seeds and variants may be added)."""
    if not resume:
        held = live_job_locks(ckpt_root)
        if held:
            raise UsageError(f"{ckpt_root.parent} is in use by jobs still running: {', '.join(held)}; wait for them, stop "
                             "them, or pass another --out")
        shutil.rmtree(ckpt_root, ignore_errors=True)
    path = ckpt_root / "run.json"
    mine = {k: v for k, v in settings.items() if k not in RESUME_FREE}
    if resume and path.is_file():
        try:
            theirs = json.loads(path.read_text())
        except (OSError, ValueError):
            raise UsageError(f"{path} cannot be read, so the settings of its checkpoints are unknown; "
                             "run without --resume to start over") from None
        diff = [f"{k}: {theirs.get(k)} -> {mine.get(k)}" for k in sorted(set(mine) | set(theirs)) if theirs.get(k) != mine.get(k)]
        if diff:
            raise UsageError(f"checkpoints in {ckpt_root} were made with other settings ({'; '.join(diff)}); "
                             "resume with the same flags, or run without --resume to start over")
    write_json(path, mine)
