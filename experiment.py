"""Experiment 1: three ~1.3 M-parameter transformers trained from scratch on SST-2.

python experiment.py                          # the study as written; downloads SST-2 from the hub
python experiment.py --data-dir DIR           # offline, from GLUE-layout train.tsv / dev.tsv
python experiment.py --help                   # every setting, with units
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from analysis.controls import PROBE_FOLDS
from analysis.metrics import data_source, run_header
from analysis.report_small import small_report
from analysis.study_figures import SMALL_STUDY
from models import VARIANTS, SmallConfig, build_small_model
from protocols import SMALL, ladder_names, preset_help
from run.cli import (
    add_logging_arguments,
    add_preset_flags,
    base_parser,
    cli_main,
    parse_with_preset,
    positive_int,
    settings_from,
    unit_interval,
)
from run.ladder import run_ladder
from run.settings import Settings, SmallModel, Training, default_out, other_protocol_metrics, resolve_device
from run.study import mode_of, prepare, read_metrics, run_and_report, show_status
from train.data import Encoded, Vocab, check_analysable, load_sst2, parse_extra_eval
from train.files import check_writable
from train.loop import Built, Recipe
from train.provenance import device_name, machine, versions
from train.stop import UsageError
from train.tensorboard_log import tensorboard_root
from train.weights import WeightSpec

OUT = "results"
TRAINING = Training(epochs=8, lr=3e-4)  # the study's; --epochs below it marks a run as shortened
MODEL = SmallModel()
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
        epochs=TRAINING.epochs,
        batch_size=preset_help(SMALL, "batch_size"),
        lr=TRAINING.lr,
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
    m.add_argument("--max-len", type=positive_int, default=MODEL.max_len, help="tokens per sentence, specials included")
    m.add_argument("--d-model", type=positive_int, default=MODEL.d_model, help="embedding and hidden width")
    m.add_argument("--layers", type=positive_int, default=MODEL.layers, help="transformer blocks")
    m.add_argument("--heads", type=positive_int, default=MODEL.heads, help="attention heads")
    m.add_argument(
        "--d-ff",
        type=positive_int,
        default=None,
        help="feed-forward width (preset: " + preset_help(SMALL, "d_ff") + ")",
    )
    m.add_argument("--dropout", type=unit_interval, default=MODEL.dropout, help="dropout probability")
    m.add_argument("--engram-dim", type=positive_int, default=MODEL.engram_dim, help="engram width")
    m.add_argument(
        "--impl",
        choices=("packed", "padded"),
        default=MODEL.impl,
        help="packed: per-token layers on real tokens only; padded: the naive reference (same function, slower)",
    )
    o = p.add_argument_group("loss and optimiser (default: the protocol's preset)")
    add_preset_flags(o, SMALL, ("lm_weight", "sent_weight", "weight_decay", "clip_norm"))
    add_logging_arguments(p)
    return parse_with_preset(p, argv, SMALL, PRESET_FLAGS)


def settings(args) -> Settings:
    """The command line as typed settings, validated."""
    model = SmallModel(args.max_len, args.d_model, args.layers, args.heads, args.dropout, args.engram_dim, args.impl)
    s = settings_from(args, SMALL, PRESET_FLAGS, model)
    if model.d_model % model.heads:
        raise UsageError(f"--d-model {model.d_model} is not divisible by --heads {model.heads}")
    if model.max_len < 2:
        raise UsageError("--max-len must be at least 2")
    return s


# ----------------------------------------------------------------------------- the run


def main(argv=None) -> dict:
    return cli_main(parse_args, run, argv)


def run(args, argv) -> dict:
    """The command line's settings, then one mode of mode_of: the ladder, --status, or the grid
    (after its data, model and header): rewrite its outputs, submit it, run one job, or run it all."""
    s = settings(args)
    out = check_writable(s.run.out or default_out(OUT, s.run.protocol))
    mode = mode_of(s.run, s.execution)
    if mode == "ladder":
        return run_ladder(main, argv, s.run, SMALL, out, s.execution.executor)
    if mode == "status":
        return show_status(out, s.run)
    prepare(mode, s, out)
    return run_grid(mode, s, argv, out)


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


def make_builder(training: Training, preset, cfg: SmallConfig, device):
    def build(variant: str, seed: int, total_steps: int) -> Built:
        model = build_small_model(variant, cfg, preset.sent_weight, preset.lm_weight).to(device)
        if preset.weight_decay:
            opt = torch.optim.AdamW(model.parameters(), lr=training.lr, weight_decay=preset.weight_decay)
        else:  # Adam, as written (AdamW with no decay is the same update; fused is the fast CPU kernel)
            opt = torch.optim.Adam(model.parameters(), lr=training.lr, fused=True)
        sched = None
        if preset.schedule == "cosine_per_epoch":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=training.epochs)
        return Built(model, opt, sched, scheduler_per="epoch", info={"config": asdict(cfg)})

    return build


def run_grid(mode: str, s: Settings, argv: list[str], out) -> dict:
    """Load the data, build the vocabulary, the model config, the recipe and the header; then the
    grid in `mode` (run.study.run_and_report)."""
    preset, data_s, training, model = s.preset, s.data, s.training, s.model
    device = resolve_device(s.execution.device)
    data = load_sst2(data_s.data_dir)
    extra = parse_extra_eval(list(data_s.extra_eval))
    train_split = data["train"].head(data_s.max_train)
    val_split = data["validation"].head(data_s.max_eval)
    check_analysable(
        val_split, PROBE_FOLDS, f"the validation set ({val_split.source or 'dev.tsv'}, {len(val_split)} rows)"
    )
    vocab = small_vocab(preset, train_split.sentences)
    cfg = small_config(
        preset,
        vocab_size=len(vocab),
        max_len=model.max_len,
        d_model=model.d_model,
        n_layers=model.layers,
        n_heads=model.heads,
        dropout=model.dropout,
        engram_dim=model.engram_dim,
        impl=model.impl,
    )

    def encode(split) -> Encoded:
        return Encoded([vocab.encode(s, cfg.max_len) for s in split.sentences], split.labels, vocab.pad)

    train = encode(train_split)
    evals = {"validation": encode(val_split), **{k: encode(v) for k, v in extra.items()}}
    recipe = Recipe(
        "small",
        make_builder(training, preset, cfg, device),
        lambda v: preset.batch_size,
        training.epochs,
        device,
        clip_norm=preset.clip_norm or None,
        drop_last=preset.drop_last,
        train_mode=preset.engram_mode,
        eval_mode=preset.engram_mode,
        progress=not training.no_progress,
        weights=small_weights(preset, cfg, vocab),
        tensorboard=tensorboard_root(training.report_to, out),
        log_steps=training.log_steps,
    )
    shortened = training.epochs < TRAINING.epochs or data_s.max_train is not None or data_s.max_eval is not None
    header = {
        **run_header("small", "experiment.py", argv, s.config, shortened, preset, s.overrides),
        "model_config": asdict(cfg),
        "versions": versions(),
        "device": device_name(device),
        "machine": machine(device),
        "seeds": list(s.run.seeds),
        "data": {
            "train": len(train),
            "validation": len(evals["validation"]),
            "vocab_size": len(vocab),
            **data_source(data_s.data_dir, extra),
        },
    }
    panels = [("training accuracy (%)", [("train_acc", "train")]), ("validation accuracy (%)", [("val_acc", "val")])]
    print(
        f"small experiment, protocol {preset.name}: {len(train):,} train / "
        f"{len(evals['validation']):,} validation rows, "
        f"vocabulary {len(vocab):,}, device {device_name(device)}, seeds {list(s.run.seeds)}"
    )
    other = read_metrics(other_protocol_metrics(s.run, OUT))
    return run_and_report(
        mode, recipe, s, train, evals, out, header, SMALL_STUDY, panels, lambda m: small_report(m, other)
    )


if __name__ == "__main__":
    main()
