"""The pieces of `experiment_7b.py --dry-run` that answer "does the study fit my 16 GB GPU, and how
fast is each variant?" on that GPU without a download, a bf16 copy of the model or 15 GB of disk.

The old dry run built Qwen2.5-7B in bf16 on the GPU (~14.2 GiB, the edge of a 16 GB card), saved it
(~15 GB of disk) and loaded it back in 4-bit for every variant. Here the random model is built the
way `from_pretrained(..., quantization_config=BitsAndBytesConfig(nf4, double quant))` builds a real
one: a skeleton on the meta device, its linear layers swapped for bitsandbytes' `Linear4bit` by
transformers' own quantizer, then each weight made from random numbers and quantised one matrix at
a time, so the GPU never holds more than one unquantised matrix (at most 18,944 x 3,584 in bf16,
136 MB, at the 7B shape) and nothing is written to disk.
"""

from __future__ import annotations

import copy
import functools
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from engram import run_batch
from models import VARIANTS, count_parameters, free_memory
from qlora.loading import bnb_config, load_tokenizer, precision, resolve_model_source
from qlora.settings import CausalLM, DryRun
from train.data import Encoded, collate
from train.provenance import device_name
from train.stop import UsageError

# Qwen2.5-7B's shape (its config.json), for the dry run without a download; and a tiny one for tests.
QWEN25_7B_SHAPE = dict(
    hidden_size=3584,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    intermediate_size=18944,
    vocab_size=152064,
    max_position_embeddings=32768,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
TINY_SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=512,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)

# An RTX 4080 ("16 GB") reports 16,376 MiB in total (nvidia-smi, torch.cuda.mem_get_info): the card
# a dry run is asked about, in GiB.
CARD_16GB_GIB = 16376 / 1024
# Memory the process holds outside PyTorch's caching allocator, which peak *reserved* memory does
# not count: the CUDA context with the kernels torch, cuBLAS and bitsandbytes load (lazily, CUDA >=
# 11.7). Typically 0.3-0.6 GiB on Ampere/Ada GPUs; 0.5 GiB is taken. A display on the same card
# (a desktop) takes more, which this cannot know.
CUDA_CONTEXT_GIB = 0.5
# what a row that runs out of GPU memory raises (torch.OutOfMemoryError is torch >= 2.5's name for it)
OUT_OF_MEMORY = tuple({torch.cuda.OutOfMemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)})


def _skeleton(config, compute_dtype: torch.dtype):
    """The causal LM for `config` with every parameter and buffer on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=compute_dtype, trust_remote_code=False)


def _random_param(module, name: str, p: torch.Tensor, device, compute_dtype, gen, std: float):
    """One parameter on `device`: quantised to NF4 if it is a Linear4bit's weight, else in its own
    dtype with transformers' usual init (normal(0, std); norms one; biases zero)."""
    import bitsandbytes as bnb

    if isinstance(p, bnb.nn.Params4bit):
        w = torch.empty(p.shape, device=device, dtype=compute_dtype).normal_(0.0, std, generator=gen)  # (out, in)
        # as transformers' Bnb4bitQuantize: the module's own Params4bit settings; .to() quantises
        q = bnb.nn.Params4bit(w, requires_grad=False, **p.__dict__).to(device)  # (out * in / 2, 1) uint8
        del w  # the one unquantised matrix alive at a time
        return q
    dtype = p.dtype if p.is_floating_point() else compute_dtype
    t = torch.empty(p.shape, device=device, dtype=dtype)  # the parameter's own shape
    if name == "bias":
        t.zero_()
    elif "Norm" in type(module).__name__:
        t.fill_(1.0)
    else:
        t.normal_(0.0, std, generator=gen)
    return torch.nn.Parameter(t, requires_grad=True)  # as from_pretrained leaves them; callers freeze


def _rebuild_buffers(lm, device) -> None:
    """Non-persistent buffers (RoPE's inv_freq) are computed in __init__ and were computed on meta:
    re-create their module on the device from its config, the way its __init__ computes them."""
    for name, module in list(lm.named_modules()):
        if not any(b is not None and b.is_meta for b in module._buffers.values()):
            continue
        if "RotaryEmbedding" not in type(module).__name__ or not hasattr(module, "config"):
            raise RuntimeError(f"cannot materialise the buffers of {name} ({type(module).__name__}) from meta")
        with torch.device(device):
            lm.set_submodule(name, type(module)(module.config))


def random_causal_lm(config, device, compute_dtype: torch.dtype, load_in_4bit: bool, seed: int = 0):
    """A transformers causal LM of `config`'s shape with random weights on `device`, set up as
    `from_pretrained(folder, quantization_config=BitsAndBytesConfig(nf4, double quant,
    compute_dtype), dtype=compute_dtype, device_map={"": device})` sets it up (the quantizer's
    module swap, `hf_quantizer`, `is_loaded_in_4bit`, `quantization_method`,
    `config.quantization_config`, eval mode), so peft's `prepare_model_for_kbit_training` and
    `get_peft_model` treat both alike. Without 4-bit: every weight in compute_dtype. Built one
    parameter at a time from a meta skeleton: never a whole unquantised copy on the device, never a
    file. Random numbers are drawn on `device` (fast on a GPU; the same `seed` gives the same model
    on the same kind of device)."""
    device = torch.device(device)
    lm = _skeleton(config, compute_dtype)
    quantizer = None
    if load_in_4bit:
        from transformers.quantizers import AutoHfQuantizer

        quantizer = AutoHfQuantizer.from_config(bnb_config(compute_dtype), pre_quantized=False)
        quantizer.validate_environment(device_map={"": str(device)})
        # transformers' own swap of nn.Linear -> bnb Linear4bit (lm_head and tied embeddings stay)
        quantizer.preprocess_model(
            model=lm, dtype=compute_dtype, device_map={"": str(device)}, checkpoint_files=None, use_kernels=False
        )
    gen = torch.Generator(device).manual_seed(seed)
    std = getattr(lm.config, "initializer_range", None) or 0.02
    for module in lm.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                module._parameters[name] = _random_param(module, name, p, device, compute_dtype, gen, std)
    _rebuild_buffers(lm, device)
    lm.tie_weights()  # a tied lm_head is the input embedding again, as from_pretrained leaves it
    if quantizer is not None:
        lm.hf_quantizer = quantizer
        quantizer.postprocess_model(lm)  # config.quantization_config, is_loaded_in_4bit
    lm.eval()
    left = [n for n, t in [*lm.named_parameters(), *lm.named_buffers()] if t.is_meta]
    assert not left, f"left on the meta device: {left}"
    return lm


def save_tiny_qwen(folder, sentences: list[str]) -> None:
    """A tiny random Qwen2 causal LM (seed 0) and a byte-level BPE tokenizer of
    Qwen's kind (pad = eos = <|endoftext|>) trained on `sentences`, saved as a local model folder:
    what the tests and benchmarks/gpu_check.py run the 7B path on."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        sentences,
        trainers.BpeTrainer(
            vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        architectures=["Qwen2ForCausalLM"],
        pad_token_id=0,
        eos_token_id=0,
    )
    Qwen2ForCausalLM(config).save_pretrained(folder)


def parameter_count(config) -> int:
    """Parameters of `config`'s causal LM (tied ones once), counted on a meta skeleton."""
    return sum(p.numel() for p in _skeleton(config, torch.float32).parameters())


def disk_needed(config, dtype: torch.dtype = torch.bfloat16, writes_weights: bool = False) -> int:
    """Bytes of disk the dry run needs for `config`'s weights. random_causal_lm writes nothing, so
    0; `writes_weights=True` gives what the old path (save_pretrained in `dtype`, then load back)
    wrote: every parameter once, ~15.2 GB for Qwen2.5-7B in bf16. No tokenizer either way: the dry
    run feeds random token ids."""
    if not writes_weights:
        return 0
    return parameter_count(config) * torch.empty((), dtype=dtype).element_size()


def check_disk(folder, needed_bytes: int) -> None:
    """One UsageError line if the file system of `folder` (or of its nearest existing parent) has
    fewer than `needed_bytes` free."""
    if needed_bytes <= 0:
        return
    where = Path(folder).expanduser().absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < needed_bytes:
        raise UsageError(
            f"the dry run needs {needed_bytes / 1e9:.1f} GB of disk in {where}, which has "
            f"{free / 1e9:.1f} GB free; free some space or point it elsewhere"
        )


def fits(
    peak_reserved_bytes: int, card_gib: float = CARD_16GB_GIB, overhead_gib: float = CUDA_CONTEXT_GIB
) -> tuple[bool, float]:
    """(fits, margin in GiB): whether peak reserved memory plus the CUDA context fits the card
    (default: an RTX 4080's 16,376 MiB = 15.99 GiB, with CUDA_CONTEXT_GIB = 0.5). Reserved, not
    allocated: the caching allocator holds the reserved bytes, and fragmentation is real."""
    if peak_reserved_bytes is None or peak_reserved_bytes < 0:
        raise ValueError(f"peak reserved memory must be a number of bytes >= 0, got {peak_reserved_bytes!r}")
    if not card_gib > 0 or overhead_gib < 0:
        raise ValueError(f"card size must be > 0 GiB and overhead >= 0 GiB, got {card_gib} and {overhead_gib}")
    margin = card_gib - overhead_gib - peak_reserved_bytes / 2**30
    return margin >= 0, margin


def peak_memory(device) -> tuple[int | None, int | None]:
    """(peak allocated, peak reserved) bytes on a CUDA device since its last reset_peak_memory_stats;
    (None, None) elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)


def dry_run_table(runs) -> str:
    """A markdown table of dry-run steps. Each run: variant, gradient_checkpointing, batch_size,
    max_length, seconds_per_step, peak_allocated_gib (or peak_gib) and peak_reserved_gib, both None
    on the CPU, where memory is "n/a (CPU)"; a run with `oom` true ran out of memory: "OOM" cells
    (fits: "no" where the card is at least 16 GB, fits_16gb False). Ends with the line saying what
    "fits" assumed."""
    lines = [
        "| Variant | Checkpointing | Batch × tokens | Seconds / step | Peak allocated (GiB) | Peak reserved (GiB) | "
        "Fits 16 GB (margin) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        alloc = r.get("peak_allocated_gib", r.get("peak_gib"))
        reserved = r.get("peak_reserved_gib")
        if r.get("oom"):
            seconds, mem = "OOM", ["OOM", "OOM", "no (OOM)" if r.get("fits_16gb") is False else "OOM"]
        elif reserved is None:
            seconds, mem = f"{r['seconds_per_step']:.3f}", ["n/a (CPU)"] * 3
        else:
            ok, margin = fits(reserved * 2**30)
            seconds = f"{r['seconds_per_step']:.3f}"
            mem = [
                "–" if alloc is None else f"{alloc:.2f}",
                f"{reserved:.2f}",
                f"{'yes' if ok else 'no'} ({margin:+.2f} GiB)",
            ]
        lines.append(
            f"| {r['variant']} | {'on' if r['gradient_checkpointing'] else 'off'} | {r['batch_size']} × "
            f"{r['max_length']} | {seconds} | " + " | ".join(mem) + " |"
        )
    lines += [
        "",
        f"Fits: peak reserved + {CUDA_CONTEXT_GIB} GiB CUDA context ≤ {CARD_16GB_GIB:.2f} GiB "
        f"(an RTX 4080's 16,376 MiB); a display on the same card needs more.",
    ]
    if any(r.get("oom") for r in runs):
        lines.append("OOM: the row ran out of memory on this device; the rows after it ran on.")
    return "\n".join(lines)


def card_gib(device) -> float | None:
    """The GPU's total memory in GiB; None on the CPU."""
    device = torch.device(device)
    return torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None


# ----------------------------------------------------------------------------- the dry run


def _time_steps(built, enc: Encoded, device: torch.device, steps: int) -> tuple[float, float]:
    """Seconds per optimizer step (after one warm-up step) and the last loss, on one fixed batch."""
    # in training mode, as training.train_variant trains: from_pretrained (and random_causal_lm)
    # leave the model in eval mode, where transformers skips gradient checkpointing altogether
    built.model.train()
    times = []
    for step in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        ids, mask, labels = collate(enc, range(len(enc)), device)
        with torch.autocast(device.type, dtype=built.autocast_dtype, enabled=built.autocast_dtype is not None):
            out = run_batch(built.model, ids, mask, labels)
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
        if step:  # the first step warms up kernels and the allocator
            times.append(time.perf_counter() - t)
    return sum(times) / len(times), out.loss.item()


def _one_row(build, variant: str, enc: Encoded, device: torch.device, steps: int) -> dict:
    """Build one variant, time `steps` training steps on `enc`, and measure: the row's numbers.
    The model lives only in this frame, so that it is garbage once the row ends, however it ends."""
    built = build(variant, 0, steps + 1)
    sec, loss = _time_steps(built, enc, device, steps)
    allocated, reserved = peak_memory(device)
    total, trainable = count_parameters(built.model)
    row = {
        "oom": False,
        "seconds_per_step": sec,
        "loss": loss,
        "trainable_params": trainable,
        "total_params": total,
        "peak_allocated_gib": None if allocated is None else allocated / 2**30,
        "peak_reserved_gib": None if reserved is None else reserved / 2**30,
        "fits_16gb": None,
    }
    if reserved is not None:
        row["fits_16gb"], row["margin_gib"] = fits(reserved)
    return row


def dry_run(lm: CausalLM, dry: DryRun, lr: float, device: torch.device, preset, make_builder) -> dict:
    """Each variant's real training step at the preset's batch size and --max-length, checkpointing on and
    off, on random weights of Qwen2.5-7B's shape (no download), a tiny one, or --model; prints the table."""
    from transformers import Qwen2Config

    compute_dtype, _ = precision(device)
    report = {
        "shape": dry.dry_run,
        "device": device_name(device),
        "max_length": lm.max_length,
        "protocol": preset.name,
        "compute_dtype": str(compute_dtype).replace("torch.", ""),
        "disk_needed_bytes": 0,
        "runs": [],
    }
    if dry.dry_run == "model":
        source = resolve_model_source(lm.model, lm.cache_dir)
        vocab = len(load_tokenizer(source))
    else:
        shape = QWEN25_7B_SHAPE if dry.dry_run == "7b" else TINY_SHAPE
        config = Qwen2Config(**shape, architectures=["Qwen2ForCausalLM"])
        vocab = shape["vocab_size"]
        source = functools.partial(random_causal_lm, config, seed=0)  # (device, compute_dtype, load_in_4bit)
        print(
            f"random {dry.dry_run} weights ({parameter_count(config):,} parameters), built on {device} one matrix "
            "at a time: no download, no disk"
        )
    g = torch.Generator().manual_seed(0)
    for checkpointing in (True, False):
        build, _ = make_builder(replace(lm, gradient_checkpointing=checkpointing), lr, device, source, preset)
        for variant in VARIANTS:
            bs = preset.batch_for(VARIANTS[variant].engram)
            ids = torch.randint(0, vocab, (bs, lm.max_length), generator=g)  # [bs,T] random tokens
            row = {
                "variant": variant,
                "gradient_checkpointing": checkpointing,
                "batch_size": bs,
                "max_length": lm.max_length,
            }
            label = f"[dry run {variant}, checkpointing {'on' if checkpointing else 'off'}]"
            free_memory(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                row.update(
                    _one_row(
                        build, variant, Encoded(ids.tolist(), [i % 2 for i in range(bs)]), device, dry.dry_run_steps
                    )
                )
                print(
                    f"{label} {row['seconds_per_step']:.3f} s/step at batch {bs} x {lm.max_length} tokens"
                    + (
                        ""
                        if row["peak_reserved_gib"] is None
                        else f"; peak reserved {row['peak_reserved_gib']:.2f} GiB"
                    )
                )
            except OUT_OF_MEMORY as e:
                # one row too big for this GPU must not lose the others: record it, free it, go on
                gib = card_gib(device)
                row.update(
                    oom=True,
                    seconds_per_step=None,
                    loss=None,
                    trainable_params=None,
                    total_params=None,
                    peak_allocated_gib=None,
                    peak_reserved_gib=None,
                    fits_16gb=False if gib is not None and gib >= CARD_16GB_GIB else None,
                )
                print(
                    f"{label} out of memory at batch {bs} x {lm.max_length} tokens "
                    f"({str(e).splitlines()[0] if str(e) else ''})"
                )
            report["runs"].append(row)
            free_memory(device)  # after the except clause: its traceback no longer holds the row's model
    report["table"] = dry_run_table(report["runs"])
    print(
        f"\nDry run, protocol {preset.name}, {report['device']}, compute dtype {report['compute_dtype']}:"
        f"\n\n{report['table']}"
    )
    return report
