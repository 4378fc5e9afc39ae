"""The 7B path on a tiny random Qwen2 model loaded through from_pretrained with real NF4
quantisation on the CPU: no GPU, no network."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import experiment_7b as e7
from analysis import report_causal
from engram import run_batch
from experiment_7b import parse_args
from qlora import loading as qlora
from qlora.loading import LORA_TARGETS, build_qlora_model
from train.data import Encoded, collate
from train.stop import UsageError


@pytest.fixture(scope="module")
def args(tiny_qwen):
    return parse_args(["--model", str(tiny_qwen)])


@pytest.fixture(scope="module")
def engram_model(args, tiny_qwen):
    torch.manual_seed(0)
    return build_qlora_model(e7.settings(args).model, "dual_engram", torch.device("cpu"), torch.float32, str(tiny_qwen))


def test_defaults_are_the_studys(args):
    assert (args.lora_r, args.lora_alpha, args.lora_dropout) == (16, 32, 0.05)
    assert (args.lr, args.batch_size, args.epochs, args.max_length) == (2e-4, 8, 3, 128)
    assert (args.weight_decay, args.warmup_ratio, args.engram_dim, args.head_width) == (0.0, 0.03, 128, 256)
    assert args.model == "Qwen/Qwen2.5-7B" or args.model.endswith("tiny_qwen0") and args.load_in_4bit


def test_base_is_4bit_nf4_and_lora_lands_on_exactly_the_seven_projections(engram_model):
    import bitsandbytes as bnb

    lora = {n.split(".lora_A")[0] for n, _ in engram_model.named_parameters() if "lora_A" in n}
    kinds = {n.split(".")[-1] for n in lora}
    assert kinds == set(LORA_TARGETS)
    assert len(lora) == 7 * 2  # seven projections in each of the two layers
    q = [m for m in engram_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(q) == 14 and all(m.weight.quant_type == "nf4" for m in q)
    assert q[0].weight.quant_state.nested  # double quantisation


def test_only_lora_and_fp32_heads_are_trainable(engram_model):
    heads = {"sentiment_head", "compressor", "projector"}
    for name, p in engram_model.named_parameters():
        is_head = name.split(".")[0] in heads
        assert p.requires_grad == (is_head or "lora_" in name), name
        if is_head:
            assert p.dtype == torch.float32, name


def test_gradients_reach_lora_and_the_compressor_through_the_second_half(engram_model, tiny_qwen):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen)
    enc = Encoded(
        tok(["a fine film", "dull", "it is not bad at all", "bad"])["input_ids"], [1, 0, 1, 0], tok.pad_token_id
    )
    ids, mask, labels = collate(enc, range(4), "cpu")
    engram_model.train()
    engram_model.zero_grad()
    run_batch(engram_model, ids, mask, labels).loss.backward()
    lora_b = [p.grad for n, p in engram_model.named_parameters() if "lora_B" in n]
    assert all(g is not None for g in lora_b) and sum(float(g.abs().sum()) for g in lora_b) > 0
    assert torch.count_nonzero(engram_model.compressor.linear.weight.grad) > 0
    # the first half alone does not train the compressor
    engram_model.zero_grad()
    engram_model(
        ids[:2, : int(mask[:2].sum(1).max())], mask[:2, : int(mask[:2].sum(1).max())], labels=labels[:2]
    ).loss.backward()
    g = engram_model.compressor.linear.weight.grad
    assert g is None or torch.count_nonzero(g) == 0


def test_last_token_pooling_ignores_padding_with_the_prefix_present(engram_model, tiny_qwen):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen)
    engram_model.eval()
    texts = ["it is not bad at all", "dull"]
    enc = Encoded(tok(texts)["input_ids"], [1, 0], tok.pad_token_id)
    ids, mask, labels = collate(enc, range(2), "cpu")
    assert mask[1].sum() < mask.shape[1]  # the second row is padded
    with torch.no_grad():
        batched = engram_model(ids, mask, labels=labels)
        alone = engram_model(ids[1:, : int(mask[1].sum())], mask[1:, : int(mask[1].sum())])
        assert torch.allclose(batched.pooled[1], alone.pooled[0], atol=1e-4)
        # and it is the last real position, not position -1 (a pad)
        embeds = torch.cat(
            [engram_model.projector(engram_model.zero_engram(2, "cpu")).unsqueeze(1), engram_model.backbone.embed(ids)],
            1,
        )
        hidden = engram_model.backbone(embeds, torch.cat([mask.new_ones(2, 1), mask], 1))[:, 1:]
        assert torch.allclose(batched.pooled[1], hidden[1, int(mask[1].sum()) - 1].float(), atol=1e-5)
        assert not torch.allclose(batched.pooled[1], hidden[1, -1].float(), atol=1e-3)


def test_end_to_end_main_on_a_few_dozen_rows(tiny_qwen, sst2_small, tmp_path):
    small = tmp_path / "small_metrics.json"
    m = e7.main(
        [
            "--model",
            str(tiny_qwen),
            "--data-dir",
            str(sst2_small),
            "--out",
            str(tmp_path / "out"),
            "--max-train",
            "24",
            "--max-eval",
            "16",
            "--epochs",
            "2",
            "--no-progress",
            "--small-results",
            str(small),
        ]
    )
    out = tmp_path / "out"
    for name in ("metrics.json", "predictions.json", "REPORT.md", "learning_curves.png", "engram_clusters.png"):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(m))
    assert saved["scale"] == "7b" and saved["shortened"] and saved["compute_dtype"] == "float32"
    for v, mm in saved["models"].items():
        assert 0 < mm["trainable_params"] < mm["total_params"]
        assert mm["info"]["load_in_4bit"] and mm["info"]["compute_dtype"] == "float32"
        assert [h["epoch"] for h in mm["runs"][0]["history"]] == [1, 2]
    assert (
        saved["engram"]["ari"]["n"] == 1
        and saved["models"]["dual_engram"]["runs"][0]["analysis"]["engram"]["dim"] == 128
    )
    # adapters and heads only in the checkpoint, never the base model
    from safetensors.torch import load_file

    w = load_file(str(out / "checkpoints" / "seed42" / "dual_engram" / "epoch_002" / "trainable.safetensors"))
    assert w and all("lora_" in k or k.split(".")[0] in ("sentiment_head", "compressor", "projector") for k in w)
    report = (out / "REPORT.md").read_text()
    assert "96.22" in report and "Trainable parameters" in report and "Cross-scale" not in report
    # the study's losses beside ours averaged its way (mean over batches of per-batch means)
    assert "3.8771 → 4.3116 → 4.6865" in report and "0.4575 / 0.0326 / 0.8825 / 98.8" in report
    h = saved["models"]["dual_engram"]["runs"][0]["history"][-1]
    assert h["train_lm_loss_batch_mean"] > 0 and h["val_lm_loss_batch_mean"] > 0 and h["train_sent_loss_batch_mean"] > 0
    # with the small experiment's metrics present, the report adds the cross-scale tables
    small.write_text(json.dumps(json.loads((out / "metrics.json").read_text()) | {"command": "python experiment.py"}))
    text = report_causal.report_7b(saved, json.loads(small.read_text()))
    assert "## Cross-scale comparison" in text
    table = text.split("## Cross-scale comparison")[1]
    # three columns: the small run beside the study's small figures, this run, the study's 7B figures
    assert "| H1 delta, final epoch (points) |" in table and "/ +1.15 |" in table and "| +0.34 |" in table
    assert "| Engram ARI |" in table and "/ 0.2356 |" in table and "| 0.8331 |" in table
    assert "ARI of untrained compressors (control)" in table and "Effective rank of pooled states" in table


def test_a_7b_run_prints_nothing_on_stderr_no_library_warning_either(tiny_qwen, sst2_small, tmp_path):
    """A fresh process, as a user starts it: import-time warnings of the libraries (bitsandbytes'
    CPU backend logs one on CPUs with AVX512-BF16 when the optional `kernels` package is absent)
    are noise on every run. A short training run and a dry run, both with nothing on stderr."""
    root = Path(e7.__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # Python's default filters, as a user has them
    for argv in (
        [
            "--model",
            str(tiny_qwen),
            "--data-dir",
            str(sst2_small),
            "--max-train",
            "16",
            "--max-eval",
            "16",
            "--epochs",
            "1",
            "--variants",
            "dual_engram",
            "--out",
            str(tmp_path / "out"),
        ],
        ["--dry-run", "tiny", "--batch-size", "4", "--max-length", "16", "--dry-run-steps", "1"],
    ):
        p = subprocess.run(
            [sys.executable, "experiment_7b.py", *argv, "--no-progress"],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode == 0 and p.stderr == "", p.stderr[-2000:]


def test_dry_run_tiny_shape_runs_every_variant(tmp_path):
    r = e7.main(["--dry-run", "tiny", "--batch-size", "4", "--max-length", "16", "--dry-run-steps", "1"])
    assert [(x["variant"], x["gradient_checkpointing"]) for x in r["runs"]] == [
        (v, gc) for gc in (True, False) for v in ("sentiment_only", "dual_head", "dual_engram")
    ]
    assert all(x["seconds_per_step"] > 0 and x["trainable_params"] > 0 and x["batch_size"] == 4 for x in r["runs"])
    # random weights built in memory: no disk; on the CPU no GPU memory to judge
    assert r["disk_needed_bytes"] == 0 and all(x["fits_16gb"] is None for x in r["runs"])
    assert r["table"].count("n/a (CPU)") == 3 * 6 and "| dual_engram | off | 4 × 16 |" in r["table"]


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "model folder .* not found"),
        (lambda p: p.mkdir(), "has no config.json"),
        (lambda p: (p.mkdir(), (p / "config.json").write_text('{"architectures": ["BertModel"]}')), "not a causal LM"),
    ],
)
def test_model_folder_errors(setup, message, tmp_path):
    folder = tmp_path / "model"
    setup(folder)
    with pytest.raises(UsageError, match=message):
        qlora.check_model_source(str(folder))


def test_4bit_without_bitsandbytes_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *a, **k):
        if name == "bitsandbytes":
            raise ImportError("bitsandbytes is broken here")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(UsageError, match="4-bit loading needs bitsandbytes.*--no-4bit"):
        qlora.check_bitsandbytes(torch.device("cpu"))


def test_cli_help_shows_the_studys_defaults(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for needle in (
        "Qwen/Qwen2.5-7B",
        "(default: 16)",
        "(default: 32)",
        "(default: 0.05)",
        "(default: 0.0002)",
        "preset: written 8",
        "(default: 3)",
        "(default: 128)",
        "preset: written 0.03",
        "--dry-run",
    ):
        assert needle in text, needle
    # each default said once: "passes over the training set (default 3) (default: 3)" was printed
    flat = " ".join(text.split())
    assert "(default 3)" not in flat and not re.search(r"\(default:? [^()]*\) \(default", flat), flat


def test_long_inputs_are_truncated_at_max_length(tiny_qwen):
    from train.data import Split

    tok = e7.load_tokenizer(str(tiny_qwen))
    long = " ".join(["a fine film"] * 100)
    enc = e7.encode_split(tok, Split([long, "dull"], [1, 0]), max_length=16)
    assert enc.lengths.tolist() == [16, len(tok("dull")["input_ids"])]


def test_training_checkpoints_as_asked(tiny_qwen, sst2_small, tmp_path, monkeypatch):
    """training.train_variant trains in training mode (from_pretrained leaves eval mode, where
    transformers never checkpoints): with checkpointing the first decoder layer's MLP runs twice
    per training batch (forward, then the recompute in backward), without it once. Evaluation and
    analysis run without gradients and are not counted."""
    calls = {}
    real = e7.build_qlora_model

    def build(lm, *a, **k):
        model = real(lm, *a, **k)
        key = lm.gradient_checkpointing
        mlp = model.backbone.lm.get_base_model().model.layers[0].mlp
        # a pre-hook: the recompute stops inside the MLP once backward has what it needs
        mlp.register_forward_pre_hook(lambda *_: calls.update({key: calls.get(key, 0) + torch.is_grad_enabled()}))
        return model

    monkeypatch.setattr(e7, "build_qlora_model", build)
    for flag in ("--gradient-checkpointing", "--no-gradient-checkpointing"):
        e7.main(
            [
                "--model",
                str(tiny_qwen),
                "--data-dir",
                str(sst2_small),
                "--out",
                str(tmp_path / flag),
                "--max-train",
                "16",
                "--max-eval",
                "16",
                "--epochs",
                "1",
                "--variants",
                "sentiment_only",
                "--no-progress",
                flag,
                "--small-results",
                str(tmp_path / "none.json"),
            ]
        )
    batches = 16 // 8
    assert calls == {True: 2 * batches, False: batches}


def test_check_bitsandbytes_quantises_on_the_device():
    qlora.check_bitsandbytes(torch.device("cpu"))  # the real NF4 round trip on the CPU


def test_a_bitsandbytes_that_cannot_quantise_is_one_line(monkeypatch):
    """bitsandbytes imports even when its CUDA library failed to load, and raises a page-long
    error at the first kernel call: the check calls one and says why in one line."""
    import bitsandbytes as bnb

    def broken(*a, **k):  # what bitsandbytes' stand-in library raises, shortened
        raise RuntimeError(
            "\n🚨 CUDA SETUP ERROR: Missing dependency: libcudart.so.13 🚨\n\nCUDA 13.x runtime libraries were "
            "not found in the LD_LIBRARY_PATH.\n\nOriginal error: libcudart.so.13: cannot open shared object "
            "file: No such file or directory\n\n🔍 Run this command for detailed diagnostics:\npython -m bitsandbytes\n"
        )

    monkeypatch.setattr(bnb.functional, "quantize_4bit", broken)
    with pytest.raises(UsageError) as e:
        qlora.check_bitsandbytes(torch.device("cpu"))
    msg = str(e.value)
    assert "\n" not in msg and "cannot quantise to 4 bits on cpu" in msg and "--no-4bit" in msg
    assert "Missing dependency: libcudart.so.13" in msg and "cannot open shared object file" in msg
    # a kernel that runs but returns garbage
    monkeypatch.undo()
    monkeypatch.setattr(bnb.functional, "dequantize_4bit", lambda q, state, **k: torch.zeros(64, 64))
    with pytest.raises(UsageError, match=r"quantises wrongly on cpu \(NF4 round trip off by 1\).*--no-4bit"):
        qlora.check_bitsandbytes(torch.device("cpu"))


@pytest.mark.parametrize(
    "capability, dtype", [((7, 5), torch.float32), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)]
)
def test_precision_never_fp16_on_older_gpus(monkeypatch, args, tiny_qwen, capability, dtype):
    """A GPU without native bf16 (compute capability < 8) computes in fp32, without a loss scaler,
    and says why in one line: Qwen2/2.5 overflow fp16, which a loss scaler cannot help."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    cuda = torch.device("cuda")
    assert qlora.precision(cuda) == (dtype, False)
    assert e7.make_builder(e7.settings(args).model, 2e-4, cuda, str(tiny_qwen))[1] == dtype
    note = qlora.precision_note(cuda)
    if dtype == torch.float32:
        assert "\n" not in note and "Tesla T4" in note and "7.5" in note and "fp32" in note and "bf16" in note
        assert "fp16" in note
    else:
        assert note is None
    assert (
        qlora.precision(torch.device("cpu")) == (torch.float32, False)
        and qlora.precision_note(torch.device("cpu")) is None
    )


def test_tf32_is_opt_in_and_a_note_on_the_cpu(monkeypatch, capsys):
    assert not parse_args([]).tf32 and parse_args(["--tf32"]).tf32 is True
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert (
        "--tf32" in help_text and "TF32" in help_text and "change slightly" in help_text and "default: off" in help_text
    )
    # on a CUDA device it turns TF32 on for matmuls and cuDNN (the flags are settable without a GPU;
    # torch's backend objects refuse monkeypatch's undo, hence by hand)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        assert qlora.use_tf32(False, torch.device("cuda")) is None and not torch.backends.cuda.matmul.allow_tf32
        assert qlora.use_tf32(True, torch.device("cuda")) is None
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    # on the CPU: nothing set, one note line, and the run goes on (recorded in the config as any flag)
    before = torch.backends.cuda.matmul.allow_tf32
    r = e7.main(
        [
            "--dry-run",
            "tiny",
            "--batch-size",
            "4",
            "--max-length",
            "8",
            "--dry-run-steps",
            "1",
            "--tf32",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "--tf32" in line] == [
        "note: --tf32 has no effect on the CPU (TF32 is a CUDA tensor-core format); fp32 matmuls stay fp32"
    ]
    assert torch.backends.cuda.matmul.allow_tf32 == before and len(r["runs"]) == 6


def test_runs_made_before_tf32_existed_still_resume(tmp_path):
    """A resume compares the settings in run.json; one written before --tf32 existed lacks it and
    must match a run without the flag, while a switch to --tf32 (other numbers) is refused."""
    from train.checkpoints import prepare_checkpoints

    def settings(*flags):
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(parse_args(list(flags))).items()}

    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    old = settings()
    del old["tf32"]
    (ckpt / "run.json").write_text(json.dumps(old))
    prepare_checkpoints(ckpt, settings(), resume=True)
    with pytest.raises(UsageError, match="tf32: None -> True"):
        prepare_checkpoints(ckpt, settings("--tf32"), resume=True)
