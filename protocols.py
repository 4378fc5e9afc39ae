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
# Every figure is the study's own, read from the results files its code wrote (github.com/MikeyBeez/
# sentiment, commit 74b97c0): `results/results.json` (small) and `results_7b/results.json` (7B). The
# code stored best and final small accuracies unrounded and everything else rounded to 4 decimals;
# each rounded accuracy is one count out of the 872 validation rows, so the deltas below are computed
# from those counts (exact), never from rounded percentages.

N_VAL = 872


def _pct(correct: int) -> float:
    return 100 * correct / N_VAL


def _deltas(best: dict, final: dict) -> dict:
    """H1 = dual_head - sentiment_only, H2 = dual_engram - dual_head, in points, best and final epoch."""
    pairs = {"H1": ("dual_head", "sentiment_only"), "H2": ("dual_engram", "dual_head")}
    return {
        kind: {h: acc[a] - acc[b] for h, (a, b) in pairs.items()} for kind, acc in (("best", best), ("final", final))
    }


SMALL_STUDY = {
    "source": "github.com/MikeyBeez/sentiment@74b97c0 results/results.json",
    # best_val / final_val, stored unrounded: 700, 706, 692 and 696, 706, 692 of 872
    "best": {"sentiment_only": _pct(700), "dual_head": _pct(706), "dual_engram": _pct(692)},
    "final": {"sentiment_only": _pct(696), "dual_head": _pct(706), "dual_engram": _pct(692)},
    "curves": {  # val_accs and train_accs per epoch, stored rounded to 4 decimals, in %
        "val_acc": {
            "sentiment_only": [75.23, 76.72, 79.01, 79.01, 80.28, 79.70, 79.93, 79.82],
            "dual_head": [73.97, 77.41, 78.78, 80.28, 79.70, 80.16, 80.62, 80.96],
            "dual_engram": [68.81, 76.61, 77.18, 77.98, 78.56, 77.75, 79.01, 79.36],
        },
        "train_acc": {
            "sentiment_only": [67.26, 78.34, 83.32, 85.92, 87.48, 88.62, 89.31, 89.76],
            "dual_head": [64.34, 75.81, 80.64, 83.20, 84.90, 85.97, 86.83, 87.25],
            "dual_engram": [64.23, 74.82, 79.66, 82.15, 83.97, 85.21, 86.00, 86.56],
        },
    },
    "engram": {"ari": 0.2356, "cluster_accuracy": 74.31},  # engram_analysis, stored rounded to 4 decimals
    "params": {"sentiment_only": 1_297_346, "dual_head": 2_329_346, "dual_engram": 2_354_082},
    "minutes_gpu": 30,  # the write-up's figure; not in the results file
}
SMALL_STUDY["deltas"] = _deltas(SMALL_STUDY["best"], SMALL_STUDY["final"])  # H1 +0.688 / +1.147, H2 -1.606 / -1.606

# val[].accuracy per epoch: 823, 832, 839 / 836, 844, 842 / 833, 843, 843 correct of 872
_BIG_EPOCHS = {"sentiment_only": [823, 832, 839], "dual_head": [836, 844, 842], "dual_engram": [833, 843, 843]}
BIG_STUDY = {
    "source": "github.com/MikeyBeez/sentiment@74b97c0 results_7b/results.json",
    "epochs": {v: [_pct(c) for c in counts] for v, counts in _BIG_EPOCHS.items()},
    "best": {v: _pct(max(counts)) for v, counts in _BIG_EPOCHS.items()},
    "final": {v: _pct(counts[-1]) for v, counts in _BIG_EPOCHS.items()},
    "minutes": {"sentiment_only": 380.4, "dual_head": 416.5, "dual_engram": 634.5},  # training_time_min
    # train[2]: loss, sentiment loss, LM loss, accuracy (%), each the mean over the epoch's batches of
    # the per-batch means (Model 3: of the mean of its two halves), as the study's code averages them
    "train_epoch3": {
        "sentiment_only": [0.0576, 0.0576, None, 98.45],
        "dual_head": [0.4575, 0.0326, 0.8825, 98.80],
        "dual_engram": [0.7926, 0.0341, 1.5512, 98.75],
    },
    # val[].lm_loss per epoch, the mean over validation batches of each batch's mean over its targets
    "val_lm_loss": {"dual_head": [3.8771, 4.3116, 4.6865], "dual_engram": [3.886, 4.3551, 4.6955]},
    "engram": {"ari": 0.8331, "cluster_accuracy": 95.64, "within_class_cosine": 0.9533, "between_class_cosine": 0.8375},
    "trainable_params": 41e6,  # the write-up's "~41 M of ~4.4 B"; not in the results file
    "total_params": 4.4e9,
    "gpu": "RTX 4080 16 GB",
}
BIG_STUDY["deltas"] = _deltas(BIG_STUDY["best"], BIG_STUDY["final"])  # H1 +0.573 / +0.344, H2 -0.115 / +0.115
BIG_STUDY["curves"] = {"val_acc": BIG_STUDY["epochs"]}


# ----------------------------------------------------------------------------- presets


CHOICES = {
    "vocab_ties": ("alphabetical", "first_seen"),
    "positions": ("learned", "sinusoidal"),
    "init": ("normal", "torch"),
    "head": ("linear", "mlp"),
    "engram_injection": ("prefix", "concat"),
    "schedule": ("none", "cosine_per_epoch"),
    "pooling": ("last", "mean"),
    "eval_mode": ("pair", "zero"),
}


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
        name="written",
        vocab_words=7000,
        specials=("<pad>", "<unk>", "<bos>", "<eos>"),
        bos_eos=True,
        vocab_ties="alphabetical",
        d_ff=512,
        causal=True,
        norm_first=True,
        final_norm=True,
        positions="learned",
        ff_dropout=False,
        init="normal",
        head="linear",
        head_width=64,
        engram_injection="prefix",
        engram_feedback=True,
        batch_size=64,
        weight_decay=0.0,
        clip_norm=None,
        schedule="none",
        drop_last=False,
        sent_weight=0.5,
        lm_weight=0.5,
    ),
    "published": SmallProtocol(
        name="published",
        vocab_words=7998,
        specials=("<PAD>", "<UNK>"),
        bos_eos=False,
        vocab_ties="first_seen",
        d_ff=256,
        causal=False,
        norm_first=False,
        final_norm=False,
        positions="sinusoidal",
        ff_dropout=True,
        init="torch",
        head="mlp",
        head_width=64,
        engram_injection="concat",
        engram_feedback=False,
        batch_size=64,
        weight_decay=0.01,
        clip_norm=1.0,
        schedule="cosine_per_epoch",
        drop_last=True,
        sent_weight=1.0,
        lm_weight=0.3,
    ),
}

BIG = {
    "written": BigProtocol(
        name="written",
        pooling="last",
        batch_size=8,
        engram_batch_size=None,
        accum_steps=1,
        engram_accum_steps=1,
        weight_decay=0.0,
        warmup_ratio=0.03,
        clip_norm=None,
        drop_last=False,
        sent_weight=0.5,
        lm_weight=0.5,
        prefix_predicts_first=False,
        eval_mode="pair",
        autocast=True,
    ),
    "published": BigProtocol(
        name="published",
        pooling="mean",
        batch_size=8,
        engram_batch_size=4,
        accum_steps=2,
        engram_accum_steps=4,
        weight_decay=0.01,
        warmup_ratio=0.05,
        clip_norm=1.0,
        drop_last=True,
        sent_weight=0.5,
        lm_weight=0.5,
        prefix_predicts_first=True,
        eval_mode="zero",
        autocast=False,
    ),
}


# ----------------------------------------------------------------------------- the ladder
# One rung per difference between the readings (the README's table): the base protocol with that
# difference's fields taken from the other protocol. Settings that only make sense together form one
# rung. `variants`: the models whose result the difference can change (the loss weights do not touch
# Model 1's loss, the engram only Model 3).


@dataclass(frozen=True)
class Rung:
    name: str
    fields: tuple[str, ...]  # preset fields switched to the other protocol's values
    variants: tuple[str, ...]
    what: str


ALL = ("sentiment_only", "dual_head", "dual_engram")
SMALL_RUNGS = (
    Rung(
        "vocabulary",
        ("vocab_words", "specials", "bos_eos", "vocab_ties"),
        ("sentiment_only", "dual_head"),
        "vocabulary size, special tokens and the order of ties",
    ),
    Rung("attention", ("causal",), ("sentiment_only", "dual_head"), "causal or bidirectional attention"),
    Rung(
        "blocks",
        ("d_ff", "norm_first", "final_norm", "positions", "ff_dropout", "init"),
        ("sentiment_only", "dual_head"),
        "pre-LN blocks with N(0, 0.02) init, or PyTorch's post-LN layer with its init, width and dropout",
    ),
    Rung("head", ("head", "head_width"), ("sentiment_only",), "linear or MLP sentiment head"),
    Rung("loss_weights", ("sent_weight", "lm_weight"), ("dual_head",), "0.5 LM + 0.5 CE, or CE + 0.3 LM"),
    Rung(
        "engram",
        ("engram_injection", "engram_feedback"),
        ("dual_engram",),
        "prefix fed back in pairs, or concatenated and never fed back",
    ),
    Rung(
        "optimiser",
        ("weight_decay", "clip_norm", "schedule", "drop_last"),
        ("sentiment_only", "dual_head"),
        "Adam with no schedule, or AdamW with decay, cosine schedule, clipping and drop_last",
    ),
)
BIG_RUNGS = (
    Rung("pooling", ("pooling",), ALL, "last real token or mean over the sentence"),
    Rung(
        "batches",
        ("batch_size", "engram_batch_size", "accum_steps", "engram_accum_steps"),
        ALL,
        "batch size and gradient accumulation",
    ),
    Rung(
        "lm_targets",
        ("prefix_predicts_first",),
        ("dual_engram",),
        "whether the prefix position predicts the first token",
    ),
    Rung(
        "optimiser",
        ("weight_decay", "warmup_ratio", "clip_norm", "drop_last"),
        ALL,
        "decay, warm-up, clipping, drop_last",
    ),
    Rung("evaluation", ("eval_mode",), ("dual_engram",), "Model 3 evaluated in pairs or with a zero engram"),
    Rung("precision", ("autocast",), ALL, "the decoder under autocast or not"),
)


def rungs_for(presets: dict) -> tuple[Rung, ...]:
    return SMALL_RUNGS if presets is SMALL else BIG_RUNGS


def other_protocol(presets: dict, base: str) -> str:
    (other,) = [name for name in presets if name != base]
    return other


def ladder(presets: dict, rungs: tuple[Rung, ...], base: str) -> list[tuple[str, tuple[str, ...], dict]]:
    """(rung name, variants, fields it changes) for the two ends and one rung per difference: the
    base itself ("base"), each rung, and the other protocol ("other", every field)."""
    b, o = presets[base], presets[other_protocol(presets, base)]
    out = [("base", ALL, {})]
    for r in rungs:
        out.append((r.name, r.variants, {f: getattr(o, f) for f in r.fields if getattr(o, f) != getattr(b, f)}))
    out.append(
        (
            "other",
            ALL,
            {
                f.name: getattr(o, f.name)
                for f in dataclasses.fields(o)
                if f.name != "name" and getattr(o, f.name) != getattr(b, f.name)
            },
        )
    )
    return out


def ladder_names(presets: dict) -> tuple[str, ...]:
    """Every rung's name, the two ends included, for --rung's choices."""
    return ("base", *(r.name for r in rungs_for(presets)), "other")


def rung_preset(presets: dict, rungs: tuple[Rung, ...], base: str, rung: str):
    """The base preset with `rung`'s fields from the other protocol (one rung of the ladder)."""
    for name, _, fields in ladder(presets, rungs, base):
        if name == rung:
            return dataclasses.replace(presets[base], **fields), fields
    raise ValueError(f"--rung {rung}: choose from {', '.join(n for n, _, _ in ladder(presets, rungs, base))}")


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
    """The preset `args.protocol`, with `--rung NAME`'s fields switched to the other protocol's (one
    rung of the ladder), then every `--set FIELD=VALUE` (any field of the preset; how one difference
    between the readings is tried alone), then every explicitly given flag.

    flag_fields maps an argparse dest to the preset field it overrides; a flag left at None keeps
    the preset's value, and the resolved value is written back to args. Returns (preset, overrides)."""
    preset = presets[args.protocol]
    overrides = {}
    if getattr(args, "rung", None):  # one rung of the ladder: the base with one difference switched
        _, overrides = rung_preset(presets, rungs_for(presets), args.protocol, args.rung)
        overrides = dict(overrides)
    for item in getattr(args, "set", None) or []:
        name, value = parse_setting(preset, item)
        if value != getattr(presets[args.protocol], name):
            overrides[name] = value
        else:
            overrides.pop(name, None)
    preset = dataclasses.replace(presets[args.protocol], **overrides)  # raises ValueError for a value outside CHOICES
    for dest, name in flag_fields.items():
        value = getattr(args, dest)
        if value is None:
            setattr(args, dest, getattr(preset, name))
        elif value != getattr(preset, name):
            overrides[name] = value
    return dataclasses.replace(presets[args.protocol], **overrides), overrides


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
