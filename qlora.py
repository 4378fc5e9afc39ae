"""Loading a causal LM for QLoRA: the precision a device gets, the checks on a model source, the
tokenizer, the 4-bit (or unquantised) base model, and the LoRA-wrapped EngramModel on top of it."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from cli import UsageError
from data import Encoded
from models import EngramModel, HFBackbone, ModelSpec, mlp_sentiment_head

DEFAULT_MODEL = "Qwen/Qwen2.5-7B"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


def build_qlora_model(args, variant: str, device: torch.device, compute_dtype: torch.dtype, model_path: str,
                      preset=None) -> EngramModel:
    """`preset` (a protocols.BigProtocol) sets the pooling and the loss weights; default: written."""
    if preset is None:
        from protocols import BIG

        preset = BIG["written"]
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
    spec = ModelSpec(variant=variant, pooling=preset.pooling, engram_dim=args.engram_dim, sent_weight=preset.sent_weight,
                     lm_weight=preset.lm_weight, lm_chunk_rows=args.lm_chunk_rows,
                     prefix_predicts_first=preset.prefix_predicts_first)
    model = EngramModel(backbone, spec, mlp_sentiment_head(backbone.hidden_size, args.head_width))
    # Heads are created in fp32 and stay fp32; only they and the LoRA weights are trainable.
    for module in (model.sentiment_head, model.compressor, model.projector):
        if module is not None:
            module.to(device=device, dtype=torch.float32)
    return model


