"""What both command lines share: argparse types, the common flags (preset overrides among them), the
typed settings a parsed command line becomes (run/settings.py; the namespace stops here and in the
entries), and main()'s one-line errors with their exit codes (the exceptions are in train/stop.py)."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from pathlib import Path

from protocols import preset_help, resolve
from run.settings import Data, Execution, Run, Settings, Training, flat, record, validate_common, with_threads
from train.stop import STOP, STOP_SIGNALS, Interrupted, JobsFailed, NonFiniteLoss, UsageError

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


# flag dest -> (type, help with {} for the value under each protocol): the flags that override a field
# of the same name of the protocol's preset; a script offers those its presets have, the shared ones
# (loss weights, weight decay, clipping) in both scripts. None on the command line keeps the preset's.
PRESET_FLAG_HELP = {
    "lm_weight": (non_negative_float, "weight of the LM loss in the dual variants (preset: {})"),
    "sent_weight": (
        non_negative_float,
        "weight of the sentiment loss in the dual variants (preset: {}); Model 1's loss is CE alone",
    ),
    "weight_decay": (non_negative_float, "decoupled (AdamW) weight decay; 0 is Adam's update (preset: {})"),
    "warmup_ratio": (
        unit_interval,
        "fraction of all optimizer steps with linear warm-up, then cosine decay (preset: {})",
    ),
    "clip_norm": (non_negative_float, "gradient-norm clipping, 0 = none (preset: {})"),
}


def add_preset_flags(group, presets: dict, dests: tuple[str, ...]) -> None:
    """--lm-weight, --weight-decay ...: one flag per preset field, each defined once here."""
    for dest in dests:
        kind, text = PRESET_FLAG_HELP[dest]
        group.add_argument(
            "--" + dest.replace("_", "-"), type=kind, default=None, help=text.format(preset_help(presets, dest))
        )


def preset_of(args, presets: dict, flag_fields: dict[str, str]) -> tuple[object, dict]:
    """The resolved preset and its overrides (protocols.resolve) for this command line."""
    flags = {field: getattr(args, dest) for dest, field in flag_fields.items()}
    return resolve(presets, args.protocol, args.rung, args.set, flags)


def parse_with_preset(parser, argv, presets: dict, flag_fields: dict[str, str], fill=None):
    """parser.parse_args, then the preset flags left unset given the chosen preset's values (`fill`:
    those; default all of flag_fields); a bad --set is the parser's own one-line error (exit status 2).
    A script records the flags it fills in metrics.json's config, so a flag added to a script later
    is not filled: run.json files written before it lack it, and a resume compares them."""
    args = parser.parse_args(argv)
    try:
        preset, _ = preset_of(args, presets, flag_fields)
    except ValueError as e:
        parser.error(str(e))
    for dest in flag_fields if fill is None else fill:
        if getattr(args, dest) is None:
            setattr(args, dest, getattr(preset, flag_fields[dest]))
    return args


def settings_from(args, presets: dict, flag_fields: dict[str, str], model, extra=(), fill=None) -> Settings:
    """The typed, validated settings of a parsed command line (parse_with_preset's), and their record
    (`config`): every flag with its value as the namespace holds it, built from the settings."""
    preset, overrides = preset_of(args, presets, flag_fields)
    run = Run(
        protocol=args.protocol,
        set=tuple(args.set),
        ladder=args.ladder,
        rung=args.rung,
        seeds=tuple(args.seeds),
        variants=tuple(args.variants),
        out=args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        compare=args.compare,
        status=args.status,
        report_only=args.report_only,
        job=args.job,
    )
    execution = Execution(
        device=args.device,
        threads=args.threads,
        executor=args.executor,
        jobs=args.jobs,
        slurm_partition=args.slurm_partition,
        slurm_time=args.slurm_time,
        slurm_gpus=args.slurm_gpus,
        slurm_cpus=args.slurm_cpus,
        slurm_extra=tuple(args.slurm_extra),
    )
    data = Data(args.data_dir, args.max_train, args.max_eval, tuple(args.extra_eval))
    training = Training(args.epochs, args.lr, args.no_progress, args.report_to, args.log_steps)
    s = Settings(run, execution, data, training, preset, overrides, model, tuple(extra))
    validate_common(s)
    s = dataclasses.replace(s, execution=with_threads(s.execution))
    # a preset flag parse_with_preset does not fill (one added to the script later) is recorded only when given
    filled = flag_fields if fill is None else fill
    given = {d: getattr(preset, f) for d, f in flag_fields.items() if d in filled or getattr(args, d) is not None}
    values = flat(run, s.execution, data, training, model, *extra, given)
    order = tuple(k for k in vars(args) if k in values)
    return dataclasses.replace(s, config=record(values, order))


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
