"""Ask a finished run's models about new sentences: per sentence and variant, the predicted label
and its probability, and for Model 3 its engram and the K-Means cluster of the run's validation
engrams it falls in (the work is in prediction.py).

    python predict.py results/models/written "a gripping , funny film" "dull and far too long"
    python predict.py RUN_DIR --file sentences.txt --json       # one JSON object a line
    echo "a small gem" | python predict.py RUN_DIR              # or from standard input
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models import VARIANTS
from run.cli import cli_main, positive_int, seed_int
from run.settings import resolve_device


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="predict.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run", type=Path, help="the output folder of a finished run (its checkpoints/ hold the weights)")
    p.add_argument("sentences", nargs="*", help="sentences to classify (default: --file, else standard input)")
    p.add_argument("--file", type=Path, default=None, help="a text file with one sentence a line")
    p.add_argument("--json", action="store_true", help="one JSON object a line (per sentence and variant)")
    p.add_argument(
        "--weights",
        choices=("best", "final"),
        default="best",
        help="the epoch validation selected (the report's best numbers), or the last epoch",
    )
    p.add_argument("--seed", type=seed_int, default=None, help="which seed's models (default: the first with weights)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), metavar="VARIANT")
    p.add_argument(
        "--model",
        default=None,
        help="causal-LM runs: the base model to load the adapter on (default: the one the run names)",
    )
    p.add_argument("--cache-dir", type=Path, default=None, help="causal-LM runs: where a .gguf base is dequantised to")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="where to run the models")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    return p.parse_intermixed_args(argv)  # sentences before or after the options


def run(args, argv):
    import torch

    from run.prediction import predict, read_sentences

    sentences = read_sentences(args.sentences, args.file, sys.stdin)
    if args.threads:
        torch.set_num_threads(args.threads)
    return predict(
        args.run,
        sentences,
        which=args.weights,
        seed=args.seed,
        variants=args.variants,
        model=args.model,
        cache_dir=args.cache_dir,
        device=resolve_device(args.device),
        as_json=args.json,
    )


def main(argv=None):
    return cli_main(parse_args, run, argv)


if __name__ == "__main__":
    main()
