import json

import pytest

import experiment
from tests.conftest import comparable, crash_after_saving, on_training_step
from train.checkpoints import latest_checkpoint

TINY = ["--epochs", "2", "--no-progress"]
HISTORY_KEYS = {
    "epoch",
    "train_loss",
    "train_sent_loss",
    "train_lm_loss",
    "train_acc",
    "val_acc",
    "val_sent_loss",
    "val_lm_loss",
    "extra",
    "train_seconds",
    "seconds",
    "train_sent_loss_batch_mean",
    "train_lm_loss_batch_mean",
    "val_lm_loss_batch_mean",
}


def run_small(data, out, *extra):
    return experiment.main(["--data-dir", str(data), "--out", str(out), *TINY, *extra])


@pytest.fixture(scope="module")
def small_run(sst2_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("small_run")
    extra = sst2_small / "dev.tsv"
    run_small(sst2_small, out, "--extra-eval", f"again={extra}")
    return out


def test_end_to_end_writes_every_output_with_the_full_schema(small_run, sst2_small):
    for name in ("metrics.json", "predictions.json", "REPORT.md", "learning_curves.png", "engram_clusters.png"):
        assert (small_run / name).stat().st_size > 0, name
    for png in ("learning_curves.png", "engram_clusters.png"):
        assert (small_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = json.loads((small_run / "metrics.json").read_text())
    assert m["complete"] and m["shortened"] and m["scale"] == "small"
    assert m["command"].startswith("python experiment.py --data-dir")
    assert {"torch", "transformers", "peft", "bitsandbytes", "scikit-learn"} <= set(m["versions"])
    assert m["data"] == {
        "train": 320,
        "validation": 96,
        "vocab_size": m["data"]["vocab_size"],
        "source": str(sst2_small),
        "extra": {"again": 96},
    }
    assert m["config"]["epochs"] == 2 and m["config"]["batch_size"] == 64 and m["config"]["lr"] == 3e-4
    assert list(m["models"]) == ["sentiment_only", "dual_head", "dual_engram"]
    for v, mm in m["models"].items():
        assert mm["trainable_params"] == mm["total_params"] > 0
        (run,) = mm["runs"]
        assert [h["epoch"] for h in run["history"]] == [1, 2]
        for h in run["history"]:
            assert set(h) == HISTORY_KEYS
            assert (h["train_lm_loss"] is None) == (v == "sentiment_only") == (h["val_lm_loss"] is None)
            assert h["extra"]["again"]["acc"] == h["val_acc"]  # the same file, evaluated the same way
        assert run["best_val_acc"] == max(h["val_acc"] for h in run["history"])
        assert run["final_val_acc"] == run["history"][-1]["val_acc"]
        assert set(run["analysis"]["probe_pooled"]) == {"accuracy", "control_accuracy", "selectivity"}
    eng = m["models"]["dual_engram"]["runs"][0]["analysis"]
    assert set(eng["engram"]) == {"n", "dim", "ari", "cluster_accuracy", "within_class_cosine", "between_class_cosine"}
    assert eng["engram"]["n"] == 96 and eng["engram"]["dim"] == 32
    assert set(eng["ablation"]) == {
        "base",
        "pair",
        "zero",
        "shuffled",
        "changed_zero",
        "changed_shuffled",
        "could_change_zero",
        "could_change_shuffled",
    }
    assert eng["ablation"]["pair"] == m["models"]["dual_engram"]["runs"][0]["final_val_acc"]
    # 96 rows in batches of 64 and 32: only the second halves (32 + 16) can change without their engram
    assert (eng["ablation"]["could_change_zero"], eng["ablation"]["could_change_shuffled"]) == (48, 96)
    assert set(m["hypotheses"]) == {"H1", "H2"} and m["hypotheses"]["H1"]["study_delta"] == {
        "best": pytest.approx(0.688, abs=1e-3),
        "final": pytest.approx(1.147, abs=1e-3),
    }
    p = json.loads((small_run / "predictions.json").read_text())
    assert len(p["labels"]) == 96 and len(p["runs"]["42"]["dual_head"]["final"]["prob"]) == 96
    report = (small_run / "REPORT.md").read_text()
    assert "Shortened run" in report and "80.28" in report and "| H2 |" in report and "0.2356" in report
    tail = m["engram"]["random_tail"]
    assert tail["threshold"] == 0.2356 and tail["draws"] == len(eng["random_compressor_tail"]["ari"]) == 200
    assert (
        f"**How often does a random projection reach the study's ARI (0.2356)?** {tail['at_or_above']} of 200 "
        in report
    )


def test_checkpoints_are_complete_and_incomplete_ones_are_ignored(small_run):
    folder = small_run / "checkpoints" / "seed42" / "dual_engram"
    last = latest_checkpoint(folder)
    assert last.name == "epoch_002" and (last / "COMPLETE").is_file()
    assert {p.name for p in last.iterdir()} == {
        "trainable.safetensors",
        "train_state.pt",
        "rng.safetensors",
        "state.json",
        "COMPLETE",
    }
    (folder / "epoch_003").mkdir()  # a crash before the marker: never loaded
    assert latest_checkpoint(folder) == last
    (folder / "epoch_003").rmdir()


def test_resume_after_a_crash_gives_exactly_the_uninterrupted_metrics(small_run, sst2_small, tmp_path, monkeypatch):
    out = tmp_path / "crashed"
    crash_after_saving(monkeypatch, "dual_head", 1)
    with pytest.raises(KeyboardInterrupt):
        run_small(sst2_small, out, "--extra-eval", f"again={sst2_small / 'dev.tsv'}")
    partial = json.loads((out / "metrics.json").read_text())
    assert not partial["complete"] and list(partial["models"]) == ["sentiment_only"]  # finished work survived
    monkeypatch.undo()  # the real save_checkpoint again
    run_small(sst2_small, out, "--extra-eval", f"again={sst2_small / 'dev.tsv'}", "--resume")
    assert comparable(out) == comparable(small_run)


def test_same_seed_twice_gives_identical_metrics_and_another_seed_does_not(small_run, sst2_small, tmp_path):
    run_small(sst2_small, tmp_path / "again", "--extra-eval", f"again={sst2_small / 'dev.tsv'}")
    assert comparable(tmp_path / "again") == comparable(small_run)


def test_non_finite_loss_names_variant_epoch_and_step_and_keeps_the_checkpoint(
    sst2_small, tmp_path, monkeypatch, capsys
):
    def poison(out):
        out.loss = out.loss * float("nan")

    on_training_step(monkeypatch, "dual_head", 5 + 2, poison)  # epoch 2 (5 batches of 64 per epoch), step 2
    with pytest.raises(SystemExit) as e:
        run_small(sst2_small, tmp_path)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: dual_head (seed 42): non-finite loss nan at epoch 2, step 2")
    assert latest_checkpoint(tmp_path / "checkpoints" / "seed42" / "dual_head").name == "epoch_001"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "0"], "--epochs: must be a positive integer"),
        (["--batch-size", "1"], "--batch-size 1 is too small: dual_engram"),
        (["--batch-size", "-3"], "--batch-size: must be a positive integer"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["--seeds", "1", "1"], "--seeds repeats a seed"),
    ],
)
def test_bad_flags_fail_loudly(args, message, sst2_small, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        experiment.main(["--data-dir", str(sst2_small), "--out", str(tmp_path), *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_inputs_give_one_line_errors(sst2_small, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    cases = [
        (["--data-dir", str(tmp_path / "missing")], "error: data folder"),
        (["--data-dir", str(sst2_small), "--out", str(tmp_path / "file" / "sub")], "is not writable"),
        (["--data-dir", str(sst2_small), "--extra-eval", "x=" + str(tmp_path / "none.tsv")], "none.tsv not found"),
    ]
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    cases.append((["--data-dir", str(sst2_small), "--device", "cuda"], "--device cuda was asked for but no CUDA GPU"))
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            experiment.main(["--out", str(tmp_path / "o"), *args] if "--out" not in args else args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, (args, err)


def test_resume_refuses_checkpoints_made_with_other_settings(small_run, sst2_small, capsys):
    with pytest.raises(SystemExit):
        experiment.main(
            [
                "--data-dir",
                str(sst2_small),
                "--out",
                str(small_run),
                "--epochs",
                "3",
                "--no-progress",
                "--resume",
                "--extra-eval",
                f"again={sst2_small / 'dev.tsv'}",
            ]
        )
    err = capsys.readouterr().err
    assert "were made with other settings (epochs: 2 -> 3)" in err


def test_fast_run_matches_the_naive_reference_per_epoch(sst2_small, tmp_path):
    """The packed implementation (real tokens only, LM logits at targets only) and the naive one
    (batches padded to 64, everything at every position) give the same per-epoch numbers. Dropout
    is off so that both draw no random numbers inside the model."""
    runs = {}
    for impl in ("packed", "padded"):
        m = run_small(sst2_small, tmp_path / impl, "--impl", impl, "--dropout", "0", "--max-train", "192")
        runs[impl] = {v: mm["runs"][0]["history"] for v, mm in m["models"].items()}
    for v in runs["packed"]:
        for a, b in zip(runs["packed"][v], runs["padded"][v]):
            for key in ("train_loss", "train_sent_loss", "train_lm_loss", "val_sent_loss", "val_lm_loss"):
                assert (a[key] is None and b[key] is None) or a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (
                    v,
                    key,
                )
            assert a["train_acc"] == b["train_acc"] and a["val_acc"] == b["val_acc"], v
