"""Experiment 1: three ~1.3 M-parameter transformers trained from scratch on SST-2.

    python experiment.py --data-dir ../shared/data/sst2      # the study, offline
    python experiment.py --help                              # every setting, with units
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict

import torch

import reporting as rep
from models import SmallConfig, build_small_model
from training import (Built, Encoded, Recipe, UsageError, base_parser, check_writable, cli_main,
                      load_sst2, parse_extra_eval, positive_int, resolve_device, unit_interval,
                      validate_common)

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
PAD, UNK, BOS, EOS = range(4)
STUDY = {
    "deltas": {"H1": 0.69, "H2": -1.61},  # as the study states them (from unrounded accuracies)
    "best": {"sentiment_only": 80.28, "dual_head": 80.96, "dual_engram": 79.36},
    "final": {"sentiment_only": 79.82, "dual_head": 80.96, "dual_engram": 79.36},
    "engram": {"ari": 0.236, "cluster_accuracy": 74.3},
    "minutes_gpu": 30,
}
DEFAULT_EPOCHS = 8


# ----------------------------------------------------------------------------- vocabulary


class Vocab:
    """Word-level vocabulary of the training split: the specials, then the most frequent words
    (ties broken alphabetically, so the vocabulary is a pure function of the data)."""

    def __init__(self, words: list[str]):
        self.itos = list(SPECIALS) + words
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, sentences: list[str], max_words: int) -> "Vocab":
        counts = Counter(w for s in sentences for w in s.split())
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return cls([w for w, _ in ranked[:max_words]])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, sentence: str, max_len: int) -> list[int]:
        """<bos> w1 ... wn <eos>, truncated at max_len tokens."""
        return ([BOS] + [self.stoi.get(w, UNK) for w in sentence.split()] + [EOS])[:max_len]


# ----------------------------------------------------------------------------- CLI


def parse_args(argv):
    p = base_parser("experiment.py", "Experiment 1 of the study: sentiment_only, dual_head and dual_engram small "
                    "transformers trained from scratch on SST-2.", epochs=DEFAULT_EPOCHS, batch_size=64, lr=3e-4, out="results")
    m = p.add_argument_group("model")
    m.add_argument("--vocab-words", type=positive_int, default=7000, help="most frequent training words kept (plus 4 specials)")
    m.add_argument("--max-len", type=positive_int, default=64, help="tokens per sentence, <bos> and <eos> included")
    m.add_argument("--d-model", type=positive_int, default=128, help="embedding and hidden width")
    m.add_argument("--layers", type=positive_int, default=2, help="transformer blocks")
    m.add_argument("--heads", type=positive_int, default=4, help="attention heads")
    m.add_argument("--d-ff", type=positive_int, default=512, help="feed-forward width")
    m.add_argument("--dropout", type=unit_interval, default=0.1, help="dropout probability")
    m.add_argument("--engram-dim", type=positive_int, default=32, help="engram width")
    m.add_argument("--impl", choices=("packed", "padded"), default="packed",
                   help="packed: per-token layers on real tokens only; padded: the naive reference (same function, slower)")
    m.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch (default: torch's choice)")
    return p.parse_args(argv)


def validate(args) -> None:
    validate_common(args)
    if args.d_model % args.heads:
        raise UsageError(f"--d-model {args.d_model} is not divisible by --heads {args.heads}")
    if args.max_len < 2:
        raise UsageError("--max-len must be at least 2 (<bos> and <eos>)")


# ----------------------------------------------------------------------------- the run


def small_report(m: dict) -> str:
    lines = rep.report_header(m, "Experiment 1: small transformers from scratch on SST-2")
    lines += ["## Validation accuracy (%)", "", *rep.accuracy_table(m), *rep.per_seed_table(m)]
    lines += rep.hypothesis_section(m)
    lines += rep.engram_section(m, {"ari": STUDY["engram"]["ari"], "cluster_accuracy": STUDY["engram"]["cluster_accuracy"]})
    lines += rep.probe_section(m)
    lines += rep.summary_section(m)
    lines += ["## Figures", "", "![learning curves](learning_curves.png)", "", "![engram clusters](engram_clusters.png)", ""]
    lines += rep.history_section(m)
    return "\n".join(lines)


def main(argv=None) -> dict:
    return cli_main(parse_args, run, argv)


def run(args, argv) -> dict:
    validate(args)
    out = check_writable(args.out)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_sst2(args.data_dir)
    extra = parse_extra_eval(args.extra_eval)
    train_split = data["train"].head(args.max_train)
    val_split = data["validation"].head(args.max_eval)
    vocab = Vocab.build(train_split.sentences, args.vocab_words)
    cfg = SmallConfig(vocab_size=len(vocab), max_len=args.max_len, d_model=args.d_model, n_layers=args.layers,
                      n_heads=args.heads, d_ff=args.d_ff, dropout=args.dropout, engram_dim=args.engram_dim, impl=args.impl)

    def encode(split) -> Encoded:
        return Encoded([vocab.encode(s, cfg.max_len) for s in split.sentences], split.labels, PAD)

    train = encode(train_split)
    evals = {"validation": encode(val_split), **{k: encode(v) for k, v in extra.items()}}

    def build(variant: str, seed: int, total_steps: int) -> Built:
        model = build_small_model(variant, cfg).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=True)
        return Built(model, opt, info={"config": asdict(cfg)})

    recipe = Recipe("small", build, args.batch_size, args.epochs, device, progress=not args.no_progress)
    header = {
        **rep.run_header("small", "experiment.py", argv, args, DEFAULT_EPOCHS),
        "model_config": asdict(cfg),
        "versions": rep.versions(),
        "device": rep.device_name(device),
        "threads": torch.get_num_threads(),
        "seeds": args.seeds,
        "data": {"train": len(train), "validation": len(evals["validation"]), "vocab_size": len(vocab),
                 **rep.data_source(args, extra)},
    }
    panels = [("training accuracy (%)", [("train_acc", "train")]), ("validation accuracy (%)", [("val_acc", "val")])]
    print(f"small experiment: {len(train):,} train / {len(evals['validation']):,} validation rows, vocabulary "
          f"{len(vocab):,}, device {device}, seeds {args.seeds}")
    return rep.run_and_report(recipe, args, train, evals, out, header, STUDY, panels, small_report)


if __name__ == "__main__":
    main()
