"""dry_run.py: a random causal LM built without a bf16 copy or a file, set up as from_pretrained sets
up a real one (4-bit NF4 with double quantisation, or unquantised), and the dry run's report."""

import collections
import gc
import shutil
import struct
import weakref
from collections import namedtuple

import pytest
import torch

import experiment_7b as e7
from models import VARIANTS
from qlora import dry_run
from qlora import loading as qlora
from qlora.dry_run import check_disk, disk_needed, dry_run_table, fits, parameter_count, random_causal_lm
from train.stop import UsageError

SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=512,
    max_position_embeddings=256,
)


def qwen_config(tied=False):
    from transformers import Qwen2Config

    return Qwen2Config(**SHAPE, tie_word_embeddings=tied, architectures=["Qwen2ForCausalLM"])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The same tiny shape saved by save_pretrained (fp32), untied and tied."""
    from transformers import Qwen2ForCausalLM

    out = {}
    for tied in (False, True):
        out[tied] = tmp_path_factory.mktemp(f"tiny_qwen_tied{tied}")
        torch.manual_seed(0)
        Qwen2ForCausalLM(qwen_config(tied)).save_pretrained(out[tied])
    return out


def loaded(folder, dtype, load_in_4bit):
    """The reference: what qlora.load_base's from_pretrained gives on the CPU."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=dtype, device_map={"": "cpu"})
    if load_in_4bit:
        kwargs["quantization_config"] = qlora.bnb_config(dtype)
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs)


def structure(lm):
    """Module names and types, parameter signatures, the parameter count, buffers and config."""
    modules = {(n, type(m).__name__) for n, m in lm.named_modules()}
    params = {(n, type(p).__name__, p.dtype, tuple(p.shape), p.requires_grad) for n, p in lm.named_parameters()}
    buffers = {n: b for n, b in lm.named_buffers()}
    config = {k: v for k, v in lm.config.to_dict().items() if k != "_name_or_path"}
    return modules, params, sum(p.numel() for p in lm.parameters()), buffers, config


def assert_same_structure(ours, ref):
    m1, p1, n1, b1, c1 = structure(ours)
    m2, p2, n2, b2, c2 = structure(ref)
    assert m1 == m2
    assert p1 == p2
    assert n1 == n2
    assert b1.keys() == b2.keys() and all(torch.equal(b1[k], b2[k]) for k in b1)  # RoPE inv_freq computed, not meta
    assert c1 == c2
    assert ours.training == ref.training is False


def nothing_on_meta(lm):
    return not [n for n, t in [*lm.named_parameters(), *lm.named_buffers()] if t.is_meta]


def lora_backward(lm, load_in_4bit):
    """qlora.load_base's preparation, LoRA on the seven projections, one LM loss backward: the LoRA
    B matrices (A's gradient is zero while B is still zero) get nonzero gradients."""
    lm = qlora.with_lora(qlora.prepare_base(lm, load_in_4bit, checkpointing=False), 16, 32, 0.0)
    lm.train()
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    lm(input_ids=ids, labels=ids).loss.backward()
    lora = {n: p for n, p in lm.named_parameters() if p.requires_grad}
    assert len(lora) == 2 * 14 and all("lora_" in n for n in lora)
    assert all(p.grad is not None for p in lora.values())
    assert all(p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    return lm


def test_4bit_is_nf4_double_quant_and_set_up_as_from_pretrained(folders):
    import bitsandbytes as bnb

    lm = random_causal_lm(qwen_config(), "cpu", torch.float32, load_in_4bit=True)
    q = [m for m in lm.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(q) == 14
    assert all(m.weight.quant_type == "nf4" and m.weight.quant_state.quant_type == "nf4" for m in q)
    assert all(m.weight.quant_state.nested and m.quant_state is m.weight.quant_state for m in q)  # double quant
    assert all(m.compute_dtype == torch.float32 and m.weight.dtype == torch.uint8 for m in q)
    assert nothing_on_meta(lm)
    ref = loaded(folders[False], torch.float32, True)
    assert_same_structure(lm, ref)
    assert lm.is_loaded_in_4bit and lm.quantization_method == ref.quantization_method
    assert type(lm.hf_quantizer) is type(ref.hf_quantizer)
    assert lm.config.quantization_config.to_dict() == ref.config.quantization_config.to_dict()
    qlora.keep_training_layout(lm)
    with torch.no_grad():
        logits = lm(torch.randint(0, SHAPE["vocab_size"], (2, 9))).logits
    assert logits.shape == (2, 9, SHAPE["vocab_size"]) and torch.isfinite(logits).all() and logits.std() > 0
    ours, theirs = lora_backward(lm, True), lora_backward(ref, True)
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == [
        n for n, p in theirs.named_parameters() if p.requires_grad
    ]


@pytest.mark.parametrize("dtype,tied", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_unquantised_is_set_up_as_from_pretrained(folders, dtype, tied):
    import bitsandbytes as bnb

    lm = random_causal_lm(qwen_config(tied), "cpu", dtype, load_in_4bit=False)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in lm.modules())
    assert sum(type(m) is torch.nn.Linear for m in lm.modules()) == 15  # 14 projections + lm_head
    assert nothing_on_meta(lm)
    assert {p.dtype for p in lm.parameters()} == {dtype}
    assert (lm.lm_head.weight is lm.model.embed_tokens.weight) == tied
    assert_same_structure(lm, loaded(folders[tied], dtype, False))
    with torch.no_grad():
        logits = lm(torch.randint(0, SHAPE["vocab_size"], (2, 9))).logits
    assert logits.shape == (2, 9, SHAPE["vocab_size"]) and torch.isfinite(logits).all() and logits.std() > 0
    if dtype == torch.float32 and not tied:
        lora_backward(lm, False)


def test_weights_follow_the_seed_and_the_usual_init():
    from peft.utils.integrations import dequantize_bnb_weight

    def q_proj(seed, four_bit):
        lm = random_causal_lm(qwen_config(), "cpu", torch.float32, load_in_4bit=four_bit, seed=seed)
        w = lm.model.layers[1].self_attn.q_proj.weight
        return (dequantize_bnb_weight(w) if four_bit else w.detach()), lm

    a, lm = q_proj(0, False)
    assert torch.equal(a, q_proj(0, False)[0]) and not torch.equal(a, q_proj(1, False)[0])
    assert 0.015 < a.std() < 0.025  # normal(0, initializer_range = 0.02)
    assert torch.equal(lm.model.norm.weight, torch.ones(64)) and not lm.model.layers[0].self_attn.q_proj.bias.any()
    b = q_proj(0, True)[0]
    assert torch.equal(b, q_proj(0, True)[0]) and not torch.equal(b, q_proj(1, True)[0])
    assert 0.015 < b.std() < 0.025


def test_disk_needed_is_zero_for_the_random_model_and_the_saved_size_otherwise(folders):
    config = qwen_config()
    assert disk_needed(config) == 0
    file = folders[False] / "model.safetensors"
    raw = file.read_bytes()
    data = len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]  # safetensors: u64 header length, header, tensor bytes
    assert disk_needed(config, torch.float32, writes_weights=True) == data
    from transformers import Qwen2Config

    big = Qwen2Config(
        hidden_size=3584,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
        vocab_size=152064,
        tie_word_embeddings=False,
    )  # Qwen2.5-7B's shape
    assert parameter_count(big) == 7_615_616_512  # Qwen2.5-7B
    assert disk_needed(big, writes_weights=True) == 2 * 7_615_616_512


Usage = namedtuple("Usage", "total used free")


def test_check_disk_refuses_in_one_line(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(shutil, "disk_usage", lambda p: seen.append(p) or Usage(100e9, 99e9, 1e9))
    with pytest.raises(UsageError) as e:
        check_disk(tmp_path / "not" / "yet", 15_231_233_024)
    assert "\n" not in str(e.value) and "15.2 GB" in str(e.value) and "1.0 GB free" in str(e.value)
    assert seen == [tmp_path]  # the nearest existing folder
    check_disk(tmp_path, 10**9)  # exactly enough
    monkeypatch.setattr(shutil, "disk_usage", lambda p: pytest.fail("no disk needed, none looked at"))
    check_disk(tmp_path, disk_needed(qwen_config()))


def test_fits_a_16_gb_card_with_the_cuda_context():
    capacity = 16376 / 1024 - dry_run.CUDA_CONTEXT_GIB
    ok, margin = fits(0)
    assert ok and margin == pytest.approx(capacity)
    assert fits(int(capacity * 2**30)) == (True, pytest.approx(0, abs=1e-9))
    ok, margin = fits(int((capacity + 0.25) * 2**30))
    assert not ok and margin == pytest.approx(-0.25)
    assert fits(int(20 * 2**30), card_gib=24.0, overhead_gib=0.0)[0]
    for bad in (None, -1):
        with pytest.raises(ValueError) as e:
            fits(bad)
        assert "\n" not in str(e.value)


def test_dry_run_table():
    run = dict(
        variant="dual_engram", gradient_checkpointing=True, batch_size=16, max_length=128, seconds_per_step=1.23456
    )
    cpu = dry_run_table([{**run, "peak_allocated_gib": None, "peak_reserved_gib": None}])
    rows = [line for line in cpu.splitlines() if line.startswith("| dual_engram")]
    assert rows == ["| dual_engram | on | 16 × 128 | 1.235 | n/a (CPU) | n/a (CPU) | n/a (CPU) |"]
    gpu = dry_run_table(
        [
            {**run, "peak_allocated_gib": 10.5, "peak_reserved_gib": 12.0},
            {**run, "gradient_checkpointing": False, "peak_gib": 14.9, "peak_reserved_gib": 15.75},
        ]
    )
    lines = gpu.splitlines()
    assert lines[0].count("|") == 8 and lines[1] == "|---|---|---|---|---|---|---|"
    assert (
        lines[2]
        == f"| dual_engram | on | 16 × 128 | 1.235 | 10.50 | 12.00 | yes (+{16376 / 1024 - 0.5 - 12:.2f} GiB) |"
    )
    assert lines[3].startswith("| dual_engram | off | 16 × 128 | 1.235 | 14.90 | 15.75 | no (-")
    assert "16,376 MiB" in lines[-1] and "0.5 GiB" in lines[-1]

    oom = [
        {
            **run,
            "oom": True,
            "seconds_per_step": None,
            "peak_allocated_gib": None,
            "peak_reserved_gib": None,
            "fits_16gb": f,
        }
        for f in (False, None)
    ]  # a card of 16 GB or more; a smaller card (or the CPU)
    lines = dry_run_table(oom).splitlines()
    assert lines[2] == "| dual_engram | on | 16 × 128 | OOM | OOM | OOM | no (OOM) |"
    assert lines[3] == "| dual_engram | on | 16 × 128 | OOM | OOM | OOM | OOM |"
    assert lines[-1].startswith("OOM: ") and "OOM" not in gpu


# ----------------------------------------------------------------------------- the dry run's steps


def tiny_dry_run(monkeypatch, on_build, steps=1, before_build=lambda: None):
    """`experiment_7b.py --dry-run tiny` (batch 4 x 16 tokens) with before_build() called before
    each variant is built and on_build(variant, checkpointing, built) after, before its steps."""
    real = e7.make_builder

    def make_builder(lm, lr, device, source, preset=None):
        build, dtype = real(lm, lr, device, source, preset)
        checkpointing = lm.gradient_checkpointing

        def wrapped(variant, seed, total_steps):
            before_build()
            built = build(variant, seed, total_steps)
            on_build(variant, checkpointing, built)
            return built

        return wrapped, dtype

    monkeypatch.setattr(e7, "make_builder", make_builder)
    return e7.main(
        ["--dry-run", "tiny", "--batch-size", "4", "--max-length", "16", "--no-progress", "--dry-run-steps", str(steps)]
    )


def test_dry_run_steps_train_with_checkpointing_on_and_off(monkeypatch):
    """Checkpointing recomputes each decoder layer in backward, and transformers checkpoints only in
    training mode (from_pretrained and random_causal_lm leave eval mode): the first layer's MLP runs
    twice per step with it (forward, recompute), once without."""
    calls = collections.Counter()

    def on_build(variant, checkpointing, built):
        mlp = built.model.backbone.lm.get_base_model().model.layers[0].mlp
        # a pre-hook: the recompute stops inside the MLP once backward has what it needs, so a
        # forward hook (run when forward returns) would never see it
        mlp.register_forward_pre_hook(lambda *_, key=(variant, checkpointing): calls.update([key]))

    steps = 2
    tiny_dry_run(monkeypatch, on_build, steps)
    for v in VARIANTS:
        passes = 2 if v == "dual_engram" else 1  # the pair step runs its two halves one after the other
        assert calls[(v, True)] == 2 * passes * (steps + 1), v  # timed steps + the warm-up step
        assert calls[(v, False)] == passes * (steps + 1), v


def test_an_out_of_memory_row_is_kept_as_oom_and_every_row_is_freed(monkeypatch):
    """One row out of GPU memory (faked on the CPU: its first step raises torch's OutOfMemoryError)
    is an "OOM" row; the rows after it still run; and every row's 4-bit model, a reference cycle
    (Linear4bit <-> Params4bit), is freed by the dry run itself before the next row is built, also
    the one that failed. Python's automatic cycle collection is off meanwhile, so that only the dry
    run's own collection can free them. (The EngramModel itself goes with its last reference; its
    4-bit layers, in their cycles, stay without a collection, holding their weights.)"""
    import bitsandbytes as bnb

    layers, doomed = [], weakref.WeakSet()
    real = dry_run.run_batch

    def before_build():
        assert all(ref() is None for ref in layers), "the last row's 4-bit layers are still alive"

    def on_build(variant, checkpointing, built):
        layers.append(weakref.ref(next(m for m in built.model.modules() if isinstance(m, bnb.nn.Linear4bit))))
        if (variant, checkpointing) == ("dual_head", True):
            doomed.add(built.model)

    def run_batch(model, *a, **k):
        if model in doomed:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, *a, **k)

    monkeypatch.setattr(dry_run, "run_batch", run_batch)
    gc.collect()
    gc.disable()
    try:
        r = tiny_dry_run(monkeypatch, on_build, before_build=before_build)
        before_build()  # the last row's model too
    finally:
        gc.enable()
    assert len(layers) == 6
    rows = {(x["variant"], x["gradient_checkpointing"]): x for x in r["runs"]}
    assert len(rows) == 6
    bad = rows.pop(("dual_head", True))
    assert bad["oom"] is True and bad["fits_16gb"] is None  # the CPU: no card size to judge by
    assert bad["seconds_per_step"] is None and bad["peak_allocated_gib"] is None and bad["peak_reserved_gib"] is None
    assert all(x["oom"] is False and x["seconds_per_step"] > 0 and x["loss"] > 0 for x in rows.values())
    assert "| dual_head | on | 4 × 16 | OOM | OOM | OOM | OOM |" in r["table"]
    assert "| dual_engram | on | 4 × 16 | " in r["table"] and r["table"].count("OOM |") == 4
