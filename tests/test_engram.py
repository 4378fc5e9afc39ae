import numpy as np
import pytest
import torch

from engram import cluster_accuracy, cosine_similarities, engram_metrics, probe, run_batch, split_halves
from models import SmallConfig, build_small_model
from tests.test_models import batch


def test_split_halves_gives_the_odd_example_to_the_first_half():
    assert split_halves(8) == (4, 4)
    assert split_halves(7) == (4, 3)
    assert split_halves(1) == (1, 0)


def _compressor_grad(model, loss):
    model.zero_grad()
    loss.backward(retain_graph=True)
    return model.compressor.linear.weight.grad


def test_second_half_loss_trains_the_compressor_and_first_half_alone_does_not():
    torch.manual_seed(0)
    model = build_small_model("dual_engram", SmallConfig(dropout=0.0))
    ids, mask, labels = batch()
    # the first half alone (zero engram): its loss never touches the compressor
    first = model(ids[:2], mask[:2], labels=labels[:2])
    g = _compressor_grad(model, first.loss)
    assert g is None or torch.count_nonzero(g) == 0
    # the second half, fed the first half's (not detached) engrams, does
    second = model(ids[2:], mask[2:], labels=labels[2:], engram=first.engram)
    assert torch.count_nonzero(_compressor_grad(model, second.loss)) > 0
    # the pair step's loss is the mean of the two halves' losses
    out = run_batch(model, ids, mask, labels)
    assert torch.allclose(out.loss, (first.loss + second.loss) / 2, atol=1e-6)
    assert torch.count_nonzero(_compressor_grad(model, out.loss)) > 0


def test_batch_means_are_the_studys_average_of_the_halves_means():
    """The study's 7B code logs (mean loss of half 1 + mean loss of half 2) / 2 per batch; with an odd
    batch that differs from the mean over the batch's examples (or target tokens)."""
    torch.manual_seed(0)
    model = build_small_model("dual_engram", SmallConfig(dropout=0.0))
    ids, mask, labels = batch()
    ids, mask, labels = ids[:3], mask[:3], labels[:3]  # halves of 2 and 1
    first = model(ids[:2], mask[:2], labels=labels[:2])
    second = model(ids[2:], mask[2:], labels=labels[2:], engram=first.engram[:1])
    out = run_batch(model, ids, mask, labels)
    assert out.sent_mean == pytest.approx((first.sent_loss + second.sent_loss).item() / 2, abs=1e-6)
    assert out.lm_mean == pytest.approx((first.lm_loss + second.lm_loss).item() / 2, abs=1e-6)
    assert out.sent_mean != pytest.approx(out.sent_sum / 3, abs=1e-4)
    assert out.lm_mean != pytest.approx(out.lm_sum / out.lm_count, abs=1e-4)
    single = run_batch(build_small_model("sentiment_only", SmallConfig(dropout=0.0)), ids, mask, labels)
    assert single.sent_mean == pytest.approx(single.sent_sum / 3, abs=1e-6) and single.lm_mean is None


def test_detached_engram_would_not_train_the_compressor():
    torch.manual_seed(0)
    model = build_small_model("dual_engram", SmallConfig(dropout=0.0))
    ids, mask, labels = batch()
    first = model(ids[:2], mask[:2], labels=labels[:2])
    second = model(ids[2:], mask[2:], labels=labels[2:], engram=first.engram.detach())
    g = _compressor_grad(model, second.loss)
    assert g is None or torch.count_nonzero(g) == 0


def test_separated_engrams_give_ari_and_accuracy_one_under_a_label_permutation():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 50 + [1] * 50)
    x = np.concatenate([rng.normal(5, 0.1, (50, 8)), rng.normal(-5, 0.1, (50, 8))])
    m, clusters = engram_metrics(x, labels, seed=0)
    assert m["ari"] == pytest.approx(1.0)
    assert m["cluster_accuracy"] == pytest.approx(1.0)
    assert cluster_accuracy(labels, 1 - labels) == 1.0  # cluster ids swapped
    assert cluster_accuracy(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])) == 0.5


def test_cosine_similarities_known_values():
    x = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 1.0]])
    within, between = cosine_similarities(x, np.array([0, 0, 1, 1]))
    assert within == pytest.approx(1.0) and between == pytest.approx(0.0)
    x = np.array([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    within, between = cosine_similarities(x, np.array([0, 0, 1]))
    assert within == pytest.approx(1 / np.sqrt(2))
    assert between == pytest.approx((-1 + -1 / np.sqrt(2)) / 2)


def test_probe_separates_separable_data_and_not_random_data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    separable = rng.normal(size=(300, 5)) + 3 * y[:, None]
    sep = probe(separable, y, seed=0)
    rand = probe(rng.normal(size=(300, 5)), y, seed=0)
    assert sep["accuracy"] > 0.95 and sep["selectivity"] > 0.3
    assert abs(rand["accuracy"] - 0.5) < 0.1 and abs(rand["selectivity"]) < 0.15


def test_ablation_distinguishes_a_model_that_ignores_its_prefix_from_one_that_uses_it():
    torch.manual_seed(0)
    model = build_small_model("dual_engram", SmallConfig(vocab_size=50, dropout=0.0)).eval()
    ids, mask, labels = batch(V=50)
    with torch.no_grad():
        model.projector.linear.weight.zero_()  # every engram maps to the same prefix: ignored
        modes = {
            m: run_batch(model, ids, mask, labels, mode=m, generator=torch.Generator().manual_seed(0)).sent_logits
            for m in ("pair", "zero", "shuffled")
        }
        assert torch.allclose(modes["pair"], modes["zero"]) and torch.allclose(modes["zero"], modes["shuffled"])
        model.projector.linear.weight.normal_(std=5.0)  # a prefix that depends on the engram
        modes = {
            m: run_batch(model, ids, mask, labels, mode=m, generator=torch.Generator().manual_seed(0)).sent_logits
            for m in ("pair", "zero", "shuffled")
        }
        assert not torch.allclose(modes["pair"], modes["zero"])
        assert not torch.allclose(modes["zero"], modes["shuffled"])
