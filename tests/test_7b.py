"""The 7B path on a tiny random Qwen2 model loaded through from_pretrained with real NF4
quantisation on the CPU: no GPU, no network."""
import json
import re

import pytest
import torch

import experiment_7b as e7
import qlora
from engram import run_batch
from cli import UsageError
from data import Encoded, collate
from experiment_7b import parse_args
from qlora import LORA_TARGETS, build_qlora_model


@pytest.fixture(scope="module")
def args(tiny_qwen):
    return parse_args(["--model", str(tiny_qwen)])


@pytest.fixture(scope="module")
def engram_model(args, tiny_qwen):
    torch.manual_seed(0)
    return build_qlora_model(args, "dual_engram", torch.device("cpu"), torch.float32, str(tiny_qwen))


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
    enc = Encoded(tok(["a fine film", "dull", "it is not bad at all", "bad"])["input_ids"], [1, 0, 1, 0], tok.pad_token_id)
    ids, mask, labels = collate(enc, range(4), "cpu")
    engram_model.train()
    engram_model.zero_grad()
    run_batch(engram_model, ids, mask, labels).loss.backward()
    lora_b = [p.grad for n, p in engram_model.named_parameters() if "lora_B" in n]
    assert all(g is not None for g in lora_b) and sum(float(g.abs().sum()) for g in lora_b) > 0
    assert torch.count_nonzero(engram_model.compressor.linear.weight.grad) > 0
    # the first half alone does not train the compressor
    engram_model.zero_grad()
    engram_model(ids[:2, :int(mask[:2].sum(1).max())], mask[:2, :int(mask[:2].sum(1).max())], labels=labels[:2]).loss.backward()
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
        embeds = torch.cat([engram_model.projector(engram_model.zero_engram(2, "cpu")).unsqueeze(1),
                            engram_model.backbone.embed(ids)], 1)
        hidden = engram_model.backbone(embeds, torch.cat([mask.new_ones(2, 1), mask], 1))[:, 1:]
        assert torch.allclose(batched.pooled[1], hidden[1, int(mask[1].sum()) - 1].float(), atol=1e-5)
        assert not torch.allclose(batched.pooled[1], hidden[1, -1].float(), atol=1e-3)


def test_end_to_end_main_on_a_few_dozen_rows(tiny_qwen, sst2_small, tmp_path):
    small = tmp_path / "small_metrics.json"
    m = e7.main(["--model", str(tiny_qwen), "--data-dir", str(sst2_small), "--out", str(tmp_path / "out"),
                 "--max-train", "24", "--max-eval", "16", "--epochs", "2", "--no-progress", "--small-results", str(small)])
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
    assert saved["engram"]["ari"]["n"] == 1 and saved["models"]["dual_engram"]["runs"][0]["analysis"]["engram"]["dim"] == 128
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
    text = e7.report_7b(saved, json.loads(small.read_text()))
    assert "## Cross-scale comparison" in text
    table = text.split("## Cross-scale comparison")[1]
    # three columns: the small run beside the study's small figures, this run, the study's 7B figures
    assert "| H1 delta, final epoch (points) |" in table and "/ +1.15 |" in table and "| +0.34 |" in table
    assert "| Engram ARI |" in table and "/ 0.2356 |" in table and "| 0.8331 |" in table
    assert "ARI of untrained compressors (control)" in table and "Effective rank of pooled states" in table


def test_dry_run_tiny_shape_runs_every_variant(tmp_path):
    r = e7.main(["--dry-run", "tiny", "--batch-size", "4", "--max-length", "16", "--dry-run-steps", "1"])
    assert [(x["variant"], x["gradient_checkpointing"]) for x in r["runs"]] == [
        (v, gc) for gc in (True, False) for v in ("sentiment_only", "dual_head", "dual_engram")]
    assert all(x["seconds_per_step"] > 0 and x["trainable_params"] > 0 and x["batch_size"] == 4 for x in r["runs"])
    # random weights built in memory: no disk; on the CPU no GPU memory to judge
    assert r["disk_needed_bytes"] == 0 and all(x["fits_16gb"] is None for x in r["runs"])
    assert r["table"].count("n/a (CPU)") == 3 * 6 and "| dual_engram | off | 4 × 16 |" in r["table"]


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "model folder .* not found"),
    (lambda p: p.mkdir(), "has no config.json"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text('{"architectures": ["BertModel"]}')), "not a causal LM"),
])
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
    for needle in ("Qwen/Qwen2.5-7B", "(default: 16)", "(default: 32)", "(default: 0.05)", "(default: 0.0002)",
                   "preset: written 8", "(default: 3)", "(default: 128)", "preset: written 0.03", "--dry-run"):
        assert needle in text, needle
    # each default said once: "passes over the training set (default 3) (default: 3)" was printed
    flat = " ".join(text.split())
    assert "(default 3)" not in flat and not re.search(r"\(default:? [^()]*\) \(default", flat), flat


def test_long_inputs_are_truncated_at_max_length(tiny_qwen):
    from data import Split

    tok = e7.load_tokenizer(str(tiny_qwen))
    long = " ".join(["a fine film"] * 100)
    enc = e7.encode_split(tok, Split([long, "dull"], [1, 0]), max_length=16)
    assert enc.lengths.tolist() == [16, len(tok("dull")["input_ids"])]
