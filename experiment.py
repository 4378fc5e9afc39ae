"""Experiment 1: three ~1.3 M-parameter transformers trained from scratch on SST-2.

python experiment.py                          # the study as written; downloads SST-2 from the hub
python experiment.py --data-dir DIR           # offline, from GLUE-layout train.tsv / dev.tsv
python experiment.py --help                   # every setting, with units
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from analysis import reporting as rep
from analysis.controls import PROBE_FOLDS
from analysis.metrics import data_source, run_header
from models import VARIANTS, SmallConfig, build_small_model
from protocols import SMALL, SMALL_STUDY, ladder_names, parse_with_preset, preset_help, resolve
from run.cli import (
    add_logging_arguments,
    base_parser,
    cli_main,
    default_out,
    non_negative_float,
    other_protocol_metrics,
    positive_int,
    resolve_device,
    unit_interval,
    validate_common,
)
from run.study import before_data, read_metrics, run_and_report
from train.data import Encoded, Vocab, check_analysable, load_sst2, parse_extra_eval
from train.files import check_writable
from train.loop import Built, Recipe
from train.provenance import device_name, machine, versions
from train.stop import UsageError
from train.tensorboard_log import tensorboard_root
from train.weights import WeightSpec

DEFAULT_EPOCHS = 8
OUT = "results"
# flag dest -> the preset field it overrides (None on the command line keeps the preset's value)
PRESET_FLAGS = {
    "vocab_words": "vocab_words",
    "d_ff": "d_ff",
    "batch_size": "batch_size",
    "weight_decay": "weight_decay",
    "clip_norm": "clip_norm",
    "lm_weight": "lm_weight",
    "sent_weight": "sent_weight",
}


def parse_args(argv):
    p = base_parser(
        "experiment.py",
        "Experiment 1 of the study: sentiment_only, dual_head and dual_engram small "
        "transformers trained from scratch on SST-2.",
        epochs=DEFAULT_EPOCHS,
        batch_size=preset_help(SMALL, "batch_size"),
        lr=3e-4,
        out=OUT,
        protocols=tuple(SMALL),
        variants=VARIANTS,
        rungs=ladder_names(SMALL),
        slurm_gpus=0,
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--vocab-words",
        type=positive_int,
        default=None,
        help="most frequent training words kept after the special tokens (words; preset: "
        + preset_help(SMALL, "vocab_words")
        + ")",
    )
    m.add_argument("--max-len", type=positive_int, default=64, help="tokens per sentence, specials included")
    m.add_argument("--d-model", type=positive_int, default=128, help="embedding and hidden width")
    m.add_argument("--layers", type=positive_int, default=2, help="transformer blocks")
    m.add_argument("--heads", type=positive_int, default=4, help="attention heads")
    m.add_argument(
        "--d-ff",
        type=positive_int,
        default=None,
        help="feed-forward width (preset: " + preset_help(SMALL, "d_ff") + ")",
    )
    m.add_argument("--dropout", type=unit_interval, default=0.1, help="dropout probability")
    m.add_argument("--engram-dim", type=positive_int, default=32, help="engram width")
    m.add_argument(
        "--impl",
        choices=("packed", "padded"),
        default="packed",
        help="packed: per-token layers on real tokens only; padded: the naive reference (same function, slower)",
    )
    o = p.add_argument_group("loss and optimiser (default: the protocol's preset)")
    o.add_argument(
        "--lm-weight",
        type=non_negative_float,
        default=None,
        help="weight of the LM loss in the dual variants (preset: " + preset_help(SMALL, "lm_weight") + ")",
    )
    o.add_argument(
        "--sent-weight",
        type=non_negative_float,
        default=None,
        help="weight of the sentiment loss in the dual variants (preset: "
        + preset_help(SMALL, "sent_weight")
        + "); Model 1's loss is CE alone",
    )
    o.add_argument(
        "--weight-decay",
        type=non_negative_float,
        default=None,
        help="decoupled (AdamW) weight decay; 0 is Adam (preset: " + preset_help(SMALL, "weight_decay") + ")",
    )
    o.add_argument(
        "--clip-norm",
        type=non_negative_float,
        default=None,
        help="gradient-norm clipping, 0 = none (preset: " + preset_help(SMALL, "clip_norm") + ")",
    )
    add_logging_arguments(p)
    return parse_with_preset(p, argv, SMALL, PRESET_FLAGS)


def validate(args) -> None:
    validate_common(args)
    if args.d_model % args.heads:
        raise UsageError(f"--d-model {args.d_model} is not divisible by --heads {args.heads}")
    if args.max_len < 2:
        raise UsageError("--max-len must be at least 2")


# ----------------------------------------------------------------------------- the run


def small_report(m: dict, other: dict | None = None) -> str:
    lines = rep.report_header(m, "Experiment 1: small transformers from scratch on SST-2")
    lines += ["## Validation accuracy (%)", "", *rep.accuracy_table(m), *rep.per_seed_table(m)]
    lines += rep.hypothesis_section(m)
    lines += rep.extra_section(m)
    lines += rep.engram_section(m, SMALL_STUDY["engram"])
    lines += rep.rank_section(m)
    lines += rep.probe_section(m)
    lines += rep.summary_section(m)
    lines += rep.protocols_section(m, other)
    lines += [
        "## Figures",
        "",
        "![learning curves](learning_curves.png)",
        "",
        "![engram clusters](engram_clusters.png)",
        "",
    ]
    lines += rep.history_section(m)
    return "\n".join(lines)


def main(argv=None) -> dict:
    return cli_main(parse_args, run, argv)


def small_config(preset, **sizes) -> SmallConfig:
    """The model config a protocol's preset gives, with the sizes (vocab_size, d_model ...) given."""
    arch = {
        f: getattr(preset, f)
        for f in (
            "d_ff",
            "causal",
            "norm_first",
            "final_norm",
            "positions",
            "ff_dropout",
            "init",
            "head",
            "head_width",
            "engram_injection",
        )
    }
    return SmallConfig(**arch, **sizes)


def small_vocab(preset, sentences) -> Vocab:
    return Vocab.build(
        sentences, len(preset.specials) + preset.vocab_words, preset.specials, preset.bos_eos, preset.vocab_ties
    )


def small_weights(preset, cfg: SmallConfig, vocab: Vocab) -> WeightSpec:
    """What each job keeps beside its weights (weights.py): the model's config and loss weights, how
    the protocol evaluates (its batch size and engram mode), and the vocabulary; fp16 where that
    changes no validation prediction."""
    config = {
        "model_config": asdict(cfg),
        "sent_weight": preset.sent_weight,
        "lm_weight": preset.lm_weight,
        "protocol": preset.name,
        "batch_size": preset.batch_size,
        "eval_mode": preset.engram_mode,
    }
    words = {"itos": vocab.itos, "specials": list(preset.specials), "bos_eos": preset.bos_eos}
    return WeightSpec("small", config, words, half=True)


def make_builder(args, preset, cfg: SmallConfig, device):
    def build(variant: str, seed: int, total_steps: int) -> Built:
        model = build_small_model(variant, cfg, preset.sent_weight, preset.lm_weight).to(device)
        if preset.weight_decay:
            opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=preset.weight_decay)
        else:  # Adam, as written (AdamW with no decay is the same update; fused is the fast CPU kernel)
            opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=True)
        sched = None
        if preset.schedule == "cosine_per_epoch":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
        return Built(model, opt, sched, scheduler_per="epoch", info={"config": asdict(cfg)})

    return build


def run(args, argv) -> dict:
    preset, overrides = resolve(SMALL, args, PRESET_FLAGS)
    validate(args)
    out = check_writable(args.out or default_out(OUT, args.protocol))
    done = before_data(main, argv, args, SMALL, out)
    if done is not None:
        return done
    device = resolve_device(args.device)
    data = load_sst2(args.data_dir)
    extra = parse_extra_eval(args.extra_eval)
    train_split = data["train"].head(args.max_train)
    val_split = data["validation"].head(args.max_eval)
    check_analysable(
        val_split, PROBE_FOLDS, f"the validation set ({val_split.source or 'dev.tsv'}, {len(val_split)} rows)"
    )
    vocab = small_vocab(preset, train_split.sentences)
    cfg = small_config(
        preset,
        vocab_size=len(vocab),
        max_len=args.max_len,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        dropout=args.dropout,
        engram_dim=args.engram_dim,
        impl=args.impl,
    )

    def encode(split) -> Encoded:
        return Encoded([vocab.encode(s, cfg.max_len) for s in split.sentences], split.labels, vocab.pad)

    train = encode(train_split)
    evals = {"validation": encode(val_split), **{k: encode(v) for k, v in extra.items()}}
    recipe = Recipe(
        "small",
        make_builder(args, preset, cfg, device),
        lambda v: preset.batch_size,
        args.epochs,
        device,
        clip_norm=preset.clip_norm or None,
        drop_last=preset.drop_last,
        train_mode=preset.engram_mode,
        eval_mode=preset.engram_mode,
        progress=not args.no_progress,
        weights=small_weights(preset, cfg, vocab),
        tensorboard=tensorboard_root(args.report_to, out),
        log_steps=args.log_steps,
    )
    header = {
        **run_header("small", "experiment.py", argv, args, DEFAULT_EPOCHS, preset, overrides),
        "model_config": asdict(cfg),
        "versions": versions(),
        "device": device_name(device),
        "machine": machine(device),
        "seeds": args.seeds,
        "data": {
            "train": len(train),
            "validation": len(evals["validation"]),
            "vocab_size": len(vocab),
            **data_source(args, extra),
        },
    }
    panels = [("training accuracy (%)", [("train_acc", "train")]), ("validation accuracy (%)", [("val_acc", "val")])]
    print(
        f"small experiment, protocol {preset.name}: {len(train):,} train / "
        f"{len(evals['validation']):,} validation rows, "
        f"vocabulary {len(vocab):,}, device {device_name(device)}, seeds {args.seeds}"
    )
    other = read_metrics(other_protocol_metrics(args, OUT))
    return run_and_report(
        recipe, args, train, evals, out, header, SMALL_STUDY, panels, lambda m: small_report(m, other)
    )


if __name__ == "__main__":
    main()
