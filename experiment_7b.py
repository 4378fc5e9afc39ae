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

from analysis.controls import PROBE_FOLDS
from analysis.metrics import data_source, run_header
from analysis.report_causal import report_7b
from analysis.study_figures import BIG_STUDY
from models import VARIANTS, count_parameters
from protocols import BIG, ladder_names, preset_help
from qlora.dry_run import dry_run
from qlora.loading import (
    build_qlora_model,
    check_bitsandbytes,
    cosine_with_warmup,
    encode_split,
    load_tokenizer,
    precision,
    precision_note,
    quiet_libraries,
    resolve_model_source,
    use_tf32,
)
from qlora.settings import CausalLM, DryRun
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
from run.settings import CrossScale, Settings, Training, default_out, other_protocol_metrics, resolve_device
from run.study import mode_of, prepare, read_metrics, run_and_report, show_status
from train.data import Encoded, check_analysable, load_sst2, parse_extra_eval
from train.files import check_writable
from train.loop import Built, Recipe
from train.provenance import device_name, machine, versions
from train.tensorboard_log import tensorboard_root
from train.weights import WeightSpec

OUT = "results_7b"
STUDY = BIG_STUDY
TRAINING = Training(epochs=3, lr=2e-4)  # the study's; --epochs below it marks a run as shortened
LM, DRY, CROSS = CausalLM(), DryRun(), CrossScale()
# flag dest -> the preset field it overrides (None on the command line keeps the preset's value)
PRESET_FLAGS = {
    "batch_size": "batch_size",
    "weight_decay": "weight_decay",
    "warmup_ratio": "warmup_ratio",
    "clip_norm": "clip_norm",
    "lm_weight": "lm_weight",
    "sent_weight": "sent_weight",
}
# the flags given the preset's value when left unset, and so recorded in metrics.json's config; the
# loss weights came later, and are recorded only when given (older run.json files lack them)
FILLED = ("batch_size", "weight_decay", "warmup_ratio", "clip_norm")


def parse_args(argv):
    p = base_parser(
        "experiment_7b.py",
        "Experiment 2 of the study: sentiment_only, dual_head and dual_engram on Qwen2.5-7B with QLoRA.",
        epochs=TRAINING.epochs,
        batch_size=preset_help(BIG, "batch_size")
        + "; Model 3: "
        + preset_help(BIG, "engram_batch_size", lambda b: "the same" if b is None else b),
        lr=TRAINING.lr,
        out=OUT,
        protocols=tuple(BIG),
        variants=VARIANTS,
        rungs=ladder_names(BIG),
        slurm_gpus=1,
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        default=LM.model,
        help="Hugging Face hub id, local folder or .gguf file of a causal LM (never trust_remote_code)",
    )
    m.add_argument(
        "--max-length", type=positive_int, default=LM.max_length, help="tokens per sentence; longer ones are truncated"
    )
    m.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=LM.gradient_checkpointing,
        help="recompute each decoder layer's activations in backward: less memory, more time",
    )
    m.add_argument(
        "--cache-dir",
        type=Path,
        default=LM.cache_dir,
        help="where a --model .gguf file is dequantised to, once (default: "
        "$ENGRAM_CACHE/gguf or ~/.cache/engram-study/gguf)",
    )
    m.add_argument(
        "--no-4bit",
        dest="load_in_4bit",
        action="store_false",
        help="load the base model unquantised (needs ~4x the memory); default: 4-bit NF4 with double quantisation",
    )
    m.add_argument(
        "--tf32",
        action="store_true",
        default=LM.tf32,  # None, not False: see qlora/settings.py
        help="let fp32 matmuls on a CUDA GPU (Ampere or newer) use TF32 tensor cores: faster where the decoder "
        "computes in fp32 (the published protocol, which runs without autocast), but TF32 rounds the "
        "inputs to a 10-bit mantissa, so the numbers change slightly; no effect on the CPU (default: off, "
        "PyTorch's default)",
    )
    m.add_argument("--lora-r", type=positive_int, default=LM.lora_r, help="LoRA rank")
    m.add_argument("--lora-alpha", type=positive_int, default=LM.lora_alpha, help="LoRA alpha (scale = alpha / r)")
    m.add_argument("--lora-dropout", type=unit_interval, default=LM.lora_dropout, help="dropout on the LoRA input")
    m.add_argument("--engram-dim", type=positive_int, default=LM.engram_dim, help="engram width")
    m.add_argument(
        "--head-width", type=positive_int, default=LM.head_width, help="hidden width of the sentiment MLP head"
    )
    m.add_argument(
        "--lm-chunk-rows",
        type=positive_int,
        default=LM.lm_chunk_rows,
        help="LM-loss rows per chunk: bounds the fp32 logits alive at once to rows x vocabulary",
    )
    o = p.add_argument_group("loss and optimiser (default: the protocol's preset)")
    add_preset_flags(o, BIG, ("weight_decay", "warmup_ratio", "clip_norm", "lm_weight", "sent_weight"))
    r = p.add_argument_group("report")
    r.add_argument(
        "--small-results",
        type=Path,
        default=CROSS.small_results,
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
        "--dry-run-steps",
        type=positive_int,
        default=DRY.dry_run_steps,
        help="timed steps per variant (after one warm-up step)",
    )
    add_logging_arguments(p)
    return parse_with_preset(p, argv, BIG, PRESET_FLAGS, fill=FILLED)


def settings(args) -> Settings:
    """The command line as typed settings, validated."""
    lm = CausalLM(
        model=args.model,
        max_length=args.max_length,
        gradient_checkpointing=args.gradient_checkpointing,
        cache_dir=args.cache_dir,
        load_in_4bit=args.load_in_4bit,
        tf32=args.tf32,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        engram_dim=args.engram_dim,
        head_width=args.head_width,
        lm_chunk_rows=args.lm_chunk_rows,
    )
    extra = (CrossScale(args.small_results), DryRun(args.dry_run, args.dry_run_steps))
    return settings_from(args, BIG, PRESET_FLAGS, lm, extra, fill=FILLED)


def make_builder(lm: CausalLM, lr: float, device: torch.device, model_path: str, preset=None):
    compute_dtype, needs_scaler = precision(device)
    preset = preset or BIG["written"]

    def build(variant: str, seed: int, total_steps: int) -> Built:
        model = build_qlora_model(lm, variant, device, compute_dtype, model_path, preset)
        total, trainable = count_parameters(model)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=preset.weight_decay)
        # warm-up steps rounded down, as the study's code does: int(ratio * total)
        sched = cosine_with_warmup(opt, int(preset.warmup_ratio * total_steps), total_steps)
        scaler = torch.amp.GradScaler(device.type) if needs_scaler else None
        # the backbone's autocast dtype (heads stay fp32), or none: the study's code ran without autocast
        autocast = None if compute_dtype == torch.float32 or not preset.autocast else compute_dtype
        info = {
            "compute_dtype": str(compute_dtype).replace("torch.", ""),
            "trainable_percent": 100 * trainable / total,
            "load_in_4bit": lm.load_in_4bit,
            "autocast": autocast is not None,
        }
        return Built(model, opt, sched, scaler, autocast, "step", info)

    return build, compute_dtype


def make_recipe(
    lm: CausalLM, training: Training, preset, build, device, model_path: str | None = None, out: Path | None = None
) -> Recipe:
    """The protocol's batches: Model 3 may have its own batch size and accumulation. With
    `model_path` each job keeps its selected and last epochs' adapters and heads (weights.py)."""
    return Recipe(
        "7b",
        build,
        lambda v: preset.batch_for(VARIANTS[v].engram),
        training.epochs,
        device,
        accum_steps=lambda v: preset.accum_for(VARIANTS[v].engram),
        clip_norm=preset.clip_norm or None,
        drop_last=preset.drop_last,
        train_mode="pair",
        eval_mode=preset.eval_mode,
        progress=not training.no_progress,
        weights=None if model_path is None else lora_weights(lm, preset, model_path),
        tensorboard=None if out is None else tensorboard_root(training.report_to, out),
        log_steps=training.log_steps,
    )


def lora_weights(lm: CausalLM, preset, model_path: str) -> WeightSpec:
    """What rebuilding a job's model from its saved adapter needs: the base (as named and as
    loaded), how it was loaded, the heads' sizes, and how the protocol pools and evaluates."""
    config = {
        "base_model": lm.model,
        "base_path": model_path,
        "load_in_4bit": lm.load_in_4bit,
        "max_length": lm.max_length,
        "engram_dim": lm.engram_dim,
        "head_width": lm.head_width,
        "lm_chunk_rows": lm.lm_chunk_rows,
        "lora_r": lm.lora_r,
        "lora_alpha": lm.lora_alpha,
        "lora_dropout": lm.lora_dropout,
        "protocol": preset.name,
        "pooling": preset.pooling,
        "sent_weight": preset.sent_weight,
        "lm_weight": preset.lm_weight,
        "autocast": preset.autocast,
        "prefix_predicts_first": preset.prefix_predicts_first,
        "eval_mode": preset.eval_mode,
        "batch_size": {v: preset.batch_for(e.engram) for v, e in VARIANTS.items()},
    }  # each variant's evaluation batches
    return WeightSpec("causal_lm", config)


# ----------------------------------------------------------------------------- main


def main(argv=None):
    return cli_main(parse_args, run, argv)


def run(args, argv):
    """The command line's settings, the device's notes, then one mode: the dry run, the ladder,
    --status (run.study.mode_of), or the grid (after its data, model and header): rewrite its
    outputs, submit it, run one job, or run it all."""
    s = settings(args)
    lm, dry = s.model, s.part(DryRun)
    device = resolve_device(s.execution.device)
    for note in (precision_note(device), use_tf32(lm.tf32, device)):
        if note:
            print(note, file=sys.stderr)
    if lm.load_in_4bit:
        check_bitsandbytes(device)
    if s.training.no_progress:
        quiet_libraries()
    if dry.dry_run:
        return dry_run(lm, dry, s.training.lr, device, s.preset, make_builder)
    out = check_writable(s.run.out or default_out(OUT, s.run.protocol))
    mode = mode_of(s.run, s.execution)
    if mode == "ladder":
        return run_ladder(main, argv, s.run, BIG, out, s.execution.executor)
    if mode == "status":
        return show_status(out, s.run)
    prepare(mode, s, out)
    return run_grid(mode, s, argv, out, device)


def run_grid(mode: str, s: Settings, argv: list[str], out: Path, device: torch.device) -> dict:
    """Load the model's tokenizer and the data, build the recipe and the header; then the grid in
    `mode` (run.study.run_and_report)."""
    lm, preset, data_s, training = s.model, s.preset, s.data, s.training
    model_path = resolve_model_source(lm.model, lm.cache_dir)
    data = load_sst2(data_s.data_dir)
    extra = parse_extra_eval(list(data_s.extra_eval))
    val_split = data["validation"].head(data_s.max_eval)
    check_analysable(
        val_split, PROBE_FOLDS, f"the validation set ({val_split.source or 'dev.tsv'}, {len(val_split)} rows)"
    )
    tok = load_tokenizer(model_path)

    def encode(split) -> Encoded:
        return encode_split(tok, split, lm.max_length)

    train = encode(data["train"].head(data_s.max_train))
    evals = {"validation": encode(val_split), **{k: encode(v) for k, v in extra.items()}}
    build, compute_dtype = make_builder(lm, training.lr, device, model_path, preset)
    recipe = make_recipe(lm, training, preset, build, device, model_path, out)
    shortened = training.epochs < TRAINING.epochs or data_s.max_train is not None or data_s.max_eval is not None
    header = {
        **run_header("7b", "experiment_7b.py", argv, s.config, shortened, preset, s.overrides),
        "compute_dtype": str(compute_dtype).replace("torch.", ""),
        "peak_gpu_gib": None,  # filled after every variant on a GPU
        "versions": versions(),
        "device": device_name(device),
        "machine": machine(device),
        "seeds": list(s.run.seeds),
        "data": {"train": len(train), "validation": len(evals["validation"]), **data_source(data_s.data_dir, extra)},
    }
    small = read_metrics(s.part(CrossScale).small_results)
    other = read_metrics(other_protocol_metrics(s.run, OUT))
    panels = [
        ("validation accuracy (%)", [("val_acc", "val")]),
        ("sentiment loss", [("train_sent_loss", "train"), ("val_sent_loss", "val")]),
        ("LM loss", [("train_lm_loss", "train"), ("val_lm_loss", "val")]),
    ]
    print(
        f"QLoRA experiment, protocol {preset.name}: {lm.model}, {len(train):,} train / {len(evals['validation']):,} "
        f"validation rows, device {device_name(device)}, seeds {list(s.run.seeds)}"
    )
    report = lambda m: report_7b(m, small, other)  # noqa: E731
    return run_and_report(mode, recipe, s, train, evals, out, header, STUDY, panels, report)


if __name__ == "__main__":
    main()
