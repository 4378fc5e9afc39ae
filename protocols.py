"""The study's published figures, and the named protocols: one frozen preset per scale and reading
of the study. A protocol is data that the shared code reads; adding one is adding a preset here.

- `written`: the system the study's write-up describes (SPEC.md, the default).
- `published`: the study's code as it was run (github.com/MikeyBeez/sentiment, commit 74b97c0), less
  its waste: no padding to 64 or 128 tokens, no LM logits at pad positions (the same numbers,
  computed only where they count), and each model seeded on its own instead of one global stream.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# ----------------------------------------------------------------------------- the study's figures

SMALL_STUDY = {
    # deltas in points as the study states them (from unrounded accuracies): best epoch and final epoch
    "deltas": {"best": {"H1": 0.69, "H2": -1.61}, "final": {"H1": 1.14, "H2": -1.60}},
    "best": {"sentiment_only": 80.28, "dual_head": 80.96, "dual_engram": 79.36},
    "final": {"sentiment_only": 79.82, "dual_head": 80.96, "dual_engram": 79.36},
    "curves": {  # the published per-epoch validation accuracy (%)
        "val_acc": {
            "sentiment_only": [75.23, 76.72, 79.01, 79.01, 80.28, 79.70, 79.93, 79.82],
            "dual_head": [73.97, 77.41, 78.78, 80.28, 79.70, 80.16, 80.62, 80.96],
            "dual_engram": [68.81, 76.61, 77.18, 77.98, 78.56, 77.75, 79.01, 79.36],
        },
    },
    "train_acc_first_last": {"sentiment_only": [67.3, 89.8], "dual_head": [64.3, 87.3], "dual_engram": [64.2, 86.6]},
    "engram": {"ari": 0.236, "cluster_accuracy": 74.3},
    "params": {"sentiment_only": 1_297_346, "dual_head": 2_329_346, "dual_engram": 2_354_082},
    "minutes_gpu": 30,
}

BIG_STUDY = {
    "deltas": {"best": {"H1": 0.57, "H2": -0.12}, "final": {"H1": 0.34, "H2": 0.11}},
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
BIG_STUDY["curves"] = {"val_acc": BIG_STUDY["epochs"]}


# ----------------------------------------------------------------------------- presets


CHOICES = {"vocab_ties": ("alphabetical", "first_seen"), "positions": ("learned", "sinusoidal"), "init": ("normal", "torch"),
           "head": ("linear", "mlp"), "engram_injection": ("prefix", "concat"), "schedule": ("none", "cosine_per_epoch"),
           "pooling": ("last", "mean"), "eval_mode": ("pair", "zero")}


class _Checked:
    def __post_init__(self):
        for name, allowed in CHOICES.items():
            if hasattr(self, name) and getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class SmallProtocol(_Checked):
    """Every setting of the small experiment that the two readings of the study disagree on."""

    name: str
    # vocabulary and input
    vocab_words: int  # most frequent training words kept, after the specials
    specials: tuple[str, ...]  # pad and unk first; then bos and eos when bos_eos
    bos_eos: bool  # wrap each sentence in <bos> ... <eos>
    vocab_ties: str  # "alphabetical" or "first_seen": the order of equally frequent words
    # backbone (models.SmallConfig fields of the same names)
    d_ff: int
    causal: bool  # causal attention, or bidirectional with a key-padding mask
    norm_first: bool  # pre-LN blocks, or post-LN
    final_norm: bool  # a LayerNorm after the last block
    positions: str  # "learned" or "sinusoidal"
    ff_dropout: bool  # dropout inside the feed-forward block too
    init: str  # "normal" (N(0, 0.02)) or "torch" (PyTorch's default inits)
    head: str  # sentiment head: "linear" or "mlp"
    head_width: int  # hidden width of the mlp head
    # engram
    engram_injection: str  # "prefix" embedding, or "concat" to every position's input
    engram_feedback: bool  # sequential pairs in training and evaluation; False: the engram passed in is always zero
    # optimiser and loop
    batch_size: int
    weight_decay: float  # 0 gives Adam's update (decoupled decay of AdamW otherwise)
    clip_norm: float | None  # gradient-norm clipping
    schedule: str  # "none" or "cosine_per_epoch" (CosineAnnealingLR over the epochs, stepped per epoch)
    drop_last: bool
    # loss: sent_weight * CE(sentiment) + lm_weight * LM for the dual variants
    sent_weight: float
    lm_weight: float

    @property
    def engram_mode(self) -> str:
        """How dual_engram runs a batch (engram.run_batch): pairs, or a zero engram throughout."""
        return "pair" if self.engram_feedback else "zero"


@dataclass(frozen=True)
class BigProtocol(_Checked):
    """Every setting of the 7B experiment that the two readings of the study disagree on."""

    name: str
    pooling: str  # "last" real token or "mean" over the sentence's tokens
    batch_size: int  # Models 1 and 2: examples per forward batch
    engram_batch_size: int | None  # Model 3: examples per forward batch (two halves); None: batch_size
    accum_steps: int  # Models 1 and 2: forward batches per optimizer step
    engram_accum_steps: int  # Model 3
    weight_decay: float
    warmup_ratio: float  # of all optimizer steps, linear warm-up then cosine decay
    clip_norm: float | None
    drop_last: bool
    sent_weight: float
    lm_weight: float
    prefix_predicts_first: bool  # with the prefix, its position predicts the sentence's first token
    eval_mode: str  # how dual_engram is evaluated: "pair", or "zero" (a zero engram for every example)
    # True: the decoder runs under autocast in the compute dtype (bf16 / fp16 on a GPU), its input
    # embeddings cast to it. False (the study's code): no autocast; after prepare_model_for_kbit_training
    # the embeddings, norms, residual stream, attention and LoRA compute in fp32, and only the 4-bit
    # matmuls in the compute dtype (bitsandbytes casts their input to it and their output back).
    # On the CPU the compute dtype is fp32 and both settings compute alike.
    autocast: bool

    def batch_for(self, variant: str) -> int:
        if variant == "dual_engram" and self.engram_batch_size is not None:
            return self.engram_batch_size
        return self.batch_size

    def accum_for(self, variant: str) -> int:
        return self.engram_accum_steps if variant == "dual_engram" else self.accum_steps


SMALL = {
    "written": SmallProtocol(
        name="written", vocab_words=7000, specials=("<pad>", "<unk>", "<bos>", "<eos>"), bos_eos=True,
        vocab_ties="alphabetical", d_ff=512, causal=True, norm_first=True, final_norm=True, positions="learned",
        ff_dropout=False, init="normal", head="linear", head_width=64, engram_injection="prefix", engram_feedback=True,
        batch_size=64, weight_decay=0.0, clip_norm=None, schedule="none", drop_last=False, sent_weight=0.5, lm_weight=0.5,
    ),
    "published": SmallProtocol(
        name="published", vocab_words=7998, specials=("<PAD>", "<UNK>"), bos_eos=False, vocab_ties="first_seen",
        d_ff=256, causal=False, norm_first=False, final_norm=False, positions="sinusoidal", ff_dropout=True, init="torch",
        head="mlp", head_width=64, engram_injection="concat", engram_feedback=False,
        batch_size=64, weight_decay=0.01, clip_norm=1.0, schedule="cosine_per_epoch", drop_last=True, sent_weight=1.0,
        lm_weight=0.3,
    ),
}

BIG = {
    "written": BigProtocol(
        name="written", pooling="last", batch_size=8, engram_batch_size=None, accum_steps=1, engram_accum_steps=1,
        weight_decay=0.0, warmup_ratio=0.03, clip_norm=None, drop_last=False, sent_weight=0.5, lm_weight=0.5,
        prefix_predicts_first=False, eval_mode="pair", autocast=True,
    ),
    "published": BigProtocol(
        name="published", pooling="mean", batch_size=8, engram_batch_size=4, accum_steps=2, engram_accum_steps=4,
        weight_decay=0.01, warmup_ratio=0.05, clip_norm=1.0, drop_last=True, sent_weight=0.5, lm_weight=0.5,
        prefix_predicts_first=True, eval_mode="zero", autocast=False,
    ),
}


def parse_setting(preset, item: str) -> tuple[str, object]:
    """'FIELD=VALUE' for `--set`: VALUE is read as the field's type (true/false, a number, a word,
    or none for an optional number). A wrong field or value raises ValueError with the reason."""
    name, sep, text = item.partition("=")
    fields = {f.name: f for f in dataclasses.fields(preset) if f.name != "name"}
    if not sep or name not in fields:
        raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}")
    current = getattr(preset, name)
    t = text.strip().lower()
    try:
        if isinstance(current, bool):
            if t not in ("true", "false"):
                raise ValueError("expected true or false")
            return name, t == "true"
        if isinstance(current, tuple):
            raise ValueError("a list of words cannot be set from the command line")
        if t == "none" and ("None" in str(fields[name].type)):
            return name, None
        if isinstance(current, int):
            return name, int(text)
        if isinstance(current, float) or current is None:
            return name, float(text)
        return name, text.strip()
    except ValueError as e:
        raise ValueError(f"--set {item!r}: {e}") from None


def resolve(presets: dict, args, flag_fields: dict[str, str]):
    """The preset `args.protocol` with every explicitly given flag applied over it, then every
    `--set FIELD=VALUE` (any field of the preset; how one difference between the readings is tried
    alone).

    flag_fields maps an argparse dest to the preset field it overrides; a flag left at None keeps
    the preset's value, and the resolved value is written back to args. Returns (preset, overrides)."""
    preset = presets[args.protocol]
    overrides = {}
    for item in getattr(args, "set", None) or []:
        name, value = parse_setting(preset, item)
        if value != getattr(preset, name):
            overrides[name] = value
    preset = dataclasses.replace(preset, **overrides)  # raises ValueError for a value outside CHOICES
    for dest, name in flag_fields.items():
        value = getattr(args, dest)
        if value is None:
            setattr(args, dest, getattr(preset, name))
        elif value != getattr(preset, name):
            overrides[name] = value
    return dataclasses.replace(preset, **overrides), overrides


def parse_with_preset(parser, argv, presets: dict, flag_fields: dict[str, str]):
    """parser.parse_args, then the flags left unset filled from the chosen preset; a bad --set is
    the parser's own one-line error (exit status 2)."""
    args = parser.parse_args(argv)
    try:
        resolve(presets, args, flag_fields)
    except ValueError as e:
        parser.error(str(e))
    return args


def preset_help(presets: dict, field: str, fmt=str) -> str:
    """The value of `field` under each protocol, for help texts: 'written 8, published 16'."""
    return ", ".join(f"{name} {fmt(getattr(p, field))}" for name, p in presets.items())
