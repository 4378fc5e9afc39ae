"""What both command lines share: argparse types, the common flags, and main()'s one-line errors
with their exit codes (the exceptions and the stop request live in train/stop.py)."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path

from train.stop import STOP, STOP_SIGNALS, Interrupted, JobsFailed, NonFiniteLoss, UsageError


def continue_command(command: str, executor: str = "serial") -> str:
    """The command that continues a run: the same command line, less --report-only (a rewrite
    trains nothing) and --overwrite (it would delete what has finished since), with --resume for a
    serial run (a grid under an executor always continues its folder)."""
    words = [w for w in shlex.split(command) if w not in ("--report-only", "--overwrite")]
    if executor == "serial" and "--resume" not in words:
        words.append("--resume")
    return shlex.join(words)


# ----------------------------------------------------------------------------- argparse types


def positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


def positive_float(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def non_negative_float(text: str) -> float:
    v = float(text)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return v


def unit_interval(text: str) -> float:
    v = float(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return v


def seed_int(text: str) -> int:
    """A seed NumPy and torch both accept: 0 <= seed < 2**32."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32), got {text}") from None
    if not 0 <= v < 2**32:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32), got {text}")
    return v


# ----------------------------------------------------------------------------- the shared flags


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults once: not for None (such a flag takes its value from the protocol's preset,
    which its help text names), nor where the help text already says its default in words."""

    def _get_help_string(self, action):
        if action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def base_parser(
    prog: str,
    description: str,
    *,
    epochs: int,
    batch_size: str,
    lr: float,
    out: str,
    protocols: tuple[str, ...],
    variants: tuple[str, ...],
    slurm_gpus: int,
    rungs: tuple[str, ...],
) -> argparse.ArgumentParser:
    """A parser with the flags both experiments share, grouped as the help shows them, with the
    given scale's defaults. Unknown flags are errors (argparse exits with status 2). Settings a
    protocol fixes default to None here and are filled from the preset (see protocols.py)."""
    # allow_abbrev=False: `--proto published` is an error, not --protocol (the ladder rewrites flags by name)
    p = argparse.ArgumentParser(
        prog=prog,
        description=description + " Defaults are the study's settings.",
        formatter_class=HelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument(
        "--protocol",
        choices=protocols,
        default=protocols[0],
        help="written: the system the study's write-up describes; published: the study's code as it was "
        "run (see README, 'As written vs as run'). Explicit flags override the preset",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override any field of the protocol's preset (protocols.py), e.g. --set causal=false; repeatable",
    )
    p.add_argument(
        "--ladder",
        action="store_true",
        help="from --protocol, one run per difference between the two readings, each the base with that one "
        "difference switched to the other protocol, plus both ends, in OUT/ladder/<rung>/; then "
        "OUT/ladder/LADDER.md (see README, 'Which difference does what')",
    )
    p.add_argument(
        "--rung",
        choices=rungs,
        default=None,
        help="one rung of the ladder: the protocol's preset with that difference switched to the other protocol "
        "(base: none; other: all)",
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder with GLUE-layout train.tsv and dev.tsv (header sentence<TAB>label); "
        "default: download stanfordnlp/sst2 from the Hugging Face hub",
    )
    d.add_argument(
        "--max-train",
        type=positive_int,
        default=None,
        help="use only the first N training rows (examples; marks the run as shortened)",
    )
    d.add_argument(
        "--max-eval",
        type=positive_int,
        default=None,
        help="use only the first N validation rows (examples; marks the run as shortened)",
    )
    d.add_argument(
        "--extra-eval",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also evaluate on this labeled TSV after every epoch (repeatable)",
    )
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=positive_int, default=epochs, help="passes over the training set")
    t.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help=f"examples per forward batch (preset: {batch_size}); dual_engram splits each into two halves",
    )
    t.add_argument(
        "--lr", type=positive_float, default=lr, help="learning rate (the peak, where the protocol has a schedule)"
    )
    t.add_argument(
        "--seeds",
        type=seed_int,
        nargs="+",
        default=[42],
        metavar="SEED",
        help="train every variant once per seed, each in [0, 2**32) (default: 42)",
    )
    t.add_argument(
        "--variants",
        nargs="+",
        choices=variants,
        default=list(variants),
        metavar="VARIANT",
        help=f"train only these variants ({', '.join(variants)}; default: all three); hypotheses that need "
        "a missing variant are reported as not run",
    )
    t.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to train (default auto: cuda if present)",
    )
    t.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for torch (default: torch's choice; with --executor local, cores // --jobs)",
    )
    o = p.add_argument_group("output")
    o.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output folder (default {out}/, or {out}/published/ with --protocol published)",
    )
    o.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoints in OUT/checkpoints: finished variants are skipped, "
        "the one in progress restarts after its last complete epoch",
    )
    o.add_argument(
        "--overwrite",
        action="store_true",
        help="a fresh run (no --resume) over a folder with finished jobs deletes their results; without this "
        "flag it is refused",
    )
    o.add_argument("--no-progress", action="store_true", help="no progress bars (one log line per epoch remains)")
    o.add_argument(
        "--compare",
        type=Path,
        default=None,
        metavar="METRICS_JSON",
        help=f"metrics.json of this scale's run under the other protocol, for the report's 'As written vs as run' "
        f"tables (default: OUT/published/metrics.json for a written run, and for a published run in "
        f"OUT/published, OUT/metrics.json; OUT defaults to {out}; skipped if absent or of another model)",
    )
    x = p.add_argument_group("execution: a run is a grid of jobs, one per (seed, variant)")
    x.add_argument(
        "--executor",
        choices=("serial", "local", "slurm"),
        default="serial",
        help="serial: every job in turn in this process; local: --jobs at once on this machine (submitit); "
        "slurm: one Slurm job array (submitit). Rerunning a local or slurm command submits only the jobs "
        "without a result",
    )
    x.add_argument(
        "--jobs",
        type=positive_int,
        default=None,
        help="jobs at once (local: processes on this machine, at most one per GPU, default 1; slurm: the "
        "array's parallelism, default the whole grid)",
    )
    x.add_argument(
        "--status",
        action="store_true",
        help="print the grid's jobs (finished, running, pending, failed, not started) and exit; starts nothing",
    )
    x.add_argument(
        "--report-only", action="store_true", help="rewrite every output from the finished jobs; trains nothing"
    )
    x.add_argument("--slurm-partition", default=None, help="Slurm partition (default: the cluster's default)")
    x.add_argument(
        "--slurm-time",
        type=positive_int,
        default=None,
        metavar="MINUTES",
        help="time limit of each job in minutes (required with --executor slurm); a job stopped at its limit "
        "checkpoints mid-epoch and is requeued",
    )
    x.add_argument("--slurm-gpus", type=int, default=slurm_gpus, help="GPUs per job")
    x.add_argument("--slurm-cpus", type=positive_int, default=None, help="CPUs per job (default: Slurm's)")
    x.add_argument(
        "--slurm-extra",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another sbatch option, e.g. --slurm-extra account=myproject (repeatable)",
    )
    x.add_argument(
        "--job", default=None, help=argparse.SUPPRESS
    )  # SEED:VARIANT: run one job of the grid (what an executor starts)
    return p


def add_logging_arguments(p) -> None:
    g = p.add_argument_group("logging")
    g.add_argument(
        "--report-to",
        choices=("none", "tensorboard"),
        default="none",
        help="tensorboard: write each job's training curves to OUT/tensorboard/<seed>/<variant>/ "
        "(needs the optional tensorboard package: pip install tensorboard)",
    )
    g.add_argument(
        "--log-steps",
        type=positive_int,
        default=50,
        help="with --report-to tensorboard: training losses and learning rate every this many batches",
    )


def default_out(out: str, protocol: str) -> Path:
    """results/ for the written protocol, results/<protocol>/ for any other."""
    return Path(out) if protocol == "written" else Path(out) / protocol


def other_protocol_metrics(args, out: str) -> Path | None:
    """Where the other protocol's metrics.json is looked for: --compare, else beside this run's
    folder as default_out lays them out (OUT and OUT/published); None when --out names a folder
    outside that layout, so that an unrelated run is never compared."""
    if args.compare is not None:
        return args.compare
    if args.out is None:
        base = Path(out)
    elif args.protocol == "written":
        base = Path(args.out)
    elif Path(args.out).name == args.protocol:
        base = Path(args.out).parent
    else:
        return None
    return default_out(base, "published" if args.protocol == "written" else "written") / "metrics.json"


def validate_common(args) -> None:
    if args.batch_size < 2:
        raise UsageError(
            f"--batch-size {args.batch_size} is too small: "
            "dual_engram splits each batch into two halves, so it needs at least 2"
        )
    if len(set(args.seeds)) != len(args.seeds):
        raise UsageError(f"--seeds repeats a seed: {args.seeds}")
    if len(set(args.variants)) != len(args.variants):
        raise UsageError(f"--variants repeats a variant: {args.variants}")
    validate_execution(args)


def validate_execution(args) -> None:
    """The executor's settings, and the threads each job gets: cores // --jobs on this machine."""
    import os

    if args.executor == "slurm" and args.slurm_time is None and not (args.status or args.report_only):
        raise UsageError(
            "--executor slurm needs --slurm-time MINUTES: Slurm's and submitit's default limits are minutes "
            "and would stop a job long before it ends"
        )
    if (args.jobs or 1) > 1 and args.executor == "serial":
        raise UsageError(f"--jobs {args.jobs} needs --executor local or slurm (serial runs one job at a time)")
    if args.ladder and args.rung:
        raise UsageError(
            f"--ladder runs every rung itself; drop --rung {args.rung} (or drop --ladder to run that one rung)"
        )
    if args.overwrite and args.resume:
        raise UsageError("--overwrite starts over and --resume continues: pass one of them")
    if args.executor == "local" and args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // (args.jobs or 1))


_DEPTH = [0]  # cli_main calls in progress: the ladder runs each rung through main() inside its own


def cli_main(parse_args, run, argv=None):
    """Parse, run, and turn bad input into one line on stderr and exit status 2, and a stop
    request into one line and exit status 128 + signal (130 for SIGINT, 143 for SIGTERM). Only the
    outermost call installs the signal handlers and clears the stop request: a signal that lands
    between two rungs of a ladder (each a nested call) is kept, not dropped."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    outer = _DEPTH[0] == 0
    previous = {}
    if outer:
        STOP.signum = None
        try:
            for sig in STOP_SIGNALS:
                previous[sig] = signal.signal(sig, STOP.handler)
        except ValueError:  # not the main thread (e.g. a test runner's worker): no handlers
            previous = {}
    _DEPTH[0] += 1
    try:
        return run(args, argv)
    except (UsageError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except JobsFailed as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
    except Interrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        raise SystemExit(128 + e.signum)
    finally:
        _DEPTH[0] -= 1
        if outer:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            STOP.signum = None


def resolve_device(name: str):
    """The torch device for --device auto|cpu|cuda; cuda without a GPU is a one-line error."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)
