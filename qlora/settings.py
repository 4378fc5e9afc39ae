"""How the causal LM is loaded and adapted, and what the dry run measures: the typed settings that
experiment_7b.py's command line becomes (the defaults here are the flags' defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "Qwen/Qwen2.5-7B"


@dataclass(frozen=True)
class CausalLM:
    """The base model, how it is loaded, its LoRA adapter and the heads' sizes."""

    model: str = DEFAULT_MODEL  # hub id, local folder or .gguf file
    max_length: int = 128  # tokens per sentence; longer ones are truncated
    gradient_checkpointing: bool = True
    cache_dir: Path | None = None  # where a .gguf base is dequantised to
    load_in_4bit: bool = True  # NF4 with double quantisation; False: unquantised
    # off is None, not False: run.json files made before --tf32 lack it, and a resume compares
    # settings, where a missing key reads as None
    tf32: bool | None = None
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    engram_dim: int = 128
    head_width: int = 256  # hidden width of the sentiment MLP head
    lm_chunk_rows: int = 256  # LM-loss rows per chunk: bounds the fp32 logits alive at once


@dataclass(frozen=True)
class DryRun:
    """--dry-run: which random (or given) model is stepped, and how many timed steps per variant."""

    dry_run: str | None = None  # "7b", "tiny", "model", or None: no dry run
    dry_run_steps: int = 3
