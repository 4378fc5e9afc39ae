"""Files that survive a crash: atomic writes, JSON without NaN, the output-folder check, and the
lock that keeps two runs from writing into one output folder."""
from __future__ import annotations

import io
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cli import UsageError


def write_atomic(path, data) -> None:
    """Write text or bytes to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would make outputs private to the writer
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finite(obj):
    """JSON has no NaN or infinity: such a value (a degenerate statistic) is written as null."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path, obj) -> None:
    write_atomic(path, json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n")


def write_npz(path, arrays: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(path, buf.getvalue())


def save_figure(fig, path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def check_writable(folder) -> Path:
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(f"output folder {folder} is not writable ({e.strerror}); pass --out with a folder you can write")
    return folder


# ----------------------------------------------------------------------------- the output-folder lock


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class FolderLock:
    """An exclusive claim on `folder` under `name`, held in `folder/.lock-<name>.json` with the
    holder's pid, host, start time and command.

    A job of a study (one seed and variant) holds "job" in its own checkpoint folder while it
    trains, so that several jobs share an output folder; the shared outputs are rewritten under a
    short-lived "outputs" lock on the output folder, which waits (`wait_s`) instead of refusing. A
    lock whose process is gone (killed, machine restarted) is taken over with a note; so is one
    held by an earlier run of the same Slurm job (same job id, fewer restarts: a requeued job,
    maybe on another host). A live one is refused in one line naming it."""

    def __init__(self, folder: Path, name: str = "run", command: str = "", wait_s: float = 0.0, who: dict | None = None):
        self.path = Path(folder) / f".lock-{name}.json"
        self.command = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        self.wait_s = wait_s
        self.who = who or {}  # extra identity: slurm_job_id and restarts (grid.identity)
        self.held = False

    def _record(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                           "command": self.command, **{k: v for k, v in self.who.items() if k not in ("pid", "host")}}).encode()

    def _requeued_from(self, holder: dict) -> bool:
        """The holder is an earlier run of this same Slurm job (requeued since: more restarts)."""
        mine = self.who.get("slurm_job_id")
        return bool(mine) and holder.get("slurm_job_id") == mine and self.who.get("restarts", 0) > holder.get("restarts", 0)

    def _try_create(self) -> bool:
        """The record is written to a temporary file first and hard-linked into place, so the lock
        file never exists half-written (another run would take a half-written one for stale)."""
        fd, tmp = tempfile.mkstemp(prefix=".lock-tmp.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self._record())
            os.link(tmp, self.path)  # atomic, and fails if the lock exists
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: an exclusive create, written at once
            return self._create_exclusive()
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _create_exclusive(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(self._record())
        return True

    def acquire(self) -> "FolderLock":
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                return self._acquire()
            except UsageError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)

    def _acquire(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock is removed and the exclusive create tried again
            if self._try_create():
                self.held = True
                return self
            try:
                holder = json.loads(self.path.read_text())
                pid, host = int(holder["pid"]), str(holder["host"])
            except (OSError, ValueError, KeyError, TypeError):
                holder, pid, host = {}, None, None  # unreadable: a write cut short
            if pid is not None and self._requeued_from(holder):
                print(f"note: taking over the lock {self.path} from Slurm job {holder['slurm_job_id']}'s earlier run "
                      f"(pid {pid} on {host}; requeued since)", file=sys.stderr)
                self.path.unlink(missing_ok=True)
                continue
            if pid is not None and host != socket.gethostname():
                raise UsageError(f"{self.path.parent} is in use by pid {pid} on {host} since {holder.get('started')} "
                                 f"(`{holder.get('command')}`); if that run is gone, delete {self.path}")
            if pid is not None and alive(pid) and pid != os.getpid():
                raise UsageError(f"{self.path.parent} is in use by a run still going (pid {pid}, since "
                                 f"{holder.get('started')}: `{holder.get('command')}`); wait for it, stop it, or pass another --out "
                                 f"(if that pid now belongs to another program, delete {self.path})")
            what = f"pid {pid}, no longer running" if pid is not None else "unreadable"
            print(f"note: taking over the lock {self.path} left by an earlier run ({what})", file=sys.stderr)
            self.path.unlink(missing_ok=True)
        raise UsageError(f"could not lock {self.path.parent}; another run keeps taking it")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
