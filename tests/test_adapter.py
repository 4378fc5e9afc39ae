"""A causal-LM run's kept adapter loads with PEFT's own PeftModel.from_pretrained on a freshly
loaded base, and with the saved heads gives the validation predictions the run recorded for that
epoch: on the tiny random Qwen2 here, and on SmolLM2-135M (4-bit, as the study loads its base) in
test_real_model.py, which shares its dequantised copy of the GGUF file."""

import json
from pathlib import Path

import pytest
import torch

import experiment_7b as e7
from qlora.loading import encode_split, load_tokenizer
from run.prediction import load_variant
from train import loop as training
from train.data import read_tsv

# the test's own PeftModel.from_pretrained: peft reads a deprecated transformers name (as in qlora.with_lora)
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def shortened_run(tmp_path, sst2_small, model_args: list[str], epochs: int) -> tuple[Path, list[str]]:
    out = tmp_path / "out"
    argv = [
        *model_args,
        "--data-dir",
        str(sst2_small),
        "--out",
        str(out),
        "--max-train",
        "16",
        "--max-eval",
        "16",
        "--epochs",
        str(epochs),
        "--batch-size",
        "4",
        "--max-length",
        "24",
        "--no-progress",
        "--variants",
        "dual_engram",
        "--small-results",
        str(tmp_path / "none.json"),
    ]
    e7.main(argv)
    return out, argv


def check_adapter(out: Path, argv: list[str], base_folder: Path, sst2_small: Path, cache_dir=None) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    job = out / "checkpoints" / "seed42" / "dual_engram"
    result = json.loads((job / "result.json").read_text())
    max_length = e7.parse_args(argv).max_length
    for which in ("best", "final"):
        folder = job / "weights" / which
        adapter = folder / "adapter"
        assert {p.name for p in adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
        assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_folder)
        assert all("lora_" in k for k in load_file(str(adapter / "adapter_model.safetensors")))  # never the base
        assert {k.split(".")[0] for k in load_file(str(folder / "heads.safetensors"))} == {
            "sentiment_head",
            "compressor",
            "projector",
        }
        # PEFT's own loader on a plain fresh base: the adapter's weights are the run's
        lm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_folder)), str(adapter))
        lora = {k: v for k, v in lm.state_dict().items() if "lora_" in k}
        ckpt = job / f"epoch_{result[which]['epoch']:03d}" / "trainable.safetensors"
        if ckpt.is_file():  # the last two epochs' checkpoints are kept
            trained = {k.removeprefix("backbone.lm."): v for k, v in load_file(str(ckpt)).items() if "lora_" in k}
            assert set(trained) == set(lora) and all(torch.equal(trained[k], lora[k]) for k in lora)
        # the base as the run loaded it (4-bit NF4) + the adapter + the heads: the recorded predictions
        loaded = load_variant(folder, torch.device("cpu"), cache_dir=cache_dir)
        assert type(loaded.model.backbone.lm).__name__ == "PeftModelForCausalLM"
        tok = load_tokenizer(str(base_folder))
        enc = encode_split(tok, read_tsv(sst2_small / "dev.tsv").head(16), max_length)
        cfg = loaded.meta["config"]  # the run's evaluation: its batches (the pair mode's halves) and engram mode
        sizes = cfg["batch_size"]
        recipe = training.Recipe("7b", None, sizes.get, 1, torch.device("cpu"), eval_mode=cfg["eval_mode"])
        ev = training.evaluate(loaded.model, enc, recipe, loaded.autocast_dtype)
        assert ev["pred"].tolist() == result[which]["pred"]
        assert ev["prob"].tolist() == pytest.approx(result[which]["prob"], abs=2e-6)  # recorded to 6 digits


def test_tiny_qwen_adapter_loads_with_peft_and_reproduces_the_recorded_predictions(tiny_qwen, sst2_small, tmp_path):
    out, argv = shortened_run(tmp_path, sst2_small, ["--model", str(tiny_qwen)], epochs=2)
    check_adapter(out, argv, tiny_qwen, sst2_small)
