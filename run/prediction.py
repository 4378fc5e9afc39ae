"""predict.py's work: rebuild a finished run's models from the weights its jobs kept (weights.py)
and give, per sentence and variant, the predicted label and its probability, and for Model 3 its
engram and the K-Means cluster of the run's validation engrams (of the same epoch's model) it falls in.

A sentence is scored alone, with a zero engram (as the first half of every evaluation batch is):
its prediction does not depend on which other sentences are given with it."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engram import run_single, sentiment_probabilities
from models import VARIANTS, EngramModel
from train.data import Encoded, Vocab, collate
from train.provenance import describe_code
from train.stop import UsageError
from train.weights import load_heads, nearest_cluster, read_weights, weights_folder

LABELS = ("negative", "positive")
BATCH = 32  # sentences per forward pass


@dataclass
class Loaded:
    """One variant rebuilt from its saved weights, and how it reads a sentence."""

    variant: str
    model: EngramModel
    encode: object  # sentence -> token ids
    pad_id: int
    autocast_dtype: torch.dtype | None
    meta: dict  # weights.json
    kmeans: dict | None  # Model 3: kmeans.json


def read_sentences(args_sentences: list[str], file: Path | None, stdin) -> list[str]:
    """The sentences of the arguments, else of --file (one a line), else of standard input (one a
    line; not a terminal); blank lines are skipped; none at all is one UsageError line."""
    if args_sentences:
        sentences = [s.strip() for s in args_sentences]
        if not all(sentences):
            raise UsageError("an empty sentence was given; give each sentence as one non-empty argument")
        return sentences
    if file is not None:
        try:
            text = file.read_text()
        except OSError as e:
            raise UsageError(f"cannot read --file {file} ({type(e).__name__})") from None
        where = str(file)
    elif stdin is not None and not stdin.isatty():
        text, where = stdin.read(), "standard input"
    else:
        raise UsageError("no sentences: give them as arguments, with --file (one a line), or on standard input")
    sentences = [line.strip() for line in text.splitlines() if line.strip()]
    if not sentences:
        raise UsageError(f"no sentences in {where}: it is empty")
    return sentences


def job_folders(run: Path, seed: int | None, which: str, variants: list[str]) -> tuple[int, dict[str, Path]]:
    """(seed, {variant: its saved set}) of a run folder: the given seed, else the first (smallest)
    seed with weights; a folder without any is one UsageError line."""
    if not run.is_dir():
        raise UsageError(f"{run} is not a folder; give the output folder of a finished run")
    root = run / "checkpoints"
    seeds = sorted(int(p.name[4:]) for p in root.glob("seed*") if p.name[4:].lstrip("-").isdigit())
    with_weights = [
        s
        for s in seeds
        if any((weights_folder(root / f"seed{s}" / v, which) / "weights.json").is_file() for v in variants)
    ]
    if seed is None:
        if not with_weights:
            raise UsageError(
                f"{run} holds no saved weights ({which}): its jobs are unfinished, or ran before weights "
                "were kept; rerun them (weights are kept from this version on)"
            )
        seed = with_weights[0]
    elif seed not in with_weights:
        raise UsageError(
            f"{run} holds no saved weights ({which}) of seed {seed}; seeds with weights: "
            f"{', '.join(map(str, with_weights)) or 'none'}"
        )
    found = {v: weights_folder(root / f"seed{seed}" / v, which) for v in variants}
    return seed, {v: f for v, f in found.items() if (f / "weights.json").is_file()}


def cannot_rebuild(folder: Path, meta: dict, reason: str) -> UsageError:
    return UsageError(
        f"this code cannot rebuild the model saved in {folder} ({reason}); it was saved by "
        f"{describe_code(meta.get('code'))}: check out that version to use it"
    )


def load_small(folder: Path, meta: dict, device: torch.device) -> Loaded:
    from safetensors.torch import load_file

    from models import SmallConfig, build_small_model

    cfg = meta["config"]
    try:
        model_cfg = SmallConfig(**cfg["model_config"])
        words = json.loads((folder / "vocab.json").read_text())
        specials = tuple(words["specials"])
        vocab = Vocab(specials, words["itos"][len(specials) :], words["bos_eos"])
    except (TypeError, KeyError, ValueError, OSError) as e:
        raise cannot_rebuild(folder, meta, f"{type(e).__name__}: {e}") from None
    if len(vocab) != model_cfg.vocab_size:
        raise cannot_rebuild(folder, meta, f"its vocabulary has {len(vocab)} words, its model {model_cfg.vocab_size}")
    model = build_small_model(meta["variant"], model_cfg, cfg["sent_weight"], cfg["lm_weight"])
    try:
        state = load_file(str(folder / "model.safetensors"))
        own = model.state_dict()
        model.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in state.items()})
    except Exception as e:  # safetensors, a missing file, or parameters this code's model does not have
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise cannot_rebuild(folder, meta, first) from None
    model.to(device).eval()
    return Loaded(
        meta["variant"], model, lambda s: vocab.encode(s, model_cfg.max_len), vocab.pad, None, meta, read_kmeans(folder)
    )


def load_causal_lm(folder: Path, meta: dict, device: torch.device, model: str | None, cache_dir: Path | None) -> Loaded:
    """The base named in the run (or `model`) with the saved adapter on it (qlora/adapter.py), and
    the saved heads."""
    from qlora.adapter import with_adapter

    engram_model, tok, autocast = with_adapter(folder, meta, device, model, cache_dir)
    try:
        load_heads(engram_model, folder)
    except Exception as e:
        raise cannot_rebuild(folder, meta, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    engram_model.eval()
    max_length = meta["config"]["max_length"]

    def encode(sentence: str) -> list[int]:
        return tok(sentence, truncation=True, max_length=max_length)["input_ids"]

    return Loaded(meta["variant"], engram_model, encode, tok.pad_token_id, autocast, meta, read_kmeans(folder))


def read_kmeans(folder: Path) -> dict | None:
    path = folder / "kmeans.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_variant(folder: Path, device: torch.device, model: str | None = None, cache_dir: Path | None = None) -> Loaded:
    meta = read_weights(folder)
    if meta.get("variant") not in VARIANTS:
        raise cannot_rebuild(folder, meta, f"unknown variant {meta.get('variant')!r}")
    if meta["kind"] == "small":
        return load_small(folder, meta, device)
    return load_causal_lm(folder, meta, device, model, cache_dir)


@torch.no_grad()
def score(loaded: Loaded, sentences: list[str], device: torch.device) -> list[dict]:
    """Each sentence alone with a zero engram: its label, that label's probability, and (Model 3)
    its engram and the nearest K-Means centroid of the validation engrams."""
    enc = Encoded([loaded.encode(s) for s in sentences], [0] * len(sentences), loaded.pad_id)
    probs, engrams = [], []
    for i in range(0, len(enc), BATCH):
        ids, mask, _ = collate(enc, np.arange(i, min(i + BATCH, len(enc))), device)
        ctx = (
            torch.autocast(device.type, dtype=loaded.autocast_dtype)
            if loaded.autocast_dtype is not None
            else torch.autocast(device.type, enabled=False)
        )
        with ctx:
            out = run_single(loaded.model, ids, mask, None)
        probs.append(sentiment_probabilities(out.sent_logits).cpu())  # [b]
        if out.engram is not None:
            engrams.append(out.engram.float().cpu())  # [b,e]
    prob = torch.cat(probs).numpy()  # [n] probability of "positive"
    engram = torch.cat(engrams).numpy() if engrams else None  # [n,e]
    clusters = nearest_cluster(loaded.kmeans, engram) if engram is not None and loaded.kmeans else None
    rows = []
    for i, sentence in enumerate(sentences):
        label = int(prob[i] > 0.5)  # as the evaluation decides
        row = {
            "sentence": sentence,
            "variant": loaded.variant,
            "label": LABELS[label],
            "probability": float(prob[i] if label else 1 - prob[i]),
            "prob_positive": float(prob[i]),
            "epoch": loaded.meta["epoch"],
        }
        if engram is not None:
            row["engram"] = [round(float(x), 6) for x in engram[i]]
        if clusters is not None:
            c = int(clusters[i])
            row["cluster"] = c
            row["cluster_size"] = loaded.kmeans["clusters"][c]["size"]
            row["cluster_positive_share"] = loaded.kmeans["clusters"][c]["positive_share"]
        rows.append(row)
    return rows


def text_lines(sentence: str, rows: list[dict]) -> list[str]:
    """One sentence's block: the sentence, then a line per variant."""
    lines = [json.dumps(sentence, ensure_ascii=False)]
    for r in rows:
        line = f"  {r['variant']:<15} {r['label']:<8} {r['probability']:.3f}"
        if "cluster" in r:
            share = r["cluster_positive_share"]
            line += (
                f"  cluster {r['cluster']} ({r['cluster_size']} validation sentences, {100 * share:.0f}% positive)"
                if share is not None
                else f"  cluster {r['cluster']}"
            )
        if "engram" in r:
            e = r["engram"]
            shown = " ".join(f"{x:+.2f}" for x in e[:6])
            line += f"  engram [{shown} … ({len(e)} values)]" if len(e) > 6 else f"  engram [{shown}]"
        lines.append(line)
    return lines


def predict(
    run: Path,
    sentences: list[str],
    *,
    which: str = "best",
    seed: int | None = None,
    variants: list[str] | None = None,
    model: str | None = None,
    cache_dir: Path | None = None,
    device: torch.device | None = None,
    as_json: bool = False,
    out=None,
) -> list[dict]:
    """Load every variant's saved set of one seed, score the sentences, print them; the rows."""
    device = device or torch.device("cpu")
    out = out or sys.stdout  # at call time: a caller (or a test) may have replaced it
    seed, folders = job_folders(run, seed, which, list(variants or VARIANTS))
    loaded = [load_variant(f, device, model, cache_dir) for f in folders.values()]
    per_variant = [score(m, sentences, device) for m in loaded]
    rows = []
    for i, sentence in enumerate(sentences):
        mine = [{**rs[i], "seed": seed, "weights": which} for rs in per_variant]
        rows += mine
        if as_json:
            for r in mine:
                print(json.dumps(r, ensure_ascii=False), file=out)
        else:
            print("\n".join(text_lines(sentence, mine)), file=out)
    if not as_json:
        epochs = ", ".join(f"{m.variant} epoch {m.meta['epoch']}" for m in loaded)
        print(f"({run}, seed {seed}, {which} weights: {epochs})", file=out)
    return rows
