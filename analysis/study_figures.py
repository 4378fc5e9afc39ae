"""The study's published figures: every number its results files hold, which the reports set
beside ours (moved from protocols.py, which keeps the presets)."""

from __future__ import annotations

# Every figure is the study's own, read from the results files its code wrote (github.com/MikeyBeez/
# sentiment, commit 74b97c0): `results/results.json` (small) and `results_7b/results.json` (7B). The
# code stored best and final small accuracies unrounded and everything else rounded to 4 decimals;
# each rounded accuracy is one count out of the 872 validation rows, so the deltas below are computed
# from those counts (exact), never from rounded percentages.

N_VAL = 872


def _pct(correct: int) -> float:
    return 100 * correct / N_VAL


def _deltas(best: dict, final: dict) -> dict:
    """H1 = dual_head - sentiment_only, H2 = dual_engram - dual_head, in points, best and final epoch."""
    pairs = {"H1": ("dual_head", "sentiment_only"), "H2": ("dual_engram", "dual_head")}
    return {
        kind: {h: acc[a] - acc[b] for h, (a, b) in pairs.items()} for kind, acc in (("best", best), ("final", final))
    }


SMALL_STUDY = {
    "source": "github.com/MikeyBeez/sentiment@74b97c0 results/results.json",
    # best_val / final_val, stored unrounded: 700, 706, 692 and 696, 706, 692 of 872
    "best": {"sentiment_only": _pct(700), "dual_head": _pct(706), "dual_engram": _pct(692)},
    "final": {"sentiment_only": _pct(696), "dual_head": _pct(706), "dual_engram": _pct(692)},
    "curves": {  # val_accs and train_accs per epoch, stored rounded to 4 decimals, in %
        "val_acc": {
            "sentiment_only": [75.23, 76.72, 79.01, 79.01, 80.28, 79.70, 79.93, 79.82],
            "dual_head": [73.97, 77.41, 78.78, 80.28, 79.70, 80.16, 80.62, 80.96],
            "dual_engram": [68.81, 76.61, 77.18, 77.98, 78.56, 77.75, 79.01, 79.36],
        },
        "train_acc": {
            "sentiment_only": [67.26, 78.34, 83.32, 85.92, 87.48, 88.62, 89.31, 89.76],
            "dual_head": [64.34, 75.81, 80.64, 83.20, 84.90, 85.97, 86.83, 87.25],
            "dual_engram": [64.23, 74.82, 79.66, 82.15, 83.97, 85.21, 86.00, 86.56],
        },
    },
    "engram": {"ari": 0.2356, "cluster_accuracy": 74.31},  # engram_analysis, stored rounded to 4 decimals
    "params": {"sentiment_only": 1_297_346, "dual_head": 2_329_346, "dual_engram": 2_354_082},
    "minutes_gpu": 30,  # the write-up's figure; not in the results file
}
SMALL_STUDY["deltas"] = _deltas(SMALL_STUDY["best"], SMALL_STUDY["final"])  # H1 +0.688 / +1.147, H2 -1.606 / -1.606

# val[].accuracy per epoch: 823, 832, 839 / 836, 844, 842 / 833, 843, 843 correct of 872
_BIG_EPOCHS = {"sentiment_only": [823, 832, 839], "dual_head": [836, 844, 842], "dual_engram": [833, 843, 843]}
BIG_STUDY = {
    "source": "github.com/MikeyBeez/sentiment@74b97c0 results_7b/results.json",
    "epochs": {v: [_pct(c) for c in counts] for v, counts in _BIG_EPOCHS.items()},
    "best": {v: _pct(max(counts)) for v, counts in _BIG_EPOCHS.items()},
    "final": {v: _pct(counts[-1]) for v, counts in _BIG_EPOCHS.items()},
    "minutes": {"sentiment_only": 380.4, "dual_head": 416.5, "dual_engram": 634.5},  # training_time_min
    # train[2]: loss, sentiment loss, LM loss, accuracy (%), each the mean over the epoch's batches of
    # the per-batch means (Model 3: of the mean of its two halves), as the study's code averages them
    "train_epoch3": {
        "sentiment_only": [0.0576, 0.0576, None, 98.45],
        "dual_head": [0.4575, 0.0326, 0.8825, 98.80],
        "dual_engram": [0.7926, 0.0341, 1.5512, 98.75],
    },
    # val[].lm_loss per epoch, the mean over validation batches of each batch's mean over its targets
    "val_lm_loss": {"dual_head": [3.8771, 4.3116, 4.6865], "dual_engram": [3.886, 4.3551, 4.6955]},
    "engram": {"ari": 0.8331, "cluster_accuracy": 95.64, "within_class_cosine": 0.9533, "between_class_cosine": 0.8375},
    "trainable_params": 41e6,  # the write-up's "~41 M of ~4.4 B"; not in the results file
    "total_params": 4.4e9,
    "gpu": "RTX 4080 16 GB",
}
BIG_STUDY["deltas"] = _deltas(BIG_STUDY["best"], BIG_STUDY["final"])  # H1 +0.573 / +0.344, H2 -0.115 / +0.115
BIG_STUDY["curves"] = {"val_acc": BIG_STUDY["epochs"]}
