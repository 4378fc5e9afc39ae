"""Experiment 2: the three variants on Qwen2.5-7B with QLoRA (4-bit NF4, LoRA r=16).

    python experiment_7b.py --data-dir ../shared/data/sst2                 # the study (~16 GB GPU)
    python experiment_7b.py --model /models/Qwen2.5-7B --data-dir DATA     # a local model folder
    python experiment_7b.py --dry-run                                      # does it fit? random 7B weights
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import torch

import reporting as rep
from models import EngramModel, HFBackbone, ModelSpec, count_parameters, mlp_sentiment_head
from training import (Built, Encoded, Recipe, UsageError, base_parser, check_writable, cli_main, collate,
                      load_sst2, parse_extra_eval, positive_int, resolve_device, unit_interval,
                      validate_common)
from engram import run_batch

DEFAULT_MODEL = "Qwen/Qwen2.5-7B"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_EPOCHS = 3
STUDY = {
    "deltas": {"H1": 0.57, "H2": -0.12},  # as the study states them (from unrounded accuracies)
    "best": {"sentiment_only": 96.22, "dual_head": 96.79, "dual_engram": 96.67},
    "final": {"sentiment_only": 96.22, "dual_head": 96.56, "dual_engram": 96.67},
    "epochs": {"sentiment_only": [94.38, 95.41, 96.22], "dual_head": [95.87, 96.79, 96.56], "dual_engram": [95.53, 96.67, 96.67]},
    "minutes": {"sentiment_only": 380, "dual_head": 417, "dual_engram": 635},
    "train_epoch3": {  # loss, sentiment loss, LM loss, accuracy
        "sentiment_only": [0.058, 0.058, None, 98.45],
        "dual_head": [0.458, 0.033, 0.883, 98.80],
        "dual_engram": [0.793, 0.034, 1.551, 98.75],
    },
    "val_lm_loss": [3.88, 4.69],
    "engram": {"ari": 0.833, "cluster_accuracy": 95.64, "within_class_cosine": 0.953, "between_class_cosine": 0.838},
    "trainable_params": 41e6,
    "total_params": 4.4e9,
    "gpu": "RTX 4080 16 GB",
}
# Qwen2.5-7B's shape, for the dry run without a download.
QWEN25_7B_SHAPE = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       intermediate_size=18944, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
                       rms_norm_eps=1e-6, tie_word_embeddings=False)
TINY_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False)


def parse_args(argv):
    p = base_parser("experiment_7b.py", "Experiment 2 of the study: sentiment_only, dual_head and dual_engram on "
                    "Qwen2.5-7B with QLoRA.", epochs=DEFAULT_EPOCHS, batch_size=8, lr=2e-4, out="results_7b")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=DEFAULT_MODEL, help="Hugging Face hub id or local folder of a causal LM (never trust_remote_code)")
    m.add_argument("--max-length", type=positive_int, default=128, help="tokens per sentence; longer ones are truncated")
    m.add_argument("--no-4bit", dest="load_in_4bit", action="store_false",
                   help="load the base model unquantised (needs ~4x the memory); default: 4-bit NF4 with double quantisation")
    m.add_argument("--lora-r", type=positive_int, default=16, help="LoRA rank")
    m.add_argument("--lora-alpha", type=positive_int, default=32, help="LoRA alpha (scale = alpha / r)")
    m.add_argument("--lora-dropout", type=unit_interval, default=0.05, help="dropout on the LoRA input")
    m.add_argument("--engram-dim", type=positive_int, default=128, help="engram width")
    m.add_argument("--head-width", type=positive_int, default=256, help="hidden width of the sentiment MLP head")
    m.add_argument("--lm-chunk-rows", type=positive_int, default=256,
                   help="LM-loss rows per chunk: bounds the fp32 logits alive at once to rows x vocabulary")
    o = p.add_argument_group("optimiser")
    o.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    o.add_argument("--warmup-ratio", type=unit_interval, default=0.03, help="fraction of all steps with linear warm-up, then cosine decay")
    r = p.add_argument_group("report")
    r.add_argument("--small-results", type=Path, default=Path("results/metrics.json"),
                   help="the small experiment's metrics.json, for the cross-scale tables (skipped if absent)")
    d = p.add_argument_group("dry run")
    d.add_argument("--dry-run", nargs="?", const="7b", choices=("7b", "tiny"), default=None,
                   help="no data, no download: random weights of Qwen2.5-7B's exact shape (or a tiny one), a few "
                        "training steps of each variant at the real batch size and maximum length; prints peak GPU "
                        "memory (GiB) and seconds per step")
    d.add_argument("--dry-run-steps", type=positive_int, default=3, help="timed steps per variant (after one warm-up step)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- precision and loading


def precision(device: torch.device) -> tuple[torch.dtype, bool]:
    """(compute dtype, needs a loss scaler): bf16 on GPUs with native bf16 (compute capability
    >= 8.0), fp16 with a scaler on older GPUs, fp32 on the CPU."""
    if device.type != "cuda":
        return torch.float32, False
    if torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16, False
    return torch.float16, True


def check_model_source(model: str) -> None:
    """A local folder must exist and hold a causal LM's config; anything else is taken as a hub id."""
    looks_local = Path(model).exists() or model.startswith((".", "/", "~")) or model.count("/") > 1
    if not looks_local:
        return
    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise UsageError(f"model folder {folder} not found; pass --model with a local folder or a hub id such as {DEFAULT_MODEL}")
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise UsageError(f"{folder} has no config.json: not a Hugging Face model folder")
    archs = json.loads(cfg.read_text()).get("architectures") or []
    if not any(a.endswith("ForCausalLM") for a in archs):
        raise UsageError(f"{folder} holds {archs or 'an unknown architecture'}, not a causal LM (…ForCausalLM)")


def check_bitsandbytes(device: torch.device) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:
        raise UsageError(f"4-bit loading needs bitsandbytes, which cannot run here ({type(e).__name__}: {e}); "
                         "install bitsandbytes for this device, or pass --no-4bit") from None


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"could not load a tokenizer from {model} ({first}); pass --model with a local model folder, "
                         "or check the hub id and the network") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def encode_split(tok, split, max_length: int) -> Encoded:
    """Token ids with the tokenizer's own special tokens, truncated at max_length."""
    ids = tok(split.sentences, truncation=True, max_length=max_length)["input_ids"]
    return Encoded(ids, split.labels, tok.pad_token_id)


def load_base(model: str, device: torch.device, compute_dtype: torch.dtype, load_in_4bit: bool):
    """A fresh base model: 4-bit NF4 with double quantisation, prepared for k-bit training with
    gradient checkpointing (use_reentrant=False); or unquantised and frozen with --no-4bit."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = dict(dtype=compute_dtype, trust_remote_code=False, device_map={"": str(device) if device.type == "cpu" else device.index or 0})
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)
    try:
        lm = AutoModelForCausalLM.from_pretrained(model, **kwargs)
    except UsageError:
        raise
    except (OSError, ValueError) as e:
        raise UsageError(f"could not load a causal LM from {model}: {str(e).splitlines()[0]}") from None
    gc_kwargs = {"use_reentrant": False}
    if load_in_4bit:
        from peft import prepare_model_for_kbit_training

        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=gc_kwargs)
    else:
        lm.requires_grad_(False)
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    return lm


def build_qlora_model(args, variant: str, device: torch.device, compute_dtype: torch.dtype, model_path: str) -> EngramModel:
    from peft import LoraConfig, get_peft_model

    lm = load_base(model_path, device, compute_dtype, args.load_in_4bit)
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=list(LORA_TARGETS), bias="none", task_type="CAUSAL_LM")
    lm = get_peft_model(lm, lora)
    if device.type == "cpu" and args.load_in_4bit:
        import bitsandbytes as bnb

        # bitsandbytes repacks 4-bit weights for CPU inference at the first eval-mode call and
        # then cannot train through them (in-place bias add on a graph tensor); keep training layout.
        for m in lm.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = False
    backbone = HFBackbone(lm, compute_dtype)
    spec = ModelSpec(variant=variant, pooling="last", engram_dim=args.engram_dim, lm_chunk_rows=args.lm_chunk_rows)
    model = EngramModel(backbone, spec, mlp_sentiment_head(backbone.hidden_size, args.head_width))
    # Heads are created in fp32 and stay fp32; only they and the LoRA weights are trainable.
    for module in (model.sentiment_head, model.compressor, model.projector):
        if module is not None:
            module.to(device=device, dtype=torch.float32)
    return model


def make_builder(args, device: torch.device, model_path: str):
    compute_dtype, needs_scaler = precision(device)

    def build(variant: str, seed: int, total_steps: int) -> Built:
        from transformers import get_cosine_schedule_with_warmup

        model = build_qlora_model(args, variant, device, compute_dtype, model_path)
        total, trainable = count_parameters(model)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
        sched = get_cosine_schedule_with_warmup(opt, math.ceil(args.warmup_ratio * total_steps), total_steps)
        scaler = torch.amp.GradScaler("cuda") if needs_scaler else None
        autocast = compute_dtype if device.type == "cuda" else None
        info = {"compute_dtype": str(compute_dtype).replace("torch.", ""), "trainable_percent": 100 * trainable / total,
                "load_in_4bit": args.load_in_4bit}
        return Built(model, opt, sched, scaler, autocast, info)

    return build, compute_dtype


# ----------------------------------------------------------------------------- dry run


def dry_run(args, device: torch.device) -> dict:
    """Random weights of the real shape, the real loader, a few steps per variant."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = QWEN25_7B_SHAPE if args.dry_run == "7b" else TINY_SHAPE
    compute_dtype, _ = precision(device)
    report = {"shape": args.dry_run, "device": rep.device_name(device), "batch_size": args.batch_size,
              "max_length": args.max_length, "compute_dtype": str(compute_dtype).replace("torch.", ""), "variants": {}}
    with tempfile.TemporaryDirectory(prefix="qwen-dry-run-") as folder:
        t0 = time.perf_counter()
        config = Qwen2Config(**shape, architectures=["Qwen2ForCausalLM"])
        with torch.device(device):
            lm = Qwen2ForCausalLM._from_config(config, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        lm.save_pretrained(folder)
        del lm
        print(f"random {args.dry_run} model written in {time.perf_counter() - t0:.0f} s")
        build, _ = make_builder(args, device, folder)
        g = torch.Generator().manual_seed(0)
        for variant in ("sentiment_only", "dual_head", "dual_engram"):
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            built = build(variant, 0, args.dry_run_steps + 1)
            ids = torch.randint(0, shape["vocab_size"], (args.batch_size, args.max_length), generator=g)
            enc = Encoded(ids.tolist(), [i % 2 for i in range(args.batch_size)])
            times = []
            for step in range(args.dry_run_steps + 1):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t = time.perf_counter()
                b_ids, mask, labels = collate(enc, range(args.batch_size), device)
                with torch.autocast(device.type, dtype=built.autocast_dtype, enabled=built.autocast_dtype is not None):
                    out = run_batch(built.model, b_ids, mask, labels)
                built.optimizer.zero_grad(set_to_none=True)
                (built.scaler.scale(out.loss) if built.scaler else out.loss).backward()
                if built.scaler:
                    built.scaler.step(built.optimizer)
                    built.scaler.update()
                else:
                    built.optimizer.step()
                built.scheduler.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if step:  # the first step warms up kernels and allocator
                    times.append(time.perf_counter() - t)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            sec = sum(times) / len(times)
            total, trainable = count_parameters(built.model)
            report["variants"][variant] = {"seconds_per_step": sec, "peak_gib": peak, "loss": out.loss.item(),
                                           "trainable_params": trainable, "total_params": total}
            print(f"[dry run {variant}] {sec:.3f} s/step at batch {args.batch_size} x {args.max_length} tokens; "
                  f"peak GPU memory {'n/a (CPU)' if peak is None else f'{peak:.2f} GiB'}")
            del built, out
    return report


# ----------------------------------------------------------------------------- report


def report_7b(m: dict, small: dict | None) -> str:
    s = m["study"]
    lines = rep.report_header(m, "Experiment 2: Qwen2.5-7B with QLoRA on SST-2")
    first = next(iter(m["models"].values()), None)
    if first:
        lines += [f"Trainable parameters: {first['trainable_params']:,} of {first['total_params']:,} "
                  f"({first['info'].get('trainable_percent', 0):.2f} %; study: ~41 M of ~4.4 B, 0.94 %) · compute dtype "
                  f"{first['info'].get('compute_dtype')}", ""]
    lines += ["## Validation accuracy (%)", "", *rep.accuracy_table(m), *rep.per_seed_table(m)]
    lines += ["### Per epoch, beside the study (first seed)", "", "| Model | " + " | ".join(
        f"Epoch {e} (ours / study)" for e in range(1, 4)) + " | Minutes (ours / study, RTX 4080) |", "|---|---|---|---|---|"]
    for v, mm in m["models"].items():
        hist = mm["runs"][0]["history"]
        cells = [f"{rep._f(hist[e]['val_acc']) if e < len(hist) else '–'} / {s['epochs'][v][e]:.2f}" for e in range(3)]
        lines.append(f"| {rep.LABELS[v]} | " + " | ".join(cells) + f" | {mm['runs'][0]['minutes']:.1f} / {s['minutes'][v]} |")
    lines += ["", "### Training dynamics, last epoch (first seed)", "",
              "| Model | Train loss | Train sent loss | Train LM loss | Train acc | Study (loss / sent / LM / acc) |", "|---|---|---|---|---|---|"]
    for v, mm in m["models"].items():
        h = mm["runs"][0]["history"][-1]
        st = " / ".join("–" if x is None else f"{x}" for x in s["train_epoch3"][v])
        lines.append(f"| {rep.LABELS[v]} | {rep._f(h['train_loss'], 3)} | {rep._f(h['train_sent_loss'], 3)} | "
                     f"{rep._f(h['train_lm_loss'], 3)} | {rep._f(h['train_acc'])} | {st} |")
    lines += ["", f"Validation LM loss per epoch (study: {s['val_lm_loss'][0]} → {s['val_lm_loss'][1]}): " + "; ".join(
        f"{v} " + " → ".join(rep._f(h["val_lm_loss"], 2) for h in mm["runs"][0]["history"])
        for v, mm in m["models"].items() if mm["runs"][0]["history"][0]["val_lm_loss"] is not None), ""]
    lines += rep.hypothesis_section(m)
    lines += rep.engram_section(m, s["engram"])
    lines += rep.probe_section(m)
    lines += rep.summary_section(m)
    lines += cross_scale_section(small, m)
    lines += ["## Figures", "", "![learning curves](learning_curves.png)", "", "![engram clusters](engram_clusters.png)", ""]
    lines += rep.history_section(m)
    return "\n".join(lines)


def cross_scale_section(small: dict | None, big: dict) -> list[str]:
    if not small or not small.get("models") or not big.get("models"):
        return []
    from experiment import STUDY as SMALL_STUDY

    lines = ["## Cross-scale comparison", "", f"Small run: `{small['command']}`.", "",
             "### Accuracy (best validation, %)", "", "| Model | Small (ours / study) | 7B (ours / study) | Improvement (ours / study) |", "|---|---|---|---|"]
    for v in big["models"]:
        if v not in small["models"]:
            continue
        a, b = small["models"][v]["best_val_acc"]["mean"], big["models"][v]["best_val_acc"]["mean"]
        sa, sb = SMALL_STUDY["best"][v], STUDY["best"][v]
        lines.append(f"| {rep.LABELS[v]} | {a:.2f} / {sa:.2f} | {b:.2f} / {sb:.2f} | {b - a:+.2f} / {sb - sa:+.2f} |")
    for h, title in (("H1", "Dual-objective effect (Model 2 − Model 1)"), ("H2", "Engram effect (Model 3 − Model 2)")):
        lines += ["", f"### {title}", "", "| Scale | Best delta (ours) | Final delta (ours) | Verdict | Study |", "|---|---|---|---|---|"]
        for name, m in (("Small", small), ("7B", big)):
            d = m["hypotheses"].get(h)
            if d:
                lines.append(f"| {name} | {d['delta_best']['mean']:+.2f} | {d['delta_final']['mean']:+.2f} | {d['verdict']} | {d['study_delta']:+.2f} |")
    if small.get("engram") and big.get("engram"):
        lines += ["", "### Engram representation quality", "", "| Metric | Small (ours / study) | 7B (ours / study) |", "|---|---|---|",
                  f"| Adjusted Rand Index | {small['engram']['ari']['mean']:.3f} / {SMALL_STUDY['engram']['ari']} | "
                  f"{big['engram']['ari']['mean']:.3f} / {STUDY['engram']['ari']} |",
                  f"| Cluster accuracy (%) | {100 * small['engram']['cluster_accuracy']['mean']:.1f} / {SMALL_STUDY['engram']['cluster_accuracy']} | "
                  f"{100 * big['engram']['cluster_accuracy']['mean']:.1f} / {STUDY['engram']['cluster_accuracy']} |"]
    return lines + [""]


# ----------------------------------------------------------------------------- main


def main(argv=None):
    return cli_main(parse_args, run, argv)


def run(args, argv):
    validate_common(args)
    device = resolve_device(args.device)
    if args.load_in_4bit:
        check_bitsandbytes(device)
    if args.dry_run:
        return dry_run(args, device)
    out = check_writable(args.out)
    check_model_source(args.model)
    data = load_sst2(args.data_dir)
    extra = parse_extra_eval(args.extra_eval)
    tok = load_tokenizer(args.model)

    def encode(split) -> Encoded:
        return encode_split(tok, split, args.max_length)

    train = encode(data["train"].head(args.max_train))
    evals = {"validation": encode(data["validation"].head(args.max_eval)), **{k: encode(v) for k, v in extra.items()}}
    build, compute_dtype = make_builder(args, device, args.model)
    recipe = Recipe("7b", build, args.batch_size, args.epochs, device, progress=not args.no_progress)
    header = {
        **rep.run_header("7b", "experiment_7b.py", argv, args, DEFAULT_EPOCHS),
        "compute_dtype": str(compute_dtype).replace("torch.", ""),
        "peak_gpu_gib": None,  # filled after every variant on a GPU
        "versions": rep.versions(),
        "device": rep.device_name(device),
        "seeds": args.seeds,
        "data": {"train": len(train), "validation": len(evals["validation"]), **rep.data_source(args, extra)},
    }
    small = json.loads(args.small_results.read_text()) if args.small_results.is_file() else None
    panels = [("validation accuracy (%)", [("val_acc", "val")]),
              ("sentiment loss", [("train_sent_loss", "train"), ("val_sent_loss", "val")]),
              ("LM loss", [("train_lm_loss", "train"), ("val_lm_loss", "val")])]
    print(f"7B experiment: {args.model}, {len(train):,} train / {len(evals['validation']):,} validation rows, "
          f"device {rep.device_name(device)}, seeds {args.seeds}")
    return rep.run_and_report(recipe, args, train, evals, out, header, STUDY, panels, lambda m: report_7b(m, small))


if __name__ == "__main__":
    main()
