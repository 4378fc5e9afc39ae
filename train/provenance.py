"""Where and by what a run was made: the processor, device and threads, the package versions, and
the code's version (a hash of every source file), recorded in each result and compared on resume."""

from __future__ import annotations

import functools
import hashlib
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]  # the project: its scripts and packages


def processor_name() -> str:
    """The CPU's brand string: same seed, same numbers holds only on the same processor type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device) -> dict:
    out = {"device": str(device), "processor": processor_name(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def device_name(device) -> str:
    if device.type != "cuda":
        n = torch.get_num_threads()
        return f"{device} ({processor_name()}, {n} thread{'s' if n != 1 else ''})"
    return f"{device} ({torch.cuda.get_device_name(device)})"


def source_files(root: Path) -> list[Path]:
    """The project's own sources: the top-level scripts and every package below them, in any folder
    (the tests excluded: they run no study)."""
    files = list(root.glob("*.py"))
    for package in root.iterdir():
        if package.name != "tests" and (package / "__init__.py").is_file():
            files += package.rglob("*.py")
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def sources_hash(root: Path, files: list[Path]) -> str:
    """16 hex digits of a SHA-256 over each file's path (a move is a change) and bytes."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """The code that runs: a hash of the project's own sources (source_files; what a resume
    compares), and in a git checkout the commit and whether those sources differ from it."""
    files = source_files(ROOT)
    out = {"sources": sources_hash(ROOT, files), "commit": None, "dirty": None}
    git = ["git", "-C", str(ROOT)]
    try:
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            out["commit"] = head.stdout.strip()
            st = subprocess.run(
                [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
            )
            if st.returncode == 0:  # "dirty": a tracked source differs from the commit
                changed = {line[3:].strip() for line in st.stdout.splitlines()}
                out["dirty"] = any(f.relative_to(ROOT).as_posix() in changed for f in files)
    except (OSError, subprocess.TimeoutExpired):
        pass
    return out


def describe_code(code: dict | None) -> str:
    """One code version in words: "sources 1a2b… (commit 3c4d5e6, edited)"."""
    if not code:
        return "unknown code (made before versions were recorded)"
    commit = code.get("commit")
    return f"sources {code['sources']}" + (
        f" (commit {commit[:7]}{', edited' if code.get('dirty') else ''})" if commit else ""
    )


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "scikit-learn", "numpy", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out
