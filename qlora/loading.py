"""Loading a causal LM for QLoRA: the precision a device gets, the checks on a model source (a hub
id, a model folder, or a GGUF file dequantised once into a cached folder), the tokenizer, the
4-bit (or unquantised) base model, and the LoRA-wrapped EngramModel on top of it."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

from models import EngramModel, HFBackbone, ModelSpec, mlp_sentiment_head
from qlora.settings import DEFAULT_MODEL, CausalLM
from train.data import Encoded
from train.stop import UsageError

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# bitsandbytes 0.50's CPU backend, on a CPU with AVX512-BF16 (seen on an AMD EPYC), looks at import
# (peft imports it) for an optional hub kernel package, `kernels`, and logs a warning on every run
# when it is absent; that kernel only speeds up 4-bit matmuls on the CPU. Its errors still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def precision(device: torch.device) -> tuple[torch.dtype, bool]:
    """(compute dtype, needs a loss scaler): bf16 on GPUs with native bf16 (compute capability
    >= 8.0), fp32 on older GPUs and on the CPU; never a scaler. fp16 with a loss scaler is not
    offered: Qwen2 / Qwen2.5's activations overflow fp16 (inf, then NaN losses; known upstream),
    which a loss scaler, scaling only the gradients, cannot prevent (precision_note says so)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16, False
    return torch.float32, False


def precision_note(device: torch.device) -> str | None:
    """The one line a GPU without native bf16 gets: why it computes in fp32; None elsewhere."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8:
        return None
    return (
        f"note: {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no native bf16, and "
        "Qwen2/2.5 overflow in fp16, so the model computes in fp32: correct, slower, more activation memory "
        "(--dry-run shows whether it fits)"
    )


def use_tf32(enabled: bool, device: torch.device) -> str | None:
    """--tf32: fp32 matmuls (and cuDNN convolutions) on TF32 tensor cores (Ampere or newer). What
    it is for: the `published` protocol runs the decoder without autocast, so its matmuls are fp32;
    TF32 rounds their inputs to a 10-bit mantissa, so numbers change slightly. Process-wide, set
    once at start. Returns the note line to print where it does nothing (the CPU), else None."""
    if not enabled:
        return None
    if device.type != "cuda":
        return "note: --tf32 has no effect on the CPU (TF32 is a CUDA tensor-core format); fp32 matmuls stay fp32"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return None


def quiet_libraries() -> None:
    """--no-progress: the libraries' own progress bars (weights loading, downloads) off too."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass


def gguf_cache_root() -> Path:
    return Path(os.environ.get("ENGRAM_CACHE", Path.home() / ".cache" / "engram-study")) / "gguf"


@contextlib.contextmanager
def _gguf_bar_follows_transformers():
    """transformers' GGUF reader draws its "Converting and de-quantizing" bar with a bare tqdm that
    ignores its own disable_progress_bar(); make it obey that setting (--no-progress) while loading."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None or hf_logging.is_progress_bar_enabled():
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def model_from_gguf(path: Path, cache: Path | None = None) -> str:
    """Dequantise a GGUF file through transformers' GGUF reader into a cached model folder (once;
    keyed by file name, size and mtime) and return that folder. An architecture transformers
    cannot read is one UsageError line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"GGUF file {path} not found; pass --model with a .gguf file, a model folder or a hub id")
    st = path.stat()
    folder = (cache or gguf_cache_root()) / f"{path.stem}-{st.st_size}-{int(st.st_mtime)}"
    if (folder / "COMPLETE").is_file():
        return str(folder)
    print(f"dequantising {path.name} into {folder} (once; later runs reuse it)", file=sys.stderr)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        with _gguf_bar_follows_transformers():
            lm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except ImportError as e:
        raise UsageError(f"reading {path.name} needs the gguf package ({e}); pip install gguf") from None
    except Exception as e:  # transformers raises ValueError/KeyError/RuntimeError for unknown architectures
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"transformers cannot read {path} as a causal LM ({first})") from None
    # The loaded model is flagged as GGUF-quantised and refuses save_pretrained; its weights are
    # already plain fp32, so they go into a fresh model of the same config, which saves normally.
    config = lm.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(lm.state_dict())
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "COMPLETE").write_text(f"{path}\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return str(folder)


def resolve_model_source(model: str, cache: Path | None = None) -> str:
    """A .gguf file becomes its cached model folder; a folder is checked; a hub id is kept."""
    if model.lower().endswith(".gguf"):
        return model_from_gguf(Path(model), cache)
    check_model_source(model)
    return model


def check_model_source(model: str) -> None:
    """A local folder must exist and hold a causal LM's config; anything else is taken as a hub id."""
    looks_local = Path(model).exists() or model.startswith((".", "/", "~")) or model.count("/") > 1
    if not looks_local:
        return
    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise UsageError(
            f"model folder {folder} not found; pass --model with a local folder or a hub id such as {DEFAULT_MODEL}"
        )
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise UsageError(f"{folder} has no config.json: not a Hugging Face model folder")
    archs = json.loads(cfg.read_text()).get("architectures") or []
    if not any(a.endswith("ForCausalLM") for a in archs):
        raise UsageError(f"{folder} holds {archs or 'an unknown architecture'}, not a causal LM (…ForCausalLM)")


def _cause(e: BaseException) -> str:
    """One line for an exception. bitsandbytes' own errors run to a page: its banner line (between
    🚨 marks) and its "Original error:" line say what failed; other errors give their first line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    banner = [line.strip("🚨 ") for line in lines if "🚨" in line]
    original = [line for line in lines if line.startswith("Original error:")]
    said = "; ".join(banner[:1] + original[:1]) or (lines[0] if lines else "")
    return f"{type(e).__name__}: {said}" if said else type(e).__name__


def check_bitsandbytes(device: torch.device) -> None:
    """bitsandbytes imports, and quantises and dequantises one small matrix to NF4 on `device`:
    where its CUDA library failed to load, the import still succeeds (bitsandbytes installs a
    stand-in that raises only when a kernel is called, minutes later, inside the first model
    load); this makes that one UsageError line now."""
    advice = "pass --no-4bit, or install a bitsandbytes built for this device (pip install -U bitsandbytes)"
    try:
        import bitsandbytes as bnb
    except Exception as e:
        raise UsageError(
            f"4-bit loading needs bitsandbytes, which cannot run here ({_cause(e)}); "
            "install bitsandbytes for this device, or pass --no-4bit"
        ) from None
    try:
        x = torch.linspace(-1, 1, 64 * 64, device=device).reshape(64, 64)  # [64,64], blocks of 64
        q, state = bnb.functional.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
        back = bnb.functional.dequantize_4bit(q, state, quant_type="nf4")
        # rounding to NF4 errs by at most half its widest gap between levels, 0.14 of a block's
        # absmax (here at most 1): more is a broken kernel
        error = float((back.float() - x).abs().max())
    except Exception as e:
        raise UsageError(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot quantise to 4 bits on {device} "
            f"({_cause(e)}); {advice}"
        ) from None
    if not error < 0.2:
        raise UsageError(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} quantises wrongly on {device} (NF4 round trip "
            f"off by {error:.3g}); {advice}"
        )


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(
            f"could not load a tokenizer from {model} ({first}); pass --model with a local model folder, "
            "or check the hub id and the network"
        ) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def encode_split(tok, split, max_length: int) -> Encoded:
    """Token ids with the tokenizer's own special tokens, truncated at max_length."""
    ids = tok(split.sentences, truncation=True, max_length=max_length)["input_ids"]
    return Encoded(ids, split.labels, tok.pad_token_id)


def enable_checkpointing(lm) -> None:
    """Activation (gradient) checkpointing of every decoder layer, non-reentrant; the current name of
    the call where this transformers has it, the older one otherwise."""
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def bnb_config(compute_dtype: torch.dtype):
    """The study's quantisation: 4-bit NF4 with double quantisation, computing in compute_dtype."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_base(model, device: torch.device, compute_dtype: torch.dtype, load_in_4bit: bool, checkpointing: bool = True):
    """A fresh base model: 4-bit NF4 with double quantisation, prepared for k-bit training; or
    unquantised and frozen with --no-4bit. Gradient checkpointing (use_reentrant=False) unless
    `checkpointing` is False. Tied input/output embeddings stay tied and unquantised.

    `model` is a hub id or model folder, or a function (device, compute_dtype, load_in_4bit) -> a
    causal LM set up as from_pretrained sets one up (the dry run's random weights, dry_run.py)."""
    from transformers import AutoModelForCausalLM

    if callable(model):
        return prepare_base(model(device, compute_dtype, load_in_4bit), load_in_4bit, checkpointing)

    kwargs = dict(
        dtype=compute_dtype,
        trust_remote_code=False,
        device_map={"": str(device) if device.type == "cpu" else device.index or 0},
    )
    if load_in_4bit:
        kwargs["quantization_config"] = bnb_config(compute_dtype)
    try:
        lm = AutoModelForCausalLM.from_pretrained(model, **kwargs)
    except UsageError:
        raise
    except (OSError, ValueError) as e:
        raise UsageError(f"could not load a causal LM from {model}: {str(e).splitlines()[0]}") from None
    return prepare_base(lm, load_in_4bit, checkpointing)


def prepare_base(lm, load_in_4bit: bool, checkpointing: bool):
    """4-bit: prepared for k-bit training (non-quantised weights to fp32); else frozen as loaded."""
    if load_in_4bit:
        from peft import prepare_model_for_kbit_training

        # checkpointing is turned on below with the current call; peft's own path uses a deprecated one
        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=False)
    else:
        lm.requires_grad_(False)
    if checkpointing:
        enable_checkpointing(lm)
    return lm


def with_lora(lm, r: int, alpha: int, dropout: float):
    """LoRA on the seven projections of every decoder layer of a base model from load_base."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(LORA_TARGETS),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` inside get_peft_model; the
        # call is peft's, not ours, so only that one message is silenced, here only
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        lm = get_peft_model(lm, lora)
    keep_training_layout(lm)
    return lm


def keep_training_layout(lm) -> None:
    """On the CPU, bitsandbytes repacks 4-bit weights for inference at the first eval-mode call
    and then cannot train through them (in-place bias add on a graph tensor): keep training layout."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None or next(lm.parameters()).device.type != "cpu":
        return
    for m in lm.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def build_qlora_model(
    lm_settings: CausalLM, variant: str, device: torch.device, compute_dtype: torch.dtype, model_path: str, preset=None
) -> EngramModel:
    """`preset` (a protocols.BigProtocol) sets the pooling, the loss weights and whether the decoder
    runs under autocast; default: written."""
    if preset is None:
        from protocols import BIG

        preset = BIG["written"]
    s = lm_settings
    lm = load_base(model_path, device, compute_dtype, s.load_in_4bit, s.gradient_checkpointing)
    lm = with_lora(lm, s.lora_r, s.lora_alpha, s.lora_dropout)
    # under autocast the decoder's input is cast to the compute dtype; without it (the study's code)
    # the embeddings stay in their dtype, fp32 after prepare_model_for_kbit_training
    backbone = HFBackbone(lm, compute_dtype if preset.autocast else None)
    spec = ModelSpec(
        variant=variant,
        pooling=preset.pooling,
        engram_dim=s.engram_dim,
        sent_weight=preset.sent_weight,
        lm_weight=preset.lm_weight,
        lm_chunk_rows=s.lm_chunk_rows,
        prefix_predicts_first=preset.prefix_predicts_first,
    )
    model = EngramModel(backbone, spec, mlp_sentiment_head(backbone.hidden_size, s.head_width))
    # Heads are created in fp32 and stay fp32; only they and the LoRA weights are trainable.
    for module in (model.sentiment_head, model.compressor, model.projector, model.learned_prefix):
        if module is not None:
            module.to(device=device, dtype=torch.float32)
    return model


def cosine_with_warmup(opt: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """transformers' linear warm-up then cosine decay, per optimiser step (the study's schedule)."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(opt, warmup_steps, total_steps)
