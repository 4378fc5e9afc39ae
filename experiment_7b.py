"""Experiment 2: the three variants on Qwen2.5-7B with QLoRA (4-bit NF4, LoRA r=16).

python experiment_7b.py --data-dir ../shared/data/sst2                 # the study (~16 GB GPU)
python experiment_7b.py --model /models/Qwen2.5-7B --data-dir DATA     # a local model folder
python experiment_7b.py --dry-run                                      # does it fit? random 7B weights
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from analysis import reporting as rep
from analysis.controls import PROBE_FOLDS
from analysis.metrics import data_source, run_header, subject
from models import VARIANTS, count_parameters
from protocols import BIG, BIG_STUDY, SMALL_STUDY, ladder_names, parse_with_preset, preset_help, resolve
from qlora.dry_run import dry_run
from qlora.loading import (
    DEFAULT_MODEL,
    build_qlora_model,
    check_bitsandbytes,
    encode_split,
    load_tokenizer,
    precision,
    precision_note,
    quiet_libraries,
    resolve_model_source,
    use_tf32,
)
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
from train.data import Encoded, check_analysable, load_sst2, parse_extra_eval
from train.files import check_writable
from train.loop import Built, Recipe
from train.provenance import device_name, machine, versions
from train.tensorboard_log import tensorboard_root
from train.weights import WeightSpec

DEFAULT_EPOCHS = 3
OUT = "results_7b"
STUDY = BIG_STUDY
PRESET_FLAGS = {
    "batch_size": "batch_size",
    "weight_decay": "weight_decay",
    "warmup_ratio": "warmup_ratio",
    "clip_norm": "clip_norm",
}


def parse_args(argv):
    p = base_parser(
        "experiment_7b.py",
        "Experiment 2 of the study: sentiment_only, dual_head and dual_engram on Qwen2.5-7B with QLoRA.",
        epochs=DEFAULT_EPOCHS,
        batch_size=preset_help(BIG, "batch_size")
        + "; Model 3: "
        + preset_help(BIG, "engram_batch_size", lambda b: "the same" if b is None else b),
        lr=2e-4,
        out=OUT,
        protocols=tuple(BIG),
        variants=VARIANTS,
        rungs=ladder_names(BIG),
        slurm_gpus=1,
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="Hugging Face hub id, local folder or .gguf file of a causal LM (never trust_remote_code)",
    )
    m.add_argument(
        "--max-length", type=positive_int, default=128, help="tokens per sentence; longer ones are truncated"
    )
    m.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="recompute each decoder layer's activations in backward: less memory, more time",
    )
    m.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where a --model .gguf file is dequantised to, once (default: "
        "$ENGRAM_CACHE/gguf or ~/.cache/engram-study/gguf)",
    )
    m.add_argument(
        "--no-4bit",
        dest="load_in_4bit",
        action="store_false",
        help="load the base model unquantised (needs ~4x the memory); default: 4-bit NF4 with double quantisation",
    )
    # off is None, not False: run.json files made before this flag lack it, and a resume compares
    # settings (checkpoints.prepare_checkpoints), where a missing key reads as None
    m.add_argument(
        "--tf32",
        action="store_true",
        default=None,
        help="let fp32 matmuls on a CUDA GPU (Ampere or newer) use TF32 tensor cores: faster where the decoder "
        "computes in fp32 (the published protocol, which runs without autocast), but TF32 rounds the "
        "inputs to a 10-bit mantissa, so the numbers change slightly; no effect on the CPU (default: off, "
        "PyTorch's default)",
    )
    m.add_argument("--lora-r", type=positive_int, default=16, help="LoRA rank")
    m.add_argument("--lora-alpha", type=positive_int, default=32, help="LoRA alpha (scale = alpha / r)")
    m.add_argument("--lora-dropout", type=unit_interval, default=0.05, help="dropout on the LoRA input")
    m.add_argument("--engram-dim", type=positive_int, default=128, help="engram width")
    m.add_argument("--head-width", type=positive_int, default=256, help="hidden width of the sentiment MLP head")
    m.add_argument(
        "--lm-chunk-rows",
        type=positive_int,
        default=256,
        help="LM-loss rows per chunk: bounds the fp32 logits alive at once to rows x vocabulary",
    )
    o = p.add_argument_group("optimiser (default: the protocol's preset)")
    o.add_argument(
        "--weight-decay",
        type=non_negative_float,
        default=None,
        help="AdamW weight decay (preset: " + preset_help(BIG, "weight_decay") + ")",
    )
    o.add_argument(
        "--warmup-ratio",
        type=unit_interval,
        default=None,
        help="fraction of all optimizer steps with linear warm-up, then cosine decay (preset: "
        + preset_help(BIG, "warmup_ratio")
        + ")",
    )
    o.add_argument(
        "--clip-norm",
        type=non_negative_float,
        default=None,
        help="gradient-norm clipping, 0 = none (preset: " + preset_help(BIG, "clip_norm") + ")",
    )
    r = p.add_argument_group("report")
    r.add_argument(
        "--small-results",
        type=Path,
        default=Path("results/metrics.json"),
        help="the small experiment's metrics.json, for the cross-scale tables (skipped if absent)",
    )
    d = p.add_argument_group("dry run")
    d.add_argument(
        "--dry-run",
        nargs="?",
        const="7b",
        choices=("7b", "tiny", "model"),
        default=None,
        help="no data, no download: random weights of Qwen2.5-7B's exact shape (or a tiny one), a few "
        "training steps of each variant at the real batch size and maximum length; prints peak GPU "
        "memory (GiB) and seconds per step",
    )
    d.add_argument(
        "--dry-run-steps", type=positive_int, default=3, help="timed steps per variant (after one warm-up step)"
    )
    add_logging_arguments(p)
    return parse_with_preset(p, argv, BIG, PRESET_FLAGS)


def make_builder(args, device: torch.device, model_path: str, preset=None):
    compute_dtype, needs_scaler = precision(device)
    preset = preset or BIG[args.protocol]

    def build(variant: str, seed: int, total_steps: int) -> Built:
        from transformers import get_cosine_schedule_with_warmup

        model = build_qlora_model(args, variant, device, compute_dtype, model_path, preset)
        total, trainable = count_parameters(model)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=preset.weight_decay)
        # warm-up steps rounded down, as the study's code does: int(ratio * total)
        sched = get_cosine_schedule_with_warmup(opt, int(preset.warmup_ratio * total_steps), total_steps)
        scaler = torch.amp.GradScaler(device.type) if needs_scaler else None
        # the backbone's autocast dtype (heads stay fp32), or none: the study's code ran without autocast
        autocast = None if compute_dtype == torch.float32 or not preset.autocast else compute_dtype
        info = {
            "compute_dtype": str(compute_dtype).replace("torch.", ""),
            "trainable_percent": 100 * trainable / total,
            "load_in_4bit": args.load_in_4bit,
            "autocast": autocast is not None,
        }
        return Built(model, opt, sched, scaler, autocast, "step", info)

    return build, compute_dtype


def make_recipe(args, preset, build, device, model_path: str | None = None, out: Path | None = None) -> Recipe:
    """The protocol's batches: Model 3 may have its own batch size and accumulation. With
    `model_path` each job keeps its selected and last epochs' adapters and heads (weights.py)."""
    return Recipe(
        "7b",
        build,
        preset.batch_for,
        args.epochs,
        device,
        accum_steps=preset.accum_for,
        clip_norm=preset.clip_norm or None,
        drop_last=preset.drop_last,
        train_mode="pair",
        eval_mode=preset.eval_mode,
        progress=not args.no_progress,
        weights=None if model_path is None else lora_weights(args, preset, model_path),
        tensorboard=None if out is None else tensorboard_root(args.report_to, out),
        log_steps=getattr(args, "log_steps", 50),
    )


def lora_weights(args, preset, model_path: str) -> WeightSpec:
    """What rebuilding a job's model from its saved adapter needs: the base (as named and as
    loaded), how it was loaded, the heads' sizes, and how the protocol pools and evaluates."""
    config = {
        "base_model": args.model,
        "base_path": model_path,
        "load_in_4bit": args.load_in_4bit,
        "max_length": args.max_length,
        "engram_dim": args.engram_dim,
        "head_width": args.head_width,
        "lm_chunk_rows": args.lm_chunk_rows,
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout,
        "protocol": preset.name,
        "pooling": preset.pooling,
        "sent_weight": preset.sent_weight,
        "lm_weight": preset.lm_weight,
        "autocast": preset.autocast,
        "prefix_predicts_first": preset.prefix_predicts_first,
        "eval_mode": preset.eval_mode,
        "batch_size": {v: preset.batch_for(v) for v in VARIANTS},
    }  # each variant's evaluation batches
    return WeightSpec("causal_lm", config)


# ----------------------------------------------------------------------------- report


def report_7b(m: dict, small: dict | None, other: dict | None = None) -> str:
    s = m["study"]
    model = subject(m)
    lines = rep.report_header(
        m, f"Experiment 2: {model} with {'QLoRA' if m['config'].get('load_in_4bit', True) else 'LoRA'} on SST-2"
    )
    first = next(iter(m["models"].values()), None)
    if first:
        lines += [
            f"Trainable parameters: {first['trainable_params']:,} of {first['total_params']:,} "
            f"({first['info'].get('trainable_percent', 0):.2f} %; study: ~41 M of ~4.4 B, 0.94 %) · compute dtype "
            f"{first['info'].get('compute_dtype')}",
            "",
        ]
    lines += ["## Validation accuracy (%)", "", *rep.accuracy_table(m), *rep.per_seed_table(m)]
    lines += [
        "### Per epoch, beside the study (first seed)",
        "",
        "| Model | "
        + " | ".join(f"Epoch {e} (ours / study)" for e in range(1, 4))
        + " | Minutes (ours / study, RTX 4080) |",
        "|---|---|---|---|---|",
    ]
    for v, mm in m["models"].items():
        hist = mm["runs"][0]["history"]
        study = s["epochs"].get(v, [None] * 3)  # a variant the study did not have: "–"
        cells = [f"{rep._f(hist[e]['val_acc']) if e < len(hist) else '–'} / {rep._f(study[e])}" for e in range(3)]
        ours, theirs = f"{mm['runs'][0]['minutes']:.1f}", s["minutes"].get(v, "–")
        lines.append(f"| {rep.LABELS[v]} | " + " | ".join(cells) + f" | {ours} / {theirs} |")
    lines += loss_comparison(m, s)
    lines += rep.hypothesis_section(m)
    lines += rep.extra_section(m)
    lines += rep.engram_section(m, s["engram"])
    lines += rep.rank_section(m)
    lines += rep.probe_section(m)
    lines += rep.summary_section(m)
    lines += rep.protocols_section(m, other)
    lines += cross_scale_section(small, m)
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


def loss_comparison(m: dict, s: dict) -> list[str]:
    """The last epoch's training losses and the validation LM loss per epoch beside the study's,
    averaged as the study's code averages them: the mean over batches of each batch's mean (Model 3:
    of the mean of its two halves). Runs made before those columns existed show "–" there."""

    def bm(h: dict, key: str, digits: int = 4) -> str:
        return rep._f(h.get(f"{key}_batch_mean"), digits)

    lines = [
        "### Training dynamics, last epoch (first seed)",
        "",
        "Losses as the study averages them: the mean over the epoch's batches of each batch's mean loss "
        "(Model 3: the mean of its two halves'). metrics.json also holds them per example (sentiment) and "
        "per target token (LM) over the whole epoch.",
        "",
        "| Model | Train loss | Train sent loss | Train LM loss | Train acc (%) | Study (loss / sent / LM / acc) |",
        "|---|---|---|---|---|---|",
    ]
    for v, mm in m["models"].items():
        h = mm["runs"][0]["history"][-1]
        st = " / ".join("–" if x is None else f"{x}" for x in s["train_epoch3"].get(v, [None] * 4))
        lines.append(
            f"| {rep.LABELS[v]} | {rep._f(h['train_loss'], 4)} | {bm(h, 'train_sent_loss')} | "
            f"{bm(h, 'train_lm_loss')} | {rep._f(h['train_acc'])} | {st} |"
        )
    lines += ["", "Validation LM loss per epoch, the mean over batches of each batch's mean (ours → … / study):", ""]
    for v, mm in m["models"].items():
        hist = mm["runs"][0]["history"]
        if hist[0]["val_lm_loss"] is not None:
            ours = " → ".join(bm(h, "val_lm_loss") for h in hist)
            lines.append(f"- {rep.LABELS[v]}: {ours} / {' → '.join(str(x) for x in s['val_lm_loss'].get(v, ['–']))}")
    return lines + [""]


def cross_scale_section(small: dict | None, big: dict) -> list[str]:
    """1.3 M from scratch (ours and the study's) · this run's model (ours) · 7B (the study's), each
    delta beside the study's of the same kind."""
    if not small or "preset" not in small or not small.get("models") or not big.get("models"):
        return []
    name = subject(big)
    cols = [
        (f"Small, 1.3 M from scratch (`{small['protocol']}`; ours / study)", small, SMALL_STUDY),
        (f"{name}, pretrained (`{big['protocol']}`; ours)", big, None),
        ("Qwen2.5-7B (study)", None, BIG_STUDY),
    ]
    lines = [
        "## Cross-scale comparison",
        "",
        f"Small run: `{small['command']}`.",
        "",
        "| Measure | " + " | ".join(c[0] for c in cols) + " |",
        "|---|---|---|---|",
    ]

    def row(label, ours, theirs):
        cells = []
        for _, m, st in cols:
            mine = None if m is None else ours(m)
            study_value = None if st is None else theirs(st)
            cells.append(" / ".join(x for x in (mine, study_value) if x is not None) or "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    for v in VARIANTS:
        row(
            f"Best validation accuracy, {rep.LABELS[v]} (%)",
            lambda m, v=v: rep._f(m["models"][v]["best_val_acc"]["mean"]) if v in m["models"] else "–",
            lambda st, v=v: rep._f(st["best"].get(v)),
        )
    for h in ("H1", "H2"):
        for kind in ("best", "final"):
            row(
                f"{h} delta, {kind} epoch (points)",
                lambda m, h=h, k=kind: (
                    f"{m['hypotheses'][h][f'delta_{k}']['mean']:+.2f}" if h in m["hypotheses"] else "–"
                ),
                lambda st, h=h, k=kind: f"{st['deltas'][k][h]:+.2f}",
            )
        row(
            f"{h} verdict (final epoch, across seeds)",
            lambda m, h=h: m["hypotheses"][h]["verdict"] if h in m["hypotheses"] else "–",
            lambda st: None,
        )
    row(
        "Engram ARI",
        lambda m: rep._msd(m["engram"].get("ari"), 3) if m["engram"] else "–",
        lambda st: f"{st['engram']['ari']}",
    )
    row(
        "Engram cluster accuracy (%)",
        lambda m: rep._msd(m["engram"].get("cluster_accuracy"), 1, 100) if m["engram"] else "–",
        lambda st: f"{st['engram']['cluster_accuracy']}",
    )
    row(
        "ARI of untrained compressors (control)",
        lambda m: (
            rep._msd(m["engram"]["random_compressor"]["ari"], 3) if "random_compressor" in m.get("engram", {}) else "–"
        ),
        lambda st: None,
    )
    for v in ("sentiment_only", "dual_head"):
        row(
            f"Effective rank of pooled states, {rep.LABELS[v]}",
            lambda m, v=v: (
                rep._msd(m["models"][v].get("rank", {}).get("effective_rank"), 1) if v in m["models"] else "–"
            ),
            lambda st: None,
        )
    return lines + [""]


# ----------------------------------------------------------------------------- main


def main(argv=None):
    return cli_main(parse_args, run, argv)


def run(args, argv):
    preset, overrides = resolve(BIG, args, PRESET_FLAGS)
    validate_common(args)
    device = resolve_device(args.device)
    for note in (precision_note(device), use_tf32(args.tf32, device)):
        if note:
            print(note, file=sys.stderr)
    if args.load_in_4bit:
        check_bitsandbytes(device)
    if args.no_progress:
        quiet_libraries()
    if args.dry_run:
        return dry_run(args, device, preset, make_builder)
    out = check_writable(args.out or default_out(OUT, args.protocol))
    done = before_data(main, argv, args, BIG, out)
    if done is not None:
        return done
    model_path = resolve_model_source(args.model, args.cache_dir)
    data = load_sst2(args.data_dir)
    extra = parse_extra_eval(args.extra_eval)
    val_split = data["validation"].head(args.max_eval)
    check_analysable(
        val_split, PROBE_FOLDS, f"the validation set ({val_split.source or 'dev.tsv'}, {len(val_split)} rows)"
    )
    tok = load_tokenizer(model_path)

    def encode(split) -> Encoded:
        return encode_split(tok, split, args.max_length)

    train = encode(data["train"].head(args.max_train))
    evals = {"validation": encode(val_split), **{k: encode(v) for k, v in extra.items()}}
    build, compute_dtype = make_builder(args, device, model_path, preset)
    recipe = make_recipe(args, preset, build, device, model_path, out)
    header = {
        **run_header("7b", "experiment_7b.py", argv, args, DEFAULT_EPOCHS, preset, overrides),
        "compute_dtype": str(compute_dtype).replace("torch.", ""),
        "peak_gpu_gib": None,  # filled after every variant on a GPU
        "versions": versions(),
        "device": device_name(device),
        "machine": machine(device),
        "seeds": args.seeds,
        "data": {"train": len(train), "validation": len(evals["validation"]), **data_source(args, extra)},
    }
    small = read_metrics(args.small_results)
    other = read_metrics(other_protocol_metrics(args, OUT))
    panels = [
        ("validation accuracy (%)", [("val_acc", "val")]),
        ("sentiment loss", [("train_sent_loss", "train"), ("val_sent_loss", "val")]),
        ("LM loss", [("train_lm_loss", "train"), ("val_lm_loss", "val")]),
    ]
    print(
        f"QLoRA experiment, protocol {preset.name}: {args.model}, {len(train):,} train / {len(evals['validation']):,} "
        f"validation rows, device {device_name(device)}, seeds {args.seeds}"
    )
    return run_and_report(recipe, args, train, evals, out, header, STUDY, panels, lambda m: report_7b(m, small, other))


if __name__ == "__main__":
    main()
