"""The two protocols (protocols.SMALL / protocols.BIG, `--protocol written|published`): the settings
each preset fixes reach the models, the optimisers, the training loop and the outputs.

`written` is the study's write-up (SPEC.md), `published` the study's code as it was run (SPEC.md,
"The study as it was run"). The end-to-end runs here are a few steps long; the sklearn analyses
and the figures they would also make are swapped for cheap stand-ins (other tests cover them),
and torch runs on one thread, which on a shared 2-core machine is several times faster."""

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import experiment
import experiment_7b as e7
from analysis import controls as analysis
from analysis import study_figures
from models import SmallConfig, build_small_model, count_parameters
from nets.small_transformer import SmallBackbone
from protocols import BIG, SMALL
from run import cli, settings, study
from train import loop as training
from train.checkpoints import seed_everything
from train.data import Encoded, collate

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread for this module (restored after): a small model on a shared 2-core
    machine runs several times faster than with two contending threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.figure(figsize=(1, 1))


def fast_analysis(mp: pytest.MonkeyPatch) -> None:
    """Cheap stand-ins for the sklearn probes, the random-compressor draws and the t-SNE figures;
    the trained model, its pooled states, engrams and ablation are still computed for real."""
    mp.setattr(analysis, "probe", lambda *a, **k: {"accuracy": 0.5, "control_accuracy": 0.5, "selectivity": 0.0})
    mp.setattr(analysis, "random_compressor_control", functools.partial(analysis.random_compressor_control, draws=1))
    mp.setattr(study, "engram_clusters", _tiny_figure)
    mp.setattr(study, "learning_curves", _tiny_figure)


def capture_initial_small_weights(mp: pytest.MonkeyPatch) -> dict:
    """Wrap experiment.make_builder so that every variant's weights are copied right after the
    builder made them (after checkpoints.seed_everything(seed), before any step): {variant: {name: tensor}}."""
    captured = {}
    original = experiment.make_builder

    def make_builder(*args, **kwargs):
        build = original(*args, **kwargs)

        def capturing(variant, seed, total_steps):
            built = build(variant, seed, total_steps)
            captured[variant] = {n: p.detach().clone() for n, p in built.model.named_parameters()}
            return built

        return capturing

    mp.setattr(experiment, "make_builder", make_builder)
    return captured


def short_small_run(data: Path, out: Path, protocol: str, *extra, variants=None) -> tuple[dict, dict]:
    """experiment.main on 128 training rows for 2 epochs; returns (metrics, initial weights)."""
    with pytest.MonkeyPatch.context() as mp:
        fast_analysis(mp)
        captured = capture_initial_small_weights(mp)
        m = experiment.main(
            [
                "--protocol",
                protocol,
                "--data-dir",
                str(data),
                "--max-train",
                "128",
                "--epochs",
                "2",
                "--no-progress",
                "--out",
                str(out),
                "--compare",
                str(out.parent / "absent.json"),
                *extra,
                *(["--variants", *variants] if variants is not None else []),
            ]
        )
    return m, captured


def published_small_config(vocab_size: int = 8000, protocol: str = "published", **over) -> SmallConfig:
    """The SmallConfig experiment.run() builds for `protocol`, from the CLI's defaults."""
    args = experiment.parse_args(["--protocol", protocol])
    sizes = dict(
        vocab_size=vocab_size,
        max_len=args.max_len,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        dropout=args.dropout,
        engram_dim=args.engram_dim,
        impl=args.impl,
    )
    sizes.update(over)
    return experiment.small_config(SMALL[protocol], **sizes)


def load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# ----------------------------------------------------------------------------- 1. parameter counts


def test_published_small_parameter_counts_are_the_studys_exactly():
    preset = SMALL["published"]
    assert len(preset.specials) + preset.vocab_words == 8000  # <PAD>, <UNK> and 7,998 words
    cfg = published_small_config(8000)
    counts = {
        v: count_parameters(build_small_model(v, cfg, preset.sent_weight, preset.lm_weight))
        for v in ("sentiment_only", "dual_head", "dual_engram")
    }
    assert (
        {v: c[0] for v, c in counts.items()}
        == study_figures.SMALL_STUDY["params"]
        == {"sentiment_only": 1_297_346, "dual_head": 2_329_346, "dual_engram": 2_354_082}
    )
    assert all(total == trainable for total, trainable in counts.values())


def test_written_small_parameter_counts_differ_from_the_published_ones():
    preset = SMALL["written"]
    V = len(preset.specials) + preset.vocab_words  # 7,004
    cfg = published_small_config(V, protocol="written")
    m1, m2, m3 = (
        build_small_model(v, cfg, preset.sent_weight, preset.lm_weight)
        for v in ("sentiment_only", "dual_head", "dual_engram")
    )
    backbone = sum(p.numel() for p in m1.backbone.parameters())
    assert abs(backbone - 1.3e6) / 1.3e6 < 0.05, backbone
    t1, t2, t3 = (count_parameters(m)[0] for m in (m1, m2, m3))
    assert t2 - t1 == cfg.d_model * V + V  # an untied LM head over the written vocabulary
    assert m2.backbone.lm_head.weight.data_ptr() != m2.backbone.tok.weight.data_ptr()
    for t, published in zip((t1, t2, t3), study_figures.SMALL_STUDY["params"].values()):
        assert t != published


# ----------------------------------------------------------------------------- 2. attention direction


def _hidden(backbone: SmallBackbone, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return backbone(backbone.embed(ids), mask)  # [B,T,d]


def _backbone(protocol: str, impl: str) -> SmallBackbone:
    torch.manual_seed(0)
    V = 8000 if protocol == "published" else 7004
    backbone = SmallBackbone(published_small_config(V, protocol=protocol, impl=impl), with_lm_head=False)
    return backbone.eval()


@pytest.mark.parametrize("impl", ["packed", "padded"])
def test_published_encoder_is_bidirectional_and_written_one_is_causal(impl):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 7000, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    later = ids.clone()
    later[:, 7] = (ids[:, 7] + 1) % 7000 + 2  # another word at position 7
    for protocol, sees_later in (("published", True), ("written", False)):
        backbone = _backbone(protocol, impl)
        assert backbone.cfg.causal == (protocol == "written")
        a, b = _hidden(backbone, ids, mask), _hidden(backbone, later, mask)
        assert not torch.allclose(a[:, 7], b[:, 7])  # the changed position itself always changes
        earlier_changed = not torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
        assert earlier_changed == sees_later, (protocol, (a[:, :7] - b[:, :7]).abs().max())


@pytest.mark.parametrize("impl", ["packed", "padded"])
def test_published_encoder_ignores_what_stands_in_pad_positions(impl):
    backbone = _backbone("published", impl)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(2, 7000, (3, 9), generator=g)
    lengths = torch.tensor([9, 5, 2])
    mask = (torch.arange(9)[None] < lengths[:, None]).long()
    padded = ids.masked_fill(mask == 0, 0)  # <PAD> = 0 beyond the mask
    other = ids.masked_fill(mask == 0, 17)  # a real word's id beyond the mask
    a, b = _hidden(backbone, padded, mask), _hidden(backbone, other, mask)
    real = mask.bool()
    assert torch.allclose(a[real], b[real], atol=1e-6), (a[real] - b[real]).abs().max()
    # a padded row computes what the row alone, unpadded, computes: pads are no keys at all
    for row, n in ((1, 5), (2, 2)):
        alone = _hidden(backbone, ids[row : row + 1, :n], mask[row : row + 1, :n])
        assert torch.allclose(a[row, :n], alone[0], atol=1e-5), (a[row, :n] - alone[0]).abs().max()
    # and the key-padding mask is what does it: the same rows with the pads marked real do change
    c = _hidden(backbone, other, torch.ones_like(mask))
    assert not torch.allclose(a[1, :5], c[1, :5], atol=1e-4)


# ----------------------------------------------------------------------------- 3. the small compressor


@pytest.fixture(scope="module")
def published_small_run(sst2_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("published_small") / "out"
    m, initial = short_small_run(sst2_small, out, "published", "--threads", "1")
    return out, m, initial


def test_published_small_run_never_trains_the_compressor(published_small_run):
    out, m, initial = published_small_run
    assert m["protocol"] == "published" and m["preset"] == dataclasses.asdict(SMALL["published"])
    w0 = initial["dual_engram"]["compressor.linear.weight"]  # [32,128]
    b0 = initial["dual_engram"]["compressor.linear.bias"]  # [32]
    folder = out / "checkpoints" / "seed42" / "dual_engram"
    # the last epoch's weights: the compressor is exactly as built, while the rest has trained
    final = load_safetensors(folder / "epoch_002" / "trainable.safetensors")
    assert torch.equal(final["compressor.linear.weight"], w0)
    assert torch.equal(final["compressor.linear.bias"], b0)
    for name in ("sentiment_head.0.weight", "projector.linear.weight", "backbone.blocks.0.qkv.weight"):
        assert not torch.equal(final[name], initial["dual_engram"][name]), name
    # the analysed engrams are the initial compressor applied to the final model's pooled states
    with np.load(folder / "arrays.npz") as z:
        pooled, engrams = z["pooled"], z["engrams"]
    assert pooled.dtype == np.float16 and engrams.shape == (96, 32)
    expected = torch.tanh(torch.from_numpy(pooled.astype(np.float32)) @ w0.T + b0).numpy()
    assert np.allclose(engrams, expected, atol=1e-2), np.abs(engrams - expected).max()
    # ... and not any other compressor of the same shape (the check can tell them apart)
    other = torch.tanh(torch.from_numpy(pooled.astype(np.float32)) @ w0.flip(0).T + b0.flip(0)).numpy()
    assert not np.allclose(engrams, other, atol=1e-2)
    assert m["models"]["dual_engram"]["runs"][0]["analysis"]["ablation"]["base"] == "zero"
    # ... and the report calls it what it is, not a trained engram
    report = (out / "REPORT.md").read_text()
    assert "| Never-trained engram |" in report and "so no loss reaches Model 3's compressor" in report
    assert "**Does the never-trained engram separate sentiment better than a random projection?**" in report
    assert "trained engram" not in report.lower().replace("never-trained engram", "")


def test_published_small_schedule_steps_once_per_epoch_to_zero(published_small_run):
    out, _, _ = published_small_run
    # 128 rows, batch 64, drop_last: 2 optimizer steps per epoch, 4 in all; the cosine schedule
    # (T_max = epochs = 2) stepped per epoch has stepped twice and ends at lr 0
    state = torch.load(
        out / "checkpoints" / "seed42" / "sentiment_only" / "epoch_002" / "train_state.pt", weights_only=True
    )
    assert state["scheduler"]["last_epoch"] == 2 and state["scheduler"]["T_max"] == 2
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 0.01
    steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {4}


def test_written_small_run_trains_the_compressor(sst2_small, tmp_path):
    out = tmp_path / "out"
    m, initial = short_small_run(sst2_small, out, "written", "--threads", "1", variants=("dual_engram",))
    assert m["protocol"] == "written"
    final = load_safetensors(out / "checkpoints" / "seed42" / "dual_engram" / "epoch_002" / "trainable.safetensors")
    w0 = initial["dual_engram"]["compressor.linear.weight"]
    assert not torch.equal(final["compressor.linear.weight"], w0)
    assert (final["compressor.linear.weight"] - w0).abs().max() > 1e-5


# ----------------------------------------------------------------------------- 4. accumulation and clipping


def _accum_recipe(batch: int, accum: int, optimizer: str, clip) -> training.Recipe:
    cfg = published_small_config(64, dropout=0.0)

    def build(variant, seed, total_steps):
        model = build_small_model(variant, cfg, 1.0, 0.3)
        model.sentiment_head[2].p = 0.0  # the MLP head's own dropout, so both runs compute the same function
        if optimizer == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
        else:
            # eps well above float rounding: Adam's first step is lr * g / (|g| + eps), so with the default
            # 1e-8 a gradient that is zero up to rounding (the key bias's) becomes a full +-lr step of either sign
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, eps=1e-4)
        return training.Built(model, opt)

    return training.Recipe(
        "small", build, lambda v: batch, 1, CPU, accum_steps=lambda v: accum, clip_norm=clip, progress=False
    )


@pytest.mark.parametrize("optimizer, clip", [("sgd", None), ("adamw", None), ("sgd", 0.05)])
def test_two_accumulated_batches_of_8_are_one_batch_of_16(optimizer, clip, tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(2, 12, (16,), generator=g).tolist()
    rows = [torch.randint(2, 64, (n,), generator=g).tolist() for n in lengths]
    enc = Encoded(rows, [i % 2 for i in range(16)], 0)
    order = np.random.default_rng(0).permutation(16)
    monkeypatch.setattr(
        training,
        "epoch_batches",
        lambda n, bs, seed, epoch, drop_last=False: [order[i : i + bs] for i in range(0, n, bs)],
    )
    steps = []
    step = training._optimizer_step
    monkeypatch.setattr(training, "_optimizer_step", lambda built, recipe: (steps.append(1), step(built, recipe)))

    def trained(batch, accum, name):
        steps.clear()
        _, built = training.train_variant(
            _accum_recipe(batch, accum, optimizer, clip),
            "sentiment_only",
            0,
            enc,
            {"validation": enc},
            tmp_path / name,
            False,
        )
        return dict(built.model.named_parameters()), len(steps)

    seed_everything(0)
    initial = dict(build_small_model("sentiment_only", published_small_config(64, dropout=0.0)).named_parameters())
    accumulated, n_acc = trained(8, 2, "accumulated")
    whole, n_whole = trained(16, 1, "whole")
    separate, n_sep = trained(8, 1, "separate")
    assert (n_acc, n_whole, n_sep) == (1, 1, 2)
    assert all(not torch.equal(p, initial[n]) for n, p in whole.items())  # the step moved every tensor
    for name, p in whole.items():
        assert torch.allclose(accumulated[name], p, atol=1e-6), (name, (accumulated[name] - p).abs().max())
    # two separate steps end elsewhere: the comparison can tell the difference
    assert any(not torch.allclose(separate[n], p, atol=1e-6) for n, p in whole.items())


def test_optimizer_step_clips_the_gradient_norm_to_the_recipes():
    w = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([w], lr=1.0)
    built = training.Built(model=None, optimizer=opt)
    for clip, expected in ((1.0, 1.0), (None, 10.0)):
        w.data.zero_()
        w.grad = torch.tensor([6.0, 8.0, 0.0, 0.0])  # norm 10
        recipe = training.Recipe("small", None, lambda v: 8, 1, CPU, clip_norm=clip)
        training._optimizer_step(built, recipe)
        assert float(w.detach().norm()) == pytest.approx(expected, rel=1e-5)
        assert w.grad is None  # zeroed for the next step


# ----------------------------------------------------------------------------- 5. optimiser presets


def _cosine_warmup_steps(scheduler, total: int) -> int:
    """The number of linear warm-up steps of get_cosine_schedule_with_warmup, read off its lambda."""
    lam = scheduler.lr_lambdas[0]
    k = 0
    while k < total and lam(k) < 1.0:
        k += 1
    return k


@pytest.mark.parametrize(
    "protocol, total, warmup, clip, batches, accums, drop_last, decay, eval_mode",
    [
        ("published", 110, 5, 1.0, (8, 8, 4), (2, 2, 4), True, 0.01, "zero"),  # int(0.05 * 110) = int(5.5) = 5
        ("written", 190, 5, None, (8, 8, 8), (1, 1, 1), False, 0.0, "pair"),  # int(0.03 * 190) = int(5.7) = 5
    ],
)
def test_7b_presets_reach_the_scheduler_optimizer_and_recipe(
    protocol, total, warmup, clip, batches, accums, drop_last, decay, eval_mode, tiny_qwen
):
    args = e7.parse_args(["--model", str(tiny_qwen), "--protocol", protocol])
    preset = BIG[protocol]
    s = e7.settings(args)
    build, dtype = e7.make_builder(s.model, s.training.lr, CPU, str(tiny_qwen), preset)
    assert dtype == torch.float32
    built = build("sentiment_only", 0, total)
    lam = built.scheduler.lr_lambdas[0]
    assert _cosine_warmup_steps(built.scheduler, total) == warmup == int(preset.warmup_ratio * total)
    for k in range(warmup + 1):  # linear ramp from 0 to the peak
        assert lam(k) == pytest.approx(k / warmup)
    assert lam(warmup + 1) < 1.0 and lam(total) == pytest.approx(0.0, abs=1e-9)  # then cosine decay to 0
    assert built.scheduler_per == "step" and built.scheduler.get_last_lr() == [0.0]
    (group,) = built.optimizer.param_groups
    assert (
        isinstance(built.optimizer, torch.optim.AdamW)
        and group["initial_lr"] == 2e-4
        and group["weight_decay"] == decay
    )
    recipe = e7.make_recipe(s.model, s.training, preset, build, CPU)
    variants = ("sentiment_only", "dual_head", "dual_engram")
    assert tuple(recipe.batch_size(v) for v in variants) == batches
    assert tuple(recipe.accum_steps(v) for v in variants) == accums
    assert recipe.clip_norm == clip and recipe.drop_last is drop_last
    assert recipe.train_mode == "pair" and recipe.eval_mode == eval_mode
    # optimizer steps per epoch: ceil(batches / accumulation), batches rounded down with drop_last
    per_epoch = {v: -(-((100 // b) if drop_last else -(-100 // b)) // a) for v, b, a in zip(variants, batches, accums)}
    assert {v: recipe.steps_per_epoch(v, 100) for v in variants} == per_epoch
    if protocol == "published":
        assert per_epoch == {"sentiment_only": 6, "dual_head": 6, "dual_engram": 7}  # 12 / 2, and 25 / 4 rounded up


def _small_recipe(protocol: str, data: Path, out: Path, monkeypatch) -> tuple[training.Recipe, object]:
    """The Recipe experiment.run() builds, captured instead of run."""
    captured = {}

    def capture(mode, recipe, settings, *rest):
        captured["recipe"], captured["args"] = recipe, settings.training
        return {}

    monkeypatch.setattr(experiment, "run_and_report", capture)
    experiment.main(
        ["--protocol", protocol, "--data-dir", str(data), "--max-train", "64", "--no-progress", "--out", str(out)]
    )
    return captured["recipe"], captured["args"]


def test_small_published_preset_reaches_the_optimizer_schedule_and_loop(sst2_small, tmp_path, monkeypatch):
    recipe, args = _small_recipe("published", sst2_small, tmp_path, monkeypatch)
    assert recipe.clip_norm == 1.0 and recipe.drop_last is True and recipe.batch_size("dual_engram") == 64
    assert recipe.accum_steps("dual_engram") == 1 and recipe.train_mode == recipe.eval_mode == "zero"
    built = recipe.build("dual_head", 0, 10)
    assert type(built.optimizer) is torch.optim.AdamW
    (group,) = built.optimizer.param_groups
    assert group["weight_decay"] == 0.01 and group["lr"] == 3e-4
    assert isinstance(built.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert built.scheduler.T_max == args.epochs == 8 and built.scheduler_per == "epoch"
    assert built.model.spec.sent_weight == 1.0 and built.model.spec.lm_weight == 0.3
    assert recipe.steps_per_epoch("dual_head", 100) == 1  # drop_last: 100 // 64 batches


def test_small_written_preset_is_adam_without_schedule_or_clipping(sst2_small, tmp_path, monkeypatch):
    recipe, _ = _small_recipe("written", sst2_small, tmp_path, monkeypatch)
    assert recipe.clip_norm is None and recipe.drop_last is False and recipe.batch_size("dual_engram") == 64
    assert recipe.train_mode == recipe.eval_mode == "pair"
    built = recipe.build("dual_head", 0, 10)
    assert type(built.optimizer) is torch.optim.Adam
    (group,) = built.optimizer.param_groups
    assert group["weight_decay"] == 0 and group["lr"] == 3e-4
    assert built.scheduler is None
    assert built.model.spec.sent_weight == 0.5 and built.model.spec.lm_weight == 0.5
    assert recipe.steps_per_epoch("dual_head", 100) == 2  # the short final batch is kept


# ----------------------------------------------------------------------------- 6. the prefix's LM target


@pytest.fixture(scope="module")
def qwen_batch(tiny_qwen):
    tok = e7.load_tokenizer(str(tiny_qwen))
    texts = ["it is not bad at all", "dull", "a fine , moving film"]
    enc = Encoded(tok(texts)["input_ids"], [1, 0, 1], tok.pad_token_id)
    ids, mask, labels = collate(enc, range(3), CPU)
    assert mask.sum(1).min() < mask.shape[1]  # some row is padded
    return ids, mask, labels


def _qlora(protocol: str, tiny_qwen):
    from qlora.loading import build_qlora_model

    args = e7.parse_args(["--model", str(tiny_qwen), "--protocol", protocol])
    torch.manual_seed(0)
    model = build_qlora_model(e7.settings(args).model, "dual_engram", CPU, torch.float32, str(tiny_qwen), BIG[protocol])
    return model.eval()


@pytest.mark.parametrize("protocol", ["published", "written"])
def test_7b_prefix_position_predicts_the_first_token_only_when_published(protocol, tiny_qwen, qwen_batch):
    ids, mask, labels = qwen_batch
    model = _qlora(protocol, tiny_qwen)
    assert model.spec.prefix_predicts_first == (protocol == "published")
    assert model.spec.pooling == BIG[protocol].pooling
    B = ids.shape[0]
    with torch.no_grad():
        out = model(ids, mask, labels=labels)
        # by hand: [prefix, tokens] through the decoder; position j predicts ids[:, j]
        prefix = model.projector(model.zero_engram(B, CPU)).unsqueeze(1)  # [B,1,H]
        full = model.backbone(
            torch.cat([prefix, model.backbone.embed(ids)], 1), torch.cat([mask.new_ones(B, 1), mask], 1)
        ).float()  # [B,1+T,H]
        logits = model.backbone.lm_head_module()(full[:, :-1]).float()  # [B,T,V]: position j -> token j
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none")  # [B,T]
    real = mask.bool()
    if protocol == "published":
        assert out.lm_count == int(mask.sum())  # every real token is a target, the first one too
        expected = ce[real].sum()
    else:
        assert out.lm_count == int(mask.sum()) - B  # the first token of each row is never a target
        expected = ce[:, 1:][real[:, 1:]].sum()
    assert torch.allclose(out.lm_sum, expected, rtol=1e-4, atol=1e-4), (float(out.lm_sum), float(expected))
    assert torch.allclose(out.lm_loss, expected / out.lm_count, rtol=1e-4)
    # the two readings differ by exactly the first tokens' cross-entropy
    first = ce[:, 0].sum()
    assert float(first) > 0
    if protocol == "published":
        assert torch.allclose(out.lm_sum - first, ce[:, 1:][real[:, 1:]].sum(), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- 7. 7B end to end


def test_7b_published_protocol_runs_end_to_end(tiny_qwen, sst2_small, tmp_path):
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as mp:
        fast_analysis(mp)
        m = e7.main(
            [
                "--protocol",
                "published",
                "--model",
                str(tiny_qwen),
                "--data-dir",
                str(sst2_small),
                "--out",
                str(out),
                "--max-train",
                "24",
                "--max-eval",
                "16",
                "--epochs",
                "1",
                "--no-progress",
                "--small-results",
                str(tmp_path / "none.json"),
                "--compare",
                str(tmp_path / "none.json"),
            ]
        )
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(m))
    assert saved["protocol"] == "published" and saved["overrides"] == {}
    assert saved["preset"] == dataclasses.asdict(BIG["published"]) and saved["preset"]["pooling"] == "mean"
    assert (saved["config"]["weight_decay"], saved["config"]["warmup_ratio"], saved["config"]["clip_norm"]) == (
        0.01,
        0.05,
        1.0,
    )
    assert list(saved["models"]) == ["sentiment_only", "dual_head", "dual_engram"]
    assert saved["models"]["dual_engram"]["runs"][0]["analysis"]["ablation"]["base"] == "zero"
    report = (out / "REPORT.md").read_text()
    assert "protocol `published`" in report.splitlines()[0]
    # 24 rows: batches of 8 (accumulation 2) or 4 (accumulation 4), drop_last -> 2 optimizer steps each
    for v in saved["models"]:
        state = torch.load(out / "checkpoints" / "seed42" / v / "epoch_001" / "train_state.pt", weights_only=True)
        assert state["scheduler"]["last_epoch"] == 2, v
        assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {2}, v


# ----------------------------------------------------------------------------- 8. overrides and output folders


def test_explicit_flags_and_set_are_recorded_as_overrides():
    args = experiment.parse_args(["--protocol", "published", "--lm-weight", "0.5"])
    preset, overrides = cli.preset_of(args, SMALL, experiment.PRESET_FLAGS)
    assert overrides == {"lm_weight": 0.5}
    assert preset == dataclasses.replace(SMALL["published"], lm_weight=0.5)
    assert args.lm_weight == 0.5 and args.weight_decay == 0.01 and args.clip_norm == 1.0 and args.d_ff == 256
    # a flag equal to the preset's value is no override; --set reaches any field
    args = experiment.parse_args(["--protocol", "published", "--lm-weight", "0.3", "--set", "causal=true"])
    preset, overrides = cli.preset_of(args, SMALL, experiment.PRESET_FLAGS)
    assert overrides == {"causal": True} and preset.causal and preset.name == "published"
    args = e7.parse_args(["--protocol", "published", "--warmup-ratio", "0.1"])
    assert cli.preset_of(args, BIG, e7.PRESET_FLAGS)[1] == {"warmup_ratio": 0.1}
    assert cli.preset_of(experiment.parse_args([]), SMALL, experiment.PRESET_FLAGS) == (SMALL["written"], {})


def test_an_override_is_recorded_in_metrics_and_changes_the_loss(sst2_small, tmp_path):
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as mp:
        fast_analysis(mp)
        experiment.main(
            [
                "--variants",
                "dual_head",
                "--protocol",
                "published",
                "--lm-weight",
                "0.5",
                "--data-dir",
                str(sst2_small),
                "--max-train",
                "64",
                "--epochs",
                "1",
                "--no-progress",
                "--threads",
                "1",
                "--out",
                str(out),
                "--compare",
                str(tmp_path / "none.json"),
            ]
        )
    m = json.loads((out / "metrics.json").read_text())
    assert m["protocol"] == "published" and m["overrides"] == {"lm_weight": 0.5}
    assert m["preset"]["lm_weight"] == 0.5 and m["preset"]["sent_weight"] == 1.0
    assert m["config"]["lm_weight"] == 0.5
    # one batch of 64 (drop_last) in the epoch: its loss is 1.0 * CE + 0.5 * LM, not 0.3 * LM
    (h,) = m["models"]["dual_head"]["runs"][0]["history"]
    assert h["train_loss"] == pytest.approx(h["train_sent_loss"] + 0.5 * h["train_lm_loss"], rel=1e-5)
    assert h["train_loss"] != pytest.approx(h["train_sent_loss"] + 0.3 * h["train_lm_loss"], rel=1e-3)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("module, base", [(experiment, "results"), (e7, "results_7b")])
def test_default_out_folder_is_per_protocol(module, base, monkeypatch):
    assert settings.default_out(base, "written") == Path(base)
    assert settings.default_out(base, "published") == Path(base) / "published"
    seen = []

    def check_writable(folder):
        seen.append(Path(folder))
        raise _Stop

    monkeypatch.setattr(module, "check_writable", check_writable)
    extra = ["--no-4bit"] if module is e7 else []
    for protocol in ("written", "published"):
        with pytest.raises(_Stop):
            module.main(["--protocol", protocol, *extra])
    with pytest.raises(_Stop):
        module.main(["--protocol", "published", "--out", "elsewhere", *extra])
    assert seen == [Path(base), Path(base) / "published", Path("elsewhere")]


def test_the_other_protocol_is_looked_for_beside_this_runs_folder():
    """A run in OUT compares with OUT/published and one in OUT/published with OUT; a published run
    in a folder outside that layout compares with nothing unless --compare names a file."""

    def where(*argv):
        return settings.other_protocol_metrics(experiment.settings(experiment.parse_args(list(argv))).run, "results")

    assert where() == Path("results/published/metrics.json")
    assert where("--protocol", "published") == Path("results/metrics.json")
    assert where("--out", "runs/smol") == Path("runs/smol/published/metrics.json")
    assert where("--protocol", "published", "--out", "runs/smol/published") == Path("runs/smol/metrics.json")
    assert where("--protocol", "published", "--out", "elsewhere") is None
    assert where("--protocol", "published", "--out", "elsewhere", "--compare", "x.json") == Path("x.json")
    assert study.read_metrics(None) is None


# ----------------------------------------------------------------------------- regression


def test_published_run_from_the_repo_root_reports_beside_the_committed_written_results(
    sst2_small, tmp_path, monkeypatch, capsys, published_small_run
):
    """From the repo root, --compare's default for a published run is results/metrics.json: there
    may lie a written run whose metrics predate the protocols (no "protocol" or "preset", a scalar
    study_delta). The report must skip the comparison, not fail (it raised KeyError before 5fc2e19)."""
    _, m, _ = published_small_run
    old = {k: v for k, v in m.items() if k not in ("protocol", "preset", "overrides")}
    old["hypotheses"] = {h: {**v, "study_delta": v["study_delta"]["final"]} for h, v in m["hypotheses"].items()}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "metrics.json").write_text(json.dumps(old))
    monkeypatch.chdir(tmp_path)
    with pytest.MonkeyPatch.context() as mp:
        fast_analysis(mp)
        experiment.main(
            [
                "--variants",
                "sentiment_only",
                "--protocol",
                "published",
                "--data-dir",
                str(sst2_small),
                "--max-train",
                "64",
                "--epochs",
                "1",
                "--no-progress",
                "--threads",
                "1",
                "--out",
                str(tmp_path / "out"),
            ]
        )
    assert "warning" not in capsys.readouterr().err
    report = (tmp_path / "out" / "REPORT.md").read_text()
    assert "protocol `published`" in report.splitlines()[0] and "As written vs as run" not in report


def test_as_written_vs_as_run_sets_both_protocols_beside_the_study(published_small_run):
    """Given the other protocol's metrics, the report adds the side-by-side section: both commands,
    how many seeds each stands on, each model's accuracy beside the study's, the verdicts and the
    engram control; an unfinished run says so."""
    import copy

    from analysis import reporting

    _, pub, _ = published_small_run
    written = copy.deepcopy(pub)
    written.update(protocol="written", command="python experiment.py --seeds 42 43", seeds=[42, 43], complete=False)
    written["preset"]["engram_feedback"] = True  # the written reading trains its compressor
    for v in written["models"].values():
        v["best_val_acc"]["mean"] = 12.34  # a number the published run cannot have
    text = "\n".join(reporting.protocols_section(pub, written))
    assert text.startswith("## As written vs as run")
    assert "1 of 2 seeds finished, shortened, incomplete) by `python experiment.py --seeds 42 43`" in text
    assert f"1 seed, shortened) by `{pub['command']}`" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| Model 1: Sentiment Only"))
    assert row.split(" | ")[1].startswith("12.34") and "| 80.28 |" in row  # written, then the study's best
    assert "| H1 (dual_head - sentiment_only) |" in text and "untrained compressors" in text
    ari = next(ln for ln in text.splitlines() if ln.startswith("| ARI, Model 3's own compressor |")).split(" | ")
    assert "never trained" not in ari[1] and ari[2].endswith(" (never trained)")  # written trains it, published never
    # the same protocol on both sides, or an older metrics file, gives no section
    assert reporting.protocols_section(pub, pub) == []
    other_model = copy.deepcopy(written)
    other_model["config"]["model"] = "another/model"  # the 7B script's runs name their model
    assert reporting.protocols_section(pub, other_model) == []
    assert reporting.protocols_section(pub, {k: v for k, v in written.items() if k != "preset"}) == []
