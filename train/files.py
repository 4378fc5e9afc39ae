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

from train.stop import UsageError


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


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (and closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def save_figure(fig, path) -> None:
    write_atomic(path, figure_png(fig))


def check_writable(folder) -> Path:
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(
            f"output folder {folder} is not writable ({e.strerror}); pass --out with a folder you can write"
        )
    return folder


# ----------------------------------------------------------------------------- the output-folder lock


def alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine. A zombie (ended, not yet reaped: in a container
    whose PID 1 does not reap, an orphaned job's process stays one) counts as ended."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # it ended just now; or there is no /proc (macOS), where kill(pid, 0) must do
        return not Path("/proc").is_dir()
    return stat.rpartition(")")[2].split()[0] != "Z"


class FolderLock:
    """An exclusive claim on `folder` under `name`, held in `folder/.lock-<name>.json` with the
    holder's pid, host, start time and command.

    A job of a study (one seed and variant) holds "job" in its own checkpoint folder while it
    trains, so that several jobs share an output folder; the shared outputs are rewritten under a
    short-lived "outputs" lock on the output folder, which waits (`wait_s`) instead of refusing. A
    lock whose process is gone (killed, machine restarted) is taken over with a note; so is one
    held by an earlier run of the same Slurm job (same job id, fewer restarts: a requeued job,
    maybe on another host), and, with `stale_s`, one held by another host that this process has
    seen unchanged for `stale_s` seconds (a short lock whose holder died on its node: no clock of
    another machine is trusted). A live one is refused in one line naming it.

    Taking over is atomic: a takeover holds a guard file (an exclusive create) while it checks
    that the lock is still the stale one it judged, removes it and creates its own, so of several
    processes taking over one stale lock exactly one wins. A release removes only its own lock."""

    GUARD_STALE_S = 30.0  # a takeover guard seen unchanged this long was left by a process that died in it

    def __init__(
        self,
        folder: Path,
        name: str = "run",
        command: str = "",
        wait_s: float = 0.0,
        who: dict | None = None,
        stale_s: float | None = None,
    ):
        self.path = Path(folder) / f".lock-{name}.json"
        self.command = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        self.wait_s, self.stale_s = wait_s, stale_s
        self.who = who or {}  # extra identity: slurm_job_id and restarts (grid.identity)
        self.held = False
        self._mine: bytes | None = None  # the record this process wrote, which release() compares
        self._seen: dict = {}  # another host's lock record, or a takeover guard -> when this process first saw it

    def _record(self) -> bytes:
        return json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": self.command,
                **{k: v for k, v in self.who.items() if k not in ("pid", "host")},
            }
        ).encode()

    def _requeued_from(self, holder: dict) -> bool:
        """The holder is an earlier run of this same Slurm job (requeued since: more restarts)."""
        mine = self.who.get("slurm_job_id")
        return (
            bool(mine)
            and holder.get("slurm_job_id") == mine
            and self.who.get("restarts", 0) > holder.get("restarts", 0)
        )

    def _try_create(self) -> bool:
        """The record is written to a temporary file first and hard-linked into place, so the lock
        file never exists half-written (another run would take a half-written one for stale)."""
        record = self._record()
        fd, tmp = tempfile.mkstemp(prefix=".lock-tmp.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(record)
            os.link(tmp, self.path)  # atomic, and fails if the lock exists
            created = True
        except FileExistsError:
            created = False
        except OSError:  # a filesystem without hard links: an exclusive create, written at once
            created = self._create_exclusive(record)
        finally:
            Path(tmp).unlink(missing_ok=True)
        if created:
            self._mine, self.held = record, True
        return created

    def _create_exclusive(self, record: bytes) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(record)
        return True

    def _take_over(self, stale: bytes) -> bool:
        """Replace the lock if it still holds `stale`; False if another process is taking it over
        or has already replaced it (then the caller looks at the lock again)."""
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                st = guard.stat()
                # judged by this process's own clock, from when it first saw this guard (the file's
                # mtime is another host's clock, or the file server's): unchanged this long, its owner
                # died mid-takeover
                first = self._seen.setdefault(("guard", st.st_ino, st.st_mtime_ns, st.st_ctime_ns), time.monotonic())
                if time.monotonic() - first > self.GUARD_STALE_S:
                    guard.unlink(missing_ok=True)
            except OSError:
                pass
            return False
        os.close(fd)
        try:
            try:
                current = self.path.read_bytes()
            except FileNotFoundError:
                current = None
            if current is not None and current != stale:
                return False  # released and taken again, or taken over by another process already
            self.path.unlink(missing_ok=True)
            return self._try_create()
        finally:
            guard.unlink(missing_ok=True)

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
        for _ in range(3):  # a stale lock is taken over, or the exclusive create tried again
            if self._try_create():
                return self
            try:
                raw = self.path.read_bytes()
            except FileNotFoundError:
                continue  # released in between: try again
            except OSError:
                raw = b""
            try:
                holder = json.loads(raw)
                pid, host = int(holder["pid"]), str(holder["host"])
            except (ValueError, KeyError, TypeError):
                holder, pid, host = {}, None, None  # unreadable: a write cut short
            note = self._stale(holder, pid, host, raw)
            if note and self._take_over(raw):
                print(f"note: taking over the lock {self.path} {note}", file=sys.stderr)
                return self
        raise UsageError(f"could not lock {self.path.parent}; another run keeps taking it")

    def _stale(self, holder: dict, pid: int | None, host: str | None, raw: bytes) -> str | None:
        """Why the lock in `raw` may be taken over (the note's words), or a UsageError naming its
        live holder."""
        if pid is None:
            return "left by an earlier run (unreadable)"
        if self._requeued_from(holder):
            return f"from Slurm job {holder['slurm_job_id']}'s earlier run (pid {pid} on {host}; requeued since)"
        if host != socket.gethostname():
            first = self._seen.setdefault(raw, time.monotonic())
            if self.stale_s is not None and time.monotonic() - first >= self.stale_s:
                return f"left by pid {pid} on {host} (unchanged for {self.stale_s:g} s: that run is taken for gone)"
            raise UsageError(
                f"{self.path.parent} is in use by pid {pid} on {host} since {holder.get('started')} "
                f"(`{holder.get('command')}`); if that run is gone, delete {self.path}"
            )
        if alive(pid) and pid != os.getpid():
            raise UsageError(
                f"{self.path.parent} is in use by a run still going (pid {pid}, since "
                f"{holder.get('started')}: `{holder.get('command')}`); wait for it, stop it, or pass another --out "
                f"(if that pid now belongs to another program, delete {self.path})"
            )
        return f"left by an earlier run (pid {pid}, no longer running)"

    def release(self) -> None:
        """Remove the lock if it is still this process's own (never one another process took over)."""
        if self.held:
            try:
                if self.path.read_bytes() == self._mine:
                    self.path.unlink(missing_ok=True)
            except OSError:
                pass
            self.held = False

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
