"""The typed settings a command line becomes (run/cli.py builds them, the entries pass them down):
what to run, where the jobs run, which data, how to train, and the small model's sizes. Frozen:
nothing below the entries changes a setting after parsing; a derived value is a
dataclasses.replace. Each default here is its flag's default (the protocol's preset holds the
rest: batch size, loss weights, optimiser)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

from models import VARIANTS
from train.stop import UsageError


@dataclass(frozen=True)
class Run:
    """What to run, and what to do with it: the grid (seeds x variants), its folder, and the mode."""

    protocol: str = "written"
    set: tuple[str, ...] = ()  # --set FIELD=VALUE items, as typed
    ladder: bool = False
    rung: str | None = None
    seeds: tuple[int, ...] = (42,)
    variants: tuple[str, ...] = field(default_factory=lambda: tuple(VARIANTS))  # the table, when asked
    out: Path | None = None  # None: the protocol's default folder
    resume: bool = False
    overwrite: bool = False
    compare: Path | None = None  # the other protocol's metrics.json for the report
    status: bool = False
    report_only: bool = False
    job: str | None = None  # SEED:VARIANT, the one job of the grid an executor starts


@dataclass(frozen=True)
class Execution:
    """Where and how the jobs run: this process, local processes, or a Slurm array."""

    device: str = "auto"
    threads: int | None = None  # torch's CPU threads; with --executor local, cores // --jobs
    executor: str = "serial"
    jobs: int | None = None
    slurm_partition: str | None = None
    slurm_time: int | None = None  # minutes
    slurm_gpus: int = 0
    slurm_cpus: int | None = None
    slurm_extra: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Data:
    data_dir: Path | None = None  # None: the hub's stanfordnlp/sst2
    max_train: int | None = None
    max_eval: int | None = None
    extra_eval: tuple[str, ...] = ()  # NAME=PATH items


@dataclass(frozen=True)
class Training:
    """The loop's own settings; the optimiser and batches are the preset's."""

    epochs: int
    lr: float
    no_progress: bool = False
    report_to: str = "none"
    log_steps: int = 50


@dataclass(frozen=True)
class SmallModel:
    """The small transformer's sizes (models.SmallConfig takes them with the preset's architecture)."""

    max_len: int = 64
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1
    engram_dim: int = 32
    impl: str = "packed"


@dataclass(frozen=True)
class Settings:
    """One command line, typed. `preset` is the protocol's preset with every override applied;
    `overrides` what differs from the named protocol; `model` the script's own (SmallModel, or
    qlora.settings.CausalLM); `extra` any other settings of one script (the dry run, the small
    results). `config` is the command line's record for metrics.json and checkpoints/run.json (a
    resume compares it): every flag with its value, Paths as text, lists as lists."""

    run: Run
    execution: Execution
    data: Data
    training: Training
    preset: object
    overrides: dict
    model: object
    extra: tuple = ()
    config: dict | None = None

    def part(self, kind):
        """The one setting of `extra` of this type."""
        (found,) = [x for x in self.extra if isinstance(x, kind)]
        return found


def flat(*parts) -> dict:
    """Every field of these settings by name (a dataclass's fields; a dict's items)."""
    out = {}
    for part in parts:
        if is_dataclass(part):
            out.update({f.name: getattr(part, f.name) for f in fields(part)})
        else:
            out.update(part)
    return out


def record(values: dict, order: tuple[str, ...]) -> dict:
    """The config metrics.json and run.json keep, in the command line's order: Paths as text and
    tuples as lists, as argparse held them (a resume compares it with run.json files written then)."""
    missing = set(values) ^ set(order)
    if missing:
        raise ValueError(f"the settings and the command line disagree on {sorted(missing)}")
    return {
        k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v for k in order for v in [values[k]]
    }


@dataclass(frozen=True)
class CrossScale:
    """experiment_7b.py's report: the small experiment's metrics.json for the cross-scale tables."""

    small_results: Path = Path("results/metrics.json")


# ----------------------------------------------------------------------------- checks and places


def other_protocol_metrics(run: Run, out: str) -> Path | None:
    """Where the other protocol's metrics.json is looked for: --compare, else beside this run's
    folder as default_out lays them out (OUT and OUT/published); None when --out names a folder
    outside that layout, so that an unrelated run is never compared."""
    if run.compare is not None:
        return run.compare
    if run.out is None:
        base = Path(out)
    elif run.protocol == "written":
        base = Path(run.out)
    elif Path(run.out).name == run.protocol:
        base = Path(run.out).parent
    else:
        return None
    return default_out(base, "published" if run.protocol == "written" else "written") / "metrics.json"


def validate_common(s: Settings) -> None:
    if s.preset.batch_size < 2:
        raise UsageError(
            f"--batch-size {s.preset.batch_size} is too small: "
            "dual_engram splits each batch into two halves, so it needs at least 2"
        )
    run = s.run
    if len(set(run.seeds)) != len(run.seeds):
        raise UsageError(f"--seeds repeats a seed: {list(run.seeds)}")
    if len(set(run.variants)) != len(run.variants):
        raise UsageError(f"--variants repeats a variant: {list(run.variants)}")
    validate_execution(run, s.execution)


def validate_execution(run: Run, x: Execution) -> None:
    """The executor's settings, against what the run asks for."""
    if x.executor == "slurm" and x.slurm_time is None and not (run.status or run.report_only):
        raise UsageError(
            "--executor slurm needs --slurm-time MINUTES: Slurm's and submitit's default limits are minutes "
            "and would stop a job long before it ends"
        )
    if (x.jobs or 1) > 1 and x.executor == "serial":
        raise UsageError(f"--jobs {x.jobs} needs --executor local or slurm (serial runs one job at a time)")
    if run.ladder and run.rung:
        raise UsageError(
            f"--ladder runs every rung itself; drop --rung {run.rung} (or drop --ladder to run that one rung)"
        )
    if run.overwrite and run.resume:
        raise UsageError("--overwrite starts over and --resume continues: pass one of them")


def with_threads(x: Execution) -> Execution:
    """The threads each job gets: with --executor local and no --threads, cores // --jobs."""
    if x.executor == "local" and x.threads is None:
        return dataclasses.replace(x, threads=max(1, (os.cpu_count() or 1) // (x.jobs or 1)))
    return x


def default_out(out: str, protocol: str) -> Path:
    """results/ for the written protocol, results/<protocol>/ for any other."""
    return Path(out) if protocol == "written" else Path(out) / protocol


def resolve_device(name: str):
    """The torch device for --device auto|cpu|cuda; cuda without a GPU is a one-line error."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)
