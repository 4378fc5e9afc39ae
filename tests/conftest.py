import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SST2 = ROOT.parent / "shared" / "data" / "sst2"


def pytest_configure(config):
    # torch deprecating its own API inside its own module (torch.utils.mkldnn, imported by torch.fx
    # when peft loads): nothing this project calls, and hidden from users by Python's default filters
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def tiny_flags(epochs: int | None = None, max_train: int | None = 64) -> list[str]:
    """The flags of a tiny small-model run (a 32-wide, one-layer model on a few rows, one thread),
    shared by the grid, resume, robustness and ladder tests."""
    flags = (["--epochs", str(epochs)] if epochs else []) + ["--no-progress"]
    flags += ["--max-train", str(max_train)] if max_train else []
    model = ["--batch-size", "16", "--d-model", "32", "--layers", "1", "--heads", "2", "--engram-dim", "8"]
    return flags + ["--max-eval", "40", *model, "--max-len", "24", "--threads", "1"]


def token_ids(model: Path, shape: tuple[int, ...], seed: int):
    """Random token ids in [1, 500) of a saved model's vocabulary, or below its size where that is
    smaller: the tiny Qwen's tokenizer has 600 tokens on the shared SST-2 rows, ~300 on the generated ones."""
    import torch

    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    return torch.randint(1, min(500, vocab), shape, generator=torch.Generator().manual_seed(seed))


def write_tsv(path: Path, rows, header="sentence\tlabel") -> Path:
    path.write_text("\n".join([header, *(f"{s}\t{label}" for s, label in rows)]) + "\n")
    return path


def comparable(out):
    """metrics.json and predictions.json of a run without wall times, commands and paths."""
    m = json.loads((Path(out) / "metrics.json").read_text())
    for v in m["models"].values():
        v.pop("minutes")
        for r in v["runs"]:
            r.pop("minutes")
            for h in r["history"]:
                h.pop("seconds"), h.pop("train_seconds")
    return {k: m[k] for k in ("models", "engram", "hypotheses")}, json.loads(
        (Path(out) / "predictions.json").read_text()
    )


def crash_after_saving(monkeypatch, variant: str, epoch: int, exc: type[BaseException] = KeyboardInterrupt) -> None:
    """Wrap training.save_checkpoint so that exc("simulated crash") is raised right after variant's
    epoch `epoch` is saved: a crash that loses nothing checkpointed; monkeypatch undoes it."""
    from train import loop as training

    real = training.save_checkpoint

    def save_then_crash(folder, ep, *a, **k):
        path = real(folder, ep, *a, **k)
        if folder.name == variant and ep == epoch:
            raise exc("simulated crash")
        return path

    monkeypatch.setattr(training, "save_checkpoint", save_then_crash)


def on_training_step(monkeypatch, variant: str, step: int, action) -> None:
    """Wrap training.run_batch so that action(output) runs after the step-th training batch of
    variant (counted across epochs, from 1); returns nothing, monkeypatch undoes it."""
    from train import loop as training

    real, seen = training.run_batch, {"n": 0}

    def wrapped(model, *a, **k):
        out = real(model, *a, **k)
        if model.training and model.variant == variant:
            seen["n"] += 1
            if seen["n"] == step:
                action(out)
        return out

    monkeypatch.setattr(training, "run_batch", wrapped)


def sst2_rows(out: Path, n_train: int, n_dev: int, seed: int = 0) -> Path:
    """The first rows of the shared real SST-2 in the GLUE layout (generated rows if it is absent)."""
    if SST2.is_dir():
        for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
            lines = (SST2 / name).read_text().split("\n")
            (out / name).write_text("\n".join(lines[: n + 1]) + "\n")
    else:
        import random

        rng = random.Random(seed)
        good, bad = "good great fine lovely superb".split(), "bad awful dull poor boring".split()
        # English sentences with context around the sentiment words, so that a pretrained LM reads them
        # as text (SmolLM2's LM loss: ~6.1; real SST-2 rows 5.6, bare word lists 10.7), each about a
        # made-up name, so that the vocabulary grows with the rows as a real one does (~1,800 words in
        # 2,000 rows; 4,664 real): a tiny vocabulary makes training cheap beside a job's start-up
        subjects = ["the film", "this movie", "the story", "the acting", "the music", "the ending"]
        verbs = ["is", "was", "feels", "seems"]
        syllables = "ka lo mi ra te so vi na du be ro sa li mo ta ne gu pa fi zo".split()
        for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
            rows = []
            for _ in range(n):
                label = rng.randrange(2)
                words = [rng.choice(good if label else bad) for _ in range(rng.randrange(1, 3))]
                subject, verb = rng.choice(subjects), rng.choice(verbs)
                about = "".join(rng.choice(syllables) for _ in range(3))
                sentence = f"i thought that {subject} of {about} {verb} {' and '.join(words)} from start to finish ."
                rows.append((sentence, label))
            write_tsv(out / name, rows)
    return out


@pytest.fixture(scope="session")
def sst2_small(tmp_path_factory) -> Path:
    """A few hundred real SST-2 rows in the GLUE layout (generated rows if the shared copy is absent)."""
    return sst2_rows(tmp_path_factory.mktemp("sst2_small"), 320, 96)


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory, sst2_small) -> Path:
    """A tiny random Qwen2 causal LM and a byte-level BPE tokenizer (Qwen's kind, pad = eos =
    <|endoftext|>) trained on the small rows, saved as a local model folder."""
    from qlora.dry_run import save_tiny_qwen

    folder = tmp_path_factory.mktemp("tiny_qwen")
    sentences = [
        line.split("\t")[0]
        for name in ("train.tsv", "dev.tsv")
        for line in (sst2_small / name).read_text().split("\n")[1:]
        if line
    ]
    save_tiny_qwen(folder, sentences)
    return folder
