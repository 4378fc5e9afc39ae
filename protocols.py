"""The named protocols: one frozen preset per scale and reading of the study, and the ladder between
the two readings. A protocol is data that the shared code reads; adding one is adding a preset here
(the study's own figures are in analysis/study_figures.py).

- `written`: the system the study's write-up describes (SPEC.md, the default).
- `published`: the study's code as it was run (github.com/MikeyBeez/sentiment, commit 74b97c0), less
  its waste: no padding to 64 or 128 tokens, no LM logits at pad positions (the same numbers,
  computed only where they count), and each model seeded on its own instead of one global stream.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

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

    def batch_for(self, pair_step: bool) -> int:
        """Sentences a batch: the engram's sequential-pair step (models.Variant.engram) may have its own."""
        if pair_step and self.engram_batch_size is not None:
            return self.engram_batch_size
        return self.batch_size

    def accum_for(self, pair_step: bool) -> int:
        return self.engram_accum_steps if pair_step else self.accum_steps


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


def resolve(
    presets: dict, protocol: str, rung: str | None = None, sets=(), flags: dict | None = None
) -> tuple[object, dict]:
    """The preset `protocol`, with `rung`'s fields switched to the other protocol's (one rung of the
    ladder), then every `--set FIELD=VALUE` item of `sets` (any field of the preset; how one
    difference between the readings is tried alone), then every flag given (`flags`: preset field ->
    value, None where the flag was not given). Returns (preset, overrides): the resolved preset and
    what differs from the named protocol's. Raises ValueError for a bad --set or a value outside CHOICES."""
    overrides = {}
    if rung:  # one rung of the ladder: the base with one difference switched
        _, overrides = rung_preset(presets, rungs_for(presets), protocol, rung)
        overrides = dict(overrides)
    for item in sets:
        name, value = parse_setting(presets[protocol], item)
        if value != getattr(presets[protocol], name):
            overrides[name] = value
        else:
            overrides.pop(name, None)
    preset = dataclasses.replace(presets[protocol], **overrides)
    for name, value in (flags or {}).items():
        if value is not None and value != getattr(preset, name):
            overrides[name] = value
    return dataclasses.replace(presets[protocol], **overrides), overrides


def preset_help(presets: dict, field: str, fmt=str) -> str:
    """The value of `field` under each protocol, for help texts: 'written 8, published 16'."""
    return ", ".join(f"{name} {fmt(getattr(p, field))}" for name, p in presets.items())
