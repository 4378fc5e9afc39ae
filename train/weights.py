"""The weights a finished job keeps: those of the epoch validation selects ("best", the epoch the
report's best numbers come from) and of the last epoch ("final"), each in a folder of its own
beside the job's checkpoints, with what rebuilding the model needs.

    weights/best/   weights.json              what was saved: kind, variant, epoch, dtype, code, config
                    model.safetensors         small models: every parameter ...
                    vocab.json                ... and the word vocabulary
                    adapter/                  causal LMs: PEFT's save_pretrained (adapter_config.json,
                                              adapter_model.safetensors; the base id or path recorded)
                    heads.safetensors         ... the sentiment head, compressor and projector (or learned prefix)
                    kmeans.json               Model 3: K-Means (k=2) of the validation engrams of
                                              this epoch's model, for the cluster a new sentence falls in

Never the (4-bit) base model. weights.json is written last: a folder without it is incomplete.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from train.files import write_json
from train.stop import UsageError

KINDS = ("small", "causal_lm")
HEAD_MODULES = ("sentiment_head", "compressor", "projector", "learned_prefix")  # None where a variant has none


@dataclass
class WeightSpec:
    """What a run's jobs keep: `config` is the JSON rebuilding a variant needs (the small model's
    SmallConfig and loss weights, or the causal LM's base, LoRA and head settings); `vocab` the
    small models' vocabulary; `half` saves fp16 where rounding to it changes no validation prediction."""

    kind: str
    config: dict
    vocab: dict | None = None
    half: bool = False


def weights_folder(job_folder: Path, which: str) -> Path:
    return job_folder / "weights" / which


def saved_epoch(folder: Path) -> int | None:
    """The epoch whose weights `folder` holds, or None when it holds none (or an incomplete set)."""
    try:
        return int(json.loads((folder / "weights.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def half_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose floating-point weights went through fp16 and back (what loading fp16 gives)."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for t in list(twin.parameters()) + list(twin.buffers()):
            if t.is_floating_point():
                t.copy_(t.half().to(t.dtype))
    return twin


def kmeans_record(engrams: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    """The analysis's K-Means (engram.engram_metrics: k=2, n_init=10, random_state=seed) of this
    epoch's validation engrams: its centroids, and each cluster's size and share of positives."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(engrams)  # engrams [n,e]
    labels = np.asarray(labels)
    clusters = [
        {
            "size": int((km.labels_ == c).sum()),
            "positive_share": float(labels[km.labels_ == c].mean()) if (km.labels_ == c).any() else None,
        }
        for c in range(2)
    ]
    return {"seed": seed, "n": len(labels), "centroids": km.cluster_centers_.tolist(), "clusters": clusters}


def nearest_cluster(record: dict, engrams: np.ndarray) -> np.ndarray:
    """K-Means' assignment: the index of the nearest centroid of each engram [n,e] -> [n]."""
    c = np.asarray(record["centroids"], dtype=np.float64)  # [2,e]
    d = ((np.asarray(engrams, dtype=np.float64)[:, None, :] - c[None]) ** 2).sum(-1)  # [n,2]
    return d.argmin(1)


def save_weights(
    folder: Path, spec: WeightSpec, model, epoch: int, code: dict, half: bool = False, kmeans: dict | None = None
) -> Path:
    """Write one set into a temporary folder, weights.json last, and move it into place."""
    from safetensors.torch import save_file

    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = "float16" if half else None
    if spec.kind == "small":
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        if half:
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        dtype = dtype or "float32"
        save_file(state, str(tmp / "model.safetensors"))
        write_json(tmp / "vocab.json", spec.vocab)
    else:
        model.backbone.lm.save_pretrained(str(tmp / "adapter"))  # the PeftModel: adapter files only
        heads = {
            f"{m}.{k}": v.detach().cpu().contiguous()
            for m in HEAD_MODULES
            if getattr(model, m) is not None
            for k, v in getattr(model, m).state_dict().items()
        }
        save_file(heads, str(tmp / "heads.safetensors"))
        dtype = str(next(iter(heads.values())).dtype).replace("torch.", "")
    if kmeans is not None:
        write_json(tmp / "kmeans.json", kmeans)
    write_json(
        tmp / "weights.json",
        {
            "kind": spec.kind,
            "variant": model.variant,
            "epoch": epoch,
            "dtype": dtype,
            "code": code,
            "config": spec.config,
        },
    )
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)  # the previous set stays whole until the new one is in place
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def read_weights(folder: Path) -> dict:
    """weights.json of a saved set; a folder without a complete set is one UsageError line."""
    meta = folder / "weights.json"
    if not meta.is_file():
        raise UsageError(f"{folder} holds no saved weights (no weights.json): the run kept none, or is unfinished")
    try:
        saved = json.loads(meta.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{meta} cannot be read ({type(e).__name__})") from None
    if saved.get("kind") not in KINDS:
        raise UsageError(f"{meta} names an unknown kind of weights {saved.get('kind')!r}; made by other code?")
    return saved


def load_heads(model, folder: Path) -> None:
    """The sentiment head, compressor and projector of a causal-LM set into `model` (an EngramModel)."""
    from safetensors.torch import load_file

    heads = load_file(str(folder / "heads.safetensors"))
    for name in HEAD_MODULES:
        module = getattr(model, name)
        if module is None:
            continue
        mine = {k[len(name) + 1 :]: v for k, v in heads.items() if k.startswith(name + ".")}
        module.load_state_dict(mine)


@torch.no_grad()
def predicted_labels(model, enc, recipe, autocast_dtype) -> np.ndarray:
    """The labels training.evaluate predicts (its batches, its engram mode, its generator), without
    its losses: the fp16 check's pass, not one of the run's evaluations."""
    from engram import run_batch, sentiment_probabilities
    from train.data import collate
    from train.loop import autocast

    model.eval()
    bs, g, probs = recipe.batch_size(model.variant), torch.Generator().manual_seed(0), []
    for i in range(0, len(enc), bs):
        ids, mask, labels = collate(enc, np.arange(i, min(i + bs, len(enc))), recipe.device)
        with autocast(recipe.device, autocast_dtype):
            out = run_batch(model, ids, mask, labels, mode=recipe.eval_mode, generator=g)
        probs.append(sentiment_probabilities(out.sent_logits).cpu())  # [b]
    return (torch.cat(probs).numpy() > 0.5).astype(int)  # [n]


def keep_epoch(
    recipe,
    model,
    job_folder: Path,
    epoch: int,
    val_enc,
    val_pred: np.ndarray,
    becomes_best: bool,
    autocast_dtype,
    seed: int,
    code: dict,
) -> None:
    """After an epoch's evaluation, before its checkpoint (so a job stopped after its selected
    epoch still has that epoch's weights): save "best" when this epoch becomes the selected one,
    and "final" after the last epoch; a set already holding this epoch (an earlier attempt of
    the same job) is not written again. Nothing without recipe.weights."""
    from train.loop import zero_prefix_states

    spec = recipe.weights
    if spec is None:
        return
    due = [w for w, yes in (("best", becomes_best), ("final", epoch == recipe.epochs)) if yes]
    todo = [w for w in due if saved_epoch(weights_folder(job_folder, w)) != epoch]
    if not todo:
        return
    half = False
    if spec.half:  # fp16 only where it changes no validation prediction of this epoch
        half = bool(np.array_equal(predicted_labels(half_copy(model), val_enc, recipe, autocast_dtype), val_pred))
    kmeans = None
    if model.uses_engram:
        _, engrams = zero_prefix_states(model, val_enc, recipe, autocast_dtype)  # [n,e], as the analysis takes them
        kmeans = kmeans_record(engrams, val_enc.labels, seed)
    for which in todo:
        save_weights(weights_folder(job_folder, which), spec, model, epoch, code, half, kmeans)
