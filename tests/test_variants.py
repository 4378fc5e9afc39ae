"""Variants are data: a fourth one is an entry in models.VARIANTS, and the model, the training loop,
the analyses and the reports follow it without naming it. The entry here is a learned static
prefix in the engram's place with nothing fed back (the control H2 lacks)."""

from __future__ import annotations

import json

import pytest
import torch

import experiment
from models import VARIANTS, SmallConfig, Variant, build_small_model, count_parameters, engram_variant
from train.checkpoints import seed_everything

STATIC = Variant("static_prefix", lm_head=True, prefix="learned", label="Control: static prefix", colour="tab:red")


@pytest.fixture
def with_static_prefix(monkeypatch):
    """The table with a fourth entry, for this test only (the dict is changed in place: every module
    that imported VARIANTS sees it)."""
    monkeypatch.setitem(VARIANTS, STATIC.name, STATIC)
    return STATIC


def test_the_table_says_what_each_study_variant_has():
    assert list(VARIANTS) == ["sentiment_only", "dual_head", "dual_engram"]
    assert [(v.lm_head, v.prefix, v.engram) for v in VARIANTS.values()] == [
        (False, "none", False),
        (True, "none", False),
        (True, "engram", True),
    ]
    assert engram_variant(["sentiment_only", "dual_engram", "unknown"]) == "dual_engram"
    assert engram_variant({"dual_head": 1}) is None
    with pytest.raises(ValueError, match="unknown prefix"):
        Variant("x", lm_head=True, prefix="recurrent", label="x", colour="k")


def test_a_learned_prefix_is_one_trained_vector_and_takes_no_engram(with_static_prefix):
    cfg = SmallConfig(vocab_size=50, max_len=12, d_model=32, n_layers=1, n_heads=2, d_ff=64, engram_dim=8)
    model = build_small_model("static_prefix", cfg)
    two = build_small_model("dual_head", cfg)
    assert count_parameters(model)[0] == count_parameters(two)[0] + cfg.d_model
    assert model.compressor is None and model.projector is None and not model.uses_engram and model.uses_lm
    ids = torch.randint(4, 50, (3, 6))  # [B,T]
    mask = torch.ones_like(ids)
    out = model(ids, mask, labels=torch.tensor([0, 1, 1]))
    assert out.engram is None and out.lm_loss is not None
    out.loss.backward()
    assert model.learned_prefix.vector.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="takes no engram"):
        model(ids, mask, engram=torch.zeros(3, cfg.engram_dim))


def test_a_fourth_variant_trains_through_the_command_line(with_static_prefix, sst2_small, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = ["--data-dir", str(sst2_small), "--epochs", "1", "--seeds", "42", "--no-progress", "--out", str(out)]
    experiment.main([*argv, "--variants", "dual_head", "static_prefix"])
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["models"]) == ["dual_head", "static_prefix"]
    mine, two = m["models"]["static_prefix"], m["models"]["dual_head"]
    assert 0 <= mine["best_val_acc"]["mean"] <= 100 and mine["runs"][0]["history"][0]["val_lm_loss"] is not None
    d_model = m["model_config"]["d_model"]
    assert mine["total_params"] == two["total_params"] + d_model
    assert m["engram"] == {} and "engram" not in mine["runs"][0]["analysis"]
    assert "Control: static prefix" in (out / "REPORT.md").read_text()

    # the vector trained: the saved one is not the one the job started from
    from safetensors.torch import load_file

    saved = load_file(str(out / "checkpoints" / "seed42" / "static_prefix" / "weights" / "final" / "model.safetensors"))
    seed_everything(42)
    start = build_small_model("static_prefix", SmallConfig(**m["model_config"])).learned_prefix.vector
    assert (saved["learned_prefix.vector"].float() - start.detach()).abs().max() > 1e-4

    # a report of a run whose variant this code does not know names it and does not crash
    monkeypatch.delitem(VARIANTS, "static_prefix")
    text = experiment.small_report(m)
    assert "| static_prefix |" in text
    from analysis.figures import learning_curves

    learning_curves(m, [("validation accuracy (%)", [("val_acc", "val")])], {})
