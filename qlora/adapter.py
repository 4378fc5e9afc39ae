"""A run's saved LoRA adapter on a freshly loaded base: the base the run names (or another given),
loaded as the run loaded it (4-bit NF4 unless it ran with --no-4bit), the adapter on it with PEFT's
PeftModel.from_pretrained, inside the variant's EngramModel (its heads still untrained: the caller
loads the saved ones)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from models import EngramModel, HFBackbone, ModelSpec, mlp_sentiment_head
from qlora import loading as qlora
from train.stop import UsageError
from train.weights import HEAD_MODULES


def with_adapter(folder: Path, meta: dict, device: torch.device, model: str | None, cache_dir: Path | None):
    """(EngramModel with the adapter, tokenizer, autocast dtype or None) for the weights in `folder`."""
    from peft import PeftModel

    cfg = meta["config"]
    path = qlora.resolve_model_source(model or cfg["base_model"], cache_dir)
    compute_dtype, _ = qlora.precision(device)
    if cfg["load_in_4bit"]:
        qlora.check_bitsandbytes(device)
    lm = qlora.load_base(path, device, compute_dtype, cfg["load_in_4bit"], checkpointing=False)
    try:
        with warnings.catch_warnings():  # peft's own call of a deprecated transformers name, as in qlora.with_lora
            warnings.filterwarnings(
                "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
            )
            lm = PeftModel.from_pretrained(lm, str(folder / "adapter"))
    except Exception as e:  # a missing file, or an adapter of another base
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"the adapter in {folder / 'adapter'} does not load on {path} ({first})") from None
    qlora.keep_training_layout(lm)  # the layout the run evaluated in (its CPU 4-bit kernels' numbers)
    backbone = HFBackbone(lm, compute_dtype if cfg["autocast"] else None)
    spec = ModelSpec(
        variant=meta["variant"],
        pooling=cfg["pooling"],
        engram_dim=cfg["engram_dim"],
        sent_weight=cfg["sent_weight"],
        lm_weight=cfg["lm_weight"],
        lm_chunk_rows=cfg["lm_chunk_rows"],
        prefix_predicts_first=cfg["prefix_predicts_first"],
    )
    engram_model = EngramModel(backbone, spec, mlp_sentiment_head(backbone.hidden_size, cfg["head_width"]))
    for name in HEAD_MODULES:
        if getattr(engram_model, name) is not None:
            getattr(engram_model, name).to(device=device, dtype=torch.float32)
    tok = qlora.load_tokenizer(path)
    autocast = compute_dtype if cfg["autocast"] and compute_dtype != torch.float32 else None
    return engram_model, tok, autocast
