"""The weights a finished job keeps (weights.py), predict.py on them (prediction.py), and
--report-to tensorboard (tensorboard_log.py), on a shortened small run."""

import json
import os

import numpy as np
import pytest
import torch

import experiment
import predict
from run.prediction import load_variant
from tests.conftest import crash_after_saving
from train import loop as training
from train.data import Encoded, read_tsv
from train.weights import saved_epoch

TINY = ["--epochs", "2", "--no-progress"]
SENTENCES = ["a gripping , funny and moving film", "dull , lifeless and far too long", "an ordinary movie"]


def run_small(data, out, *extra):
    return experiment.main(["--data-dir", str(data), "--out", str(out), *TINY, *extra])


@pytest.fixture(scope="module")
def kept_run(sst2_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("kept_run")
    run_small(sst2_small, out, "--report-to", "tensorboard", "--log-steps", "2")
    return out


def job(out, variant, seed=42):
    return out / "checkpoints" / f"seed{seed}" / variant


def recorded(out, variant, which):
    return json.loads((job(out, variant) / "result.json").read_text())[which]


def validation_predictions(folder, sst2_small) -> np.ndarray:
    """The validation predictions of a saved set, rebuilt by predict's loader and evaluated as the run evaluates."""
    loaded = load_variant(folder, torch.device("cpu"))
    cfg = loaded.meta["config"]
    dev = read_tsv(sst2_small / "dev.tsv")
    enc = Encoded([loaded.encode(s) for s in dev.sentences], dev.labels, loaded.pad_id)
    size = cfg["batch_size"]
    recipe = training.Recipe("small", None, lambda v: size, 1, torch.device("cpu"), eval_mode=cfg["eval_mode"])
    return training.evaluate(loaded.model, enc, recipe)["pred"]


@pytest.mark.parametrize("variant", ["sentiment_only", "dual_head", "dual_engram"])
def test_best_and_final_weights_rebuild_the_recorded_validation_predictions(kept_run, sst2_small, variant):
    for which in ("best", "final"):
        folder = job(kept_run, variant) / "weights" / which
        meta = json.loads((folder / "weights.json").read_text())
        assert meta["epoch"] == recorded(kept_run, variant, which)["epoch"] and meta["variant"] == variant
        assert {p.name for p in folder.iterdir()} >= {"model.safetensors", "vocab.json", "weights.json"}
        assert ("kmeans.json" in os.listdir(folder)) == (variant == "dual_engram")
        # fp16 is kept only where it changes no validation prediction: either way the predictions are the run's
        assert meta["dtype"] in ("float16", "float32")
        assert validation_predictions(folder, sst2_small).tolist() == recorded(kept_run, variant, which)["pred"]


def test_predict_prints_label_probability_engram_and_cluster(kept_run, capsys):
    predict.main([str(kept_run), *SENTENCES])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == json.dumps(SENTENCES[0]) and len(out) == 3 * 4 + 1
    for line in out[1:4]:
        variant, label, prob = line.split()[:3]
        assert label in ("positive", "negative") and 0.5 <= float(prob) <= 1
    engram_line = out[3]
    assert engram_line.split()[0] == "dual_engram" and " cluster " in engram_line and "(32 values)" in engram_line
    assert "seed 42, best weights" in out[-1]


def test_predict_json_is_one_parsable_object_per_sentence_and_variant(kept_run, capsys, monkeypatch, tmp_path):
    text = tmp_path / "s.txt"
    text.write_text("\n".join(SENTENCES) + "\n\n")
    predict.main([str(kept_run), "--file", str(text), "--json", "--weights", "final"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["sentence"], r["variant"]) for r in rows] == [(s, v) for s in SENTENCES for v in experiment.VARIANTS]
    for r in rows:
        assert r["epoch"] == 2 and r["weights"] == "final" and r["seed"] == 42
        assert r["probability"] == pytest.approx(max(r["prob_positive"], 1 - r["prob_positive"]))
        assert r["label"] == ("positive" if r["prob_positive"] > 0.5 else "negative")
    engram_rows = [r for r in rows if r["variant"] == "dual_engram"]
    kmeans = json.loads((job(kept_run, "dual_engram") / "weights" / "final" / "kmeans.json").read_text())
    for r in engram_rows:
        assert len(r["engram"]) == 32 and r["cluster"] in (0, 1)
        e, c = np.array(r["engram"]), np.array(kmeans["centroids"])
        assert r["cluster"] == int(((c - e) ** 2).sum(1).argmin())  # the nearest centroid
    # the final epoch's K-Means is the analysis's: same engrams, same seed, same clusters
    with np.load(job(kept_run, "dual_engram") / "arrays.npz") as z:
        from train.weights import nearest_cluster

        assert nearest_cluster(kmeans, z["engrams"]).tolist() == z["clusters"].tolist()
    # a sentence is scored alone: the same numbers whichever sentences come with it
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(SENTENCES[2] + "\n"))
    predict.main([str(kept_run), "--json", "--weights", "final", "--variants", "dual_engram"])
    (alone,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert alone["prob_positive"] == pytest.approx(engram_rows[2]["prob_positive"], abs=1e-6)


def refusal(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        predict.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_predict_refuses_in_one_line(kept_run, tmp_path, capsys, monkeypatch):
    assert "holds no saved weights" in refusal(capsys, [str(tmp_path), "good"])
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("\n  \n"))
    assert "no sentences in standard input" in refusal(capsys, [str(kept_run)])
    assert "empty sentence" in refusal(capsys, [str(kept_run), "good", " "])
    assert "no saved weights (best) of seed 7" in refusal(capsys, [str(kept_run), "--seed", "7", "good"])
    # a vocabulary that does not fit the saved model, and a config this code's model does not have
    import shutil

    copy = tmp_path / "copy"
    folder = job(copy, "dual_head") / "weights" / "best"
    shutil.copytree(job(kept_run, "dual_head") / "weights" / "best", folder)
    vocab = json.loads((folder / "vocab.json").read_text())
    (folder / "vocab.json").write_text(json.dumps({**vocab, "itos": vocab["itos"][:-1]}))
    err = refusal(capsys, [str(copy), "good"])
    assert "cannot rebuild" in err and "vocabulary has" in err
    (folder / "vocab.json").write_text(json.dumps(vocab))
    meta = json.loads((folder / "weights.json").read_text())
    meta["config"]["model_config"]["future_field"] = 1
    (folder / "weights.json").write_text(json.dumps(meta))
    err = refusal(capsys, [str(copy), "good"])
    assert "cannot rebuild" in err and "future_field" in err and "check out that version" in err


def test_a_job_stopped_after_its_selected_epoch_keeps_its_weights_and_a_rerun_keeps_them(
    kept_run, sst2_small, tmp_path, monkeypatch
):
    out = tmp_path / "crashed"
    crash_after_saving(monkeypatch, "sentiment_only", 1)
    with pytest.raises(KeyboardInterrupt):
        run_small(sst2_small, out, "--variants", "sentiment_only")
    best = job(out, "sentiment_only") / "weights" / "best"
    assert saved_epoch(best) == 1 and not (best.parent / "final").exists()  # kept before the crash
    stamp = (best / "model.safetensors").stat().st_mtime_ns
    monkeypatch.undo()  # the real save_checkpoint again
    run_small(sst2_small, out, "--variants", "sentiment_only", "--resume")
    # the same weights as the uninterrupted run's, for the epoch its result selects
    for which in ("best", "final"):
        assert saved_epoch(best.parent / which) == recorded(out, "sentiment_only", which)["epoch"]
        mine = (best.parent / which / "model.safetensors").read_bytes()
        assert mine == (job(kept_run, "sentiment_only") / "weights" / which / "model.safetensors").read_bytes()
    if recorded(out, "sentiment_only", "best")["epoch"] == 1:  # epoch 2 did not beat it: its set was not rewritten
        assert (best / "model.safetensors").stat().st_mtime_ns == stamp
    # a rerun of the finished job rewrites nothing; --report-only needs no weights
    stamps = {p: p.stat().st_mtime_ns for p in best.parent.rglob("*") if p.is_file()}
    run_small(sst2_small, out, "--variants", "sentiment_only", "--resume")
    assert {p: p.stat().st_mtime_ns for p in best.parent.rglob("*") if p.is_file()} == stamps
    import shutil

    shutil.rmtree(best.parent)
    m = run_small(sst2_small, out, "--variants", "sentiment_only", "--report-only")
    assert m["complete"] and "sentiment_only" in m["models"]


def test_tensorboard_scalars_match_metrics_json(kept_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    m = json.loads((kept_run / "metrics.json").read_text())
    batches = -(-m["data"]["train"] // m["config"]["batch_size"])  # 320 rows in batches of 64: 5 a epoch
    for variant, mm in m["models"].items():
        acc = EventAccumulator(str(kept_run / "tensorboard" / "42" / variant))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        history = mm["runs"][0]["history"]
        for key in ("val_acc", "val_sent_loss", "train_loss", "train_acc", "val_lm_loss", "train_lm_loss"):
            if history[0][key] is None:
                assert f"epoch/{key}" not in tags
                continue
            events = acc.Scalars(f"epoch/{key}")
            assert [e.step for e in events] == [batches * h["epoch"] for h in history]
            assert [e.value for e in events] == pytest.approx([h[key] for h in history], rel=1e-6)
        # every 2 batches the mean loss of those batches, an epoch's last ones at its end: weighted by
        # the batches each covers, they give the epoch's mean training loss
        losses = acc.Scalars("train/loss")
        assert [e.step for e in losses] == [2, 4, 5, 6, 8, 10]  # every 2nd batch of the job, and each epoch end
        for epoch, h in zip((1, 2), history, strict=True):
            mine = [e for e in losses if batches * (epoch - 1) < e.step <= batches * epoch]
            sizes = np.diff([batches * (epoch - 1)] + [e.step for e in mine])
            assert np.dot(sizes, [e.value for e in mine]) / batches == pytest.approx(h["train_loss"], rel=1e-5)
        assert ("train/lm_loss" in tags) == (variant != "sentiment_only") and "train/sentiment_loss" in tags
        rates = [e.value for e in acc.Scalars("train/learning_rate")]
        assert rates == pytest.approx([3e-4] * len(losses))  # the written protocol has no schedule
