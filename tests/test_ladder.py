"""--variants and the ladder: a rung's preset differs from the base in exactly its fields; a run of
fewer variants says so and reports the hypotheses it cannot test as not run; a shortened ladder
runs end to end into LADDER.md, ladder.json and ladder.png; the report names the rungs that move a
figure beyond seed noise, and no others."""

from __future__ import annotations

import dataclasses
import json
import shlex

import pytest

import experiment
import experiment_7b as e7
import protocols
from protocols import BIG, BIG_RUNGS, SMALL, SMALL_RUNGS
from run import cli, ladder
from tests.conftest import tiny_flags

TINY = tiny_flags()


def differing(a, b) -> set[str]:
    return {f.name for f in dataclasses.fields(a) if f.name != "name" and getattr(a, f.name) != getattr(b, f.name)}


@pytest.mark.parametrize("presets, rungs", [(SMALL, SMALL_RUNGS), (BIG, BIG_RUNGS)])
@pytest.mark.parametrize("base", ["written", "published"])
def test_each_rung_differs_from_the_base_in_exactly_its_fields(presets, rungs, base):
    other = presets[protocols.other_protocol(presets, base)]
    steps = protocols.ladder(presets, rungs, base)
    assert [n for n, _, _ in steps] == ["base", *(r.name for r in rungs), "other"]
    covered = set()
    for rung in rungs:
        preset, fields = protocols.rung_preset(presets, rungs, base, rung.name)
        assert differing(preset, presets[base]) == set(fields) == set(rung.fields) & differing(other, presets[base]), (
            rung
        )
        assert all(getattr(preset, f) == getattr(other, f) for f in fields)
        assert fields, f"{rung.name} changes nothing between the two readings"
        covered |= set(fields)
    # the rungs together are every difference: the far end is the other protocol, field for field
    assert covered == differing(other, presets[base])
    far, _ = protocols.rung_preset(presets, rungs, base, "other")
    assert differing(far, other) == set() and protocols.rung_preset(presets, rungs, base, "base")[0] == presets[base]


def test_a_rung_from_the_command_line_is_recorded_as_its_overrides():
    args = experiment.parse_args(["--rung", "attention", "--set", "lm_weight=0.3"])
    preset, overrides = cli.preset_of(args, SMALL, experiment.PRESET_FLAGS)
    assert overrides == {"causal": False, "lm_weight": 0.3} and not preset.causal and preset.name == "written"
    args = e7.parse_args(["--protocol", "published", "--rung", "precision"])
    assert cli.preset_of(args, BIG, e7.PRESET_FLAGS)[1] == {"autocast": True}
    with pytest.raises(SystemExit):
        experiment.parse_args(["--rung", "pooling"])  # a 7B rung is not a small one


def test_rung_argv_replaces_the_ladder_flags_with_the_rungs_own(tmp_path):
    argv = [
        "--ladder",
        "--data-dir",
        "D",
        "--out",
        "O",
        "--variants",
        "sentiment_only",
        "dual_engram",
        "--seeds",
        "42",
        "43",
        "--protocol",
        "written",
    ]
    got = ladder.rung_argv(
        argv,
        tmp_path,
        "attention",
        ("sentiment_only", "dual_head"),
        "written",
        "published",
        ["sentiment_only", "dual_engram"],
    )
    assert got == [
        "--protocol",
        "written",
        "--rung",
        "attention",
        "--data-dir",
        "D",
        "--seeds",
        "42",
        "43",
        "--out",
        str(tmp_path / "ladder" / "attention"),
        "--variants",
        "sentiment_only",
    ]
    far = ladder.rung_argv(argv, tmp_path, "other", protocols.ALL, "written", "published", list(protocols.ALL))
    assert far[:2] == ["--protocol", "published"] and "--rung" not in far
    assert (
        ladder.rung_argv(argv, tmp_path, "loss_weights", ("dual_head",), "written", "published", ["sentiment_only"])
        is None
    )


def test_a_run_of_one_variant_says_so_and_reports_the_hypotheses_as_not_run(sst2_small, tmp_path, capsys):
    out = tmp_path / "one"
    m = experiment.main(
        ["--data-dir", str(sst2_small), "--out", str(out), "--epochs", "1", "--variants", "dual_head", *TINY]
    )
    assert m["variants"] == ["dual_head"] and list(m["models"]) == ["dual_head"] and m["complete"]
    assert m["hypotheses"] == {} and set(m["hypotheses_not_run"]) == {"H1", "H2"}
    assert "sentiment_only" in m["hypotheses_not_run"]["H1"] and "dual_engram" in m["hypotheses_not_run"]["H2"]
    report = (out / "REPORT.md").read_text()
    assert "- H1: not run: needs sentiment_only, which this run does not train (--variants)." in report
    assert not (out / "checkpoints" / "seed42" / "sentiment_only").exists()
    # it names the figures it drew: no Model 3, no engram figure
    wrote = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"wrote {out}/")]
    assert wrote == [f"wrote {out}/metrics.json, predictions.json, REPORT.md, learning_curves.png"]
    assert not (out / "engram_clusters.png").exists()


def test_a_shortened_ladder_runs_every_rung_into_its_report(sst2_small, tmp_path):
    out = tmp_path / "run"
    summary = experiment.main(
        ["--ladder", "--data-dir", str(sst2_small), "--out", str(out), "--epochs", "1", "--seeds", "42", "43", *TINY]
    )
    root = out / "ladder"
    names = ["base", *(r.name for r in SMALL_RUNGS), "other"]
    assert [r["rung"] for r in summary["rungs"]] == names and all(r["complete"] for r in summary["rungs"])
    assert json.loads((root / "ladder.json").read_text()) == json.loads(json.dumps(summary))
    assert (root / "ladder.png").read_bytes()[:4] == b"\x89PNG"
    for r in summary["rungs"]:
        m = json.loads((root / r["rung"] / "metrics.json").read_text())
        assert m["variants"] == [v for v in protocols.ALL if v in r["variants"]] == list(r["models"])
        assert m["seeds"] == [42, 43] and m["command"] == r["command"] == r["made_by"]
        # each rung is an ordinary run: its own command line names its rung and folder
        words = shlex.split(m["command"])
        assert words[words.index("--out") + 1] == str(root / r["rung"])
        assert (m["protocol"] == "published") == (r["rung"] == "other")
        assert m["overrides"] == {"batch_size": 16, **({} if r["rung"] in ("base", "other") else r["changes"])}
    head = next(r for r in summary["rungs"] if r["rung"] == "head")
    assert list(head["models"]) == ["sentiment_only"]
    stat = head["models"]["sentiment_only"]["best_val_acc"]
    assert stat["n"] == 2 and stat["vs_base"]["seeds"] == [42, 43]
    text = (root / "LADDER.md").read_text()
    assert text.startswith("# Which difference does what: from `written` to `published`")
    assert "| `head` |" in text and "## What moves beyond seed noise" in text and "Incomplete" not in text
    # the LM head re-tested on every rung that trains Models 1 and 2, and on no other
    both = {r["rung"] for r in summary["rungs"] if {"sentiment_only", "dual_head"} <= set(r["variants"])}
    assert both == {"base", "vocabulary", "attention", "blocks", "optimiser", "other"}
    assert {r["rung"] for r in summary["rungs"] if r["lm_head"]} == both
    assert all(r["lm_head"]["seeds"] == [42, 43] for r in summary["rungs"] if r["lm_head"])
    table = text.split("## The LM head on each rung")[1].split("## What moves")[0]
    assert "| `attention` | 2 |" in table and "`head`" not in table and "`loss_weights`" not in table


def test_the_report_names_exactly_the_rungs_that_move_a_figure():
    def stat(deltas):
        from analysis.metrics import delta_test

        return {"mean": 80.0, "std": 1.0, "vs_base": {"seeds": [1, 2, 3], **delta_test(deltas, [0.0] * len(deltas))}}

    s = {
        "base": "written",
        "other": "published",
        "seeds": [1, 2, 3],
        "rungs": [
            {
                "rung": "base",
                "changes": {},
                "variants": ["sentiment_only"],
                "command": "c0",
                "complete": True,
                "models": {"sentiment_only": {"best_val_acc": {"mean": 80.0, "std": 1.0}}},
            },
            {
                "rung": "attention",
                "changes": {"causal": False},
                "variants": ["sentiment_only"],
                "command": "c1",
                "complete": True,
                "models": {"sentiment_only": {"best_val_acc": stat([-2.1, -1.9, -2.0])}},
            },  # moves: p < 0.05
            {
                "rung": "head",
                "changes": {"head": "mlp"},
                "variants": ["sentiment_only"],
                "command": "c2",
                "complete": True,
                "models": {"sentiment_only": {"best_val_acc": stat([1.0, -1.0, 0.5])}},
            },  # noise
            {
                "rung": "blocks",
                "changes": {"d_ff": 256},
                "variants": ["sentiment_only"],
                "command": None,
                "complete": False,
                "models": {"sentiment_only": {"best_val_acc": stat([2.0, 2.0, 2.0])}},
            },  # the same on every seed: no test
        ],
    }
    from analysis.stats import mean_ci

    s["rungs"][1]["lm_head"] = {
        "seeds": [1, 2, 3],
        "final_val_acc": {"delta": mean_ci([1.1, 0.9, 1.0]), "p": 0.01},
        "best_val_acc": {"delta": mean_ci([0.5, -0.5, 0.0])},
        "effective_rank": None,
    }
    text = ladder.ladder_markdown(s)
    assert "| `attention` | 3 | **+1.00 [" in text and "| +0.00 [-1.24, +1.24] | – |" in text  # best val: never bold
    moved = text.split("## What moves beyond seed noise")[1].split("![")[0]
    assert "`attention` moves Model 1: Sentiment Only's best val (%)" in moved
    assert "`head`" not in moved and "`blocks`" not in moved
    assert (
        "**Δ -2.00 [" in text
        and "> **Incomplete ladder**: 3 of 4 rungs finished. Not finished yet: `blocks`: unfinished." in text
    )


def test_a_rung_short_of_models_or_seeds_is_incomplete_and_says_what_is_missing(sst2_small, tmp_path):
    out = tmp_path / "run"
    # the attention rung with one of its two models and one of two seeds, as a stopped ladder leaves it
    experiment.main(
        [
            "--rung",
            "attention",
            "--data-dir",
            str(sst2_small),
            "--out",
            str(out / "ladder" / "attention"),
            "--epochs",
            "1",
            "--seeds",
            "42",
            "--variants",
            "sentiment_only",
            *TINY,
        ]
    )
    s = ladder.ladder_summary(
        out / "ladder",
        SMALL,
        "written",
        [42, 43],
        wanted=["sentiment_only", "dual_head"],
        command=f"python experiment.py --ladder --out {out} --seeds 42 43 --variants sentiment_only dual_head",
    )
    rung = next(r for r in s["rungs"] if r["rung"] == "attention")
    assert rung["variants"] == ["sentiment_only", "dual_head"] and not rung["complete"]
    assert rung["missing"] == {"sentiment_only": [43], "dual_head": [42, 43]}
    # what wrote its outputs, and what the ladder runs for it (which finishes it, with --resume)
    assert rung["made_by"].endswith("--seeds 42 --variants sentiment_only " + shlex.join(TINY))
    assert rung["command"] == (
        f"python experiment.py --protocol written --rung attention --seeds 42 43 "
        f"--out {out / 'ladder' / 'attention'} --variants sentiment_only dual_head"
    )
    assert next(r for r in s["rungs"] if r["rung"] == "blocks")["made_by"] is None
    assert [r["rung"] for r in s["rungs"]] == [
        "base",
        "vocabulary",
        "attention",
        "blocks",
        "head",
        "loss_weights",
        "optimiser",
        "other",
    ]  # engram: dual_engram was not asked for
    text = ladder.ladder_markdown(s)
    assert "`attention`: sentiment_only seed 43, dual_head seeds 42 43" in text
    assert "`base`: sentiment_only seeds 42 43, dual_head seeds 42 43" in text


def test_a_stopped_ladder_writes_its_report_and_report_only_writes_only_that(tmp_path):
    import types

    from train.stop import Interrupted

    calls = []

    def main(argv):
        name = argv[argv.index("--out") + 1].rsplit("/", 1)[-1]
        calls.append(name)
        if name == "vocabulary":
            raise Interrupted("SIGINT during epoch 2", 2)

    args = types.SimpleNamespace(protocol="written", variants=list(protocols.ALL), seeds=[42], report_only=False)
    with pytest.raises(Interrupted):
        ladder.run_ladder(main, ["--ladder", "--out", str(tmp_path)], args, SMALL, tmp_path)
    assert calls == ["base", "vocabulary"]
    text = (tmp_path / "ladder" / "LADDER.md").read_text()
    assert "**Incomplete ladder**: 0 of 9 rungs finished" in text and "`attention`: sentiment_only seed 42" in text
    assert json.loads((tmp_path / "ladder" / "ladder.json").read_text())["command"].endswith(
        "--ladder --out " + str(tmp_path)
    )
    calls.clear()
    args.report_only = True
    (tmp_path / "ladder" / "LADDER.md").unlink()
    ladder.run_ladder(main, ["--ladder", "--report-only"], args, SMALL, tmp_path)
    assert calls == [] and (tmp_path / "ladder" / "LADDER.md").is_file()  # the ladder's report alone: no rung is run
    assert json.loads((tmp_path / "ladder" / "ladder.json").read_text())["command"].endswith(" --ladder")


def test_the_ladder_figure_of_one_model_keeps_its_title_inside(tmp_path):
    """A ladder of Model 1 alone is one narrow panel: its title once ran off both edges."""
    import matplotlib.pyplot as plt

    runs = [{"history": [{"val_acc": 70.0 + e + s} for e in range(3)]} for s in range(2)]
    for name in ("base", "blocks"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"models": {"sentiment_only": {"runs": runs}}}))
    s = {
        "base": "written",
        "other": "published",
        "rungs": [{"rung": n, "models": {"sentiment_only": {}}} for n in ("base", "blocks")],
    }
    fig = ladder.ladder_figure(tmp_path, s)
    try:
        fig.canvas.draw()
        assert len(fig.axes) == 1 and [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["base", "blocks"]
        box = fig._suptitle.get_window_extent(fig.canvas.get_renderer())
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1
    finally:
        plt.close(fig)


def test_a_ladder_stopped_with_sigint_through_the_real_main_writes_ladder_md_naming_what_is_missing(
    sst2_small, tmp_path, monkeypatch, capsys
):
    """Each rung runs through experiment.main, whose cli_main turns a stop into SystemExit(130):
    the ladder must still write its report, and the stop must end the ladder (not the rung alone)."""
    import os
    import signal

    from tests.conftest import on_training_step

    out = tmp_path / "run"
    argv = [
        "--ladder",
        "--data-dir",
        str(sst2_small),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--variants",
        "sentiment_only",
        *TINY,
    ]
    # the second rung (vocabulary) is interrupted at its second step: the base has finished by then
    on_training_step(monkeypatch, "sentiment_only", 4 + 2, lambda _: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(SystemExit) as e:
        experiment.main(argv)
    assert e.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("stopped: the ladder stopped in rung vocabulary; ") and err[-1].endswith(
        f"continue with: python experiment.py {shlex.join(argv)} --resume"
    ), err[-1]
    text = (out / "ladder" / "LADDER.md").read_text()
    assert (
        "> **Incomplete ladder**: 1 of 7 rungs finished. Not finished yet: `vocabulary`: sentiment_only seed 42;"
        in text
    )
    assert not (out / "ladder" / "attention").exists()  # the stop ended the ladder
    s = json.loads((out / "ladder" / "ladder.json").read_text())
    assert [r["rung"] for r in s["rungs"] if r["complete"]] == ["base"]


def test_a_signal_between_two_rungs_is_kept_not_dropped(capsys):
    """A rung is a cli_main inside the ladder's own: a signal that lands as a rung ends must still
    stop the ladder before its next rung (a nested cli_main neither clears it nor swaps handlers)."""
    import signal

    from run import cli
    from train.stop import check_stop

    def rung(args, argv):  # a rung whose last step has just finished when SIGTERM arrives
        assert signal.getsignal(signal.SIGTERM) == cli.STOP.handler
        cli.STOP.handler(signal.SIGTERM, None)
        return "rung done"

    def ladder_run(args, argv):
        assert cli.cli_main(lambda a: a, rung, []) == "rung done"
        assert cli.STOP.name == "SIGTERM"  # kept across the rung's own cli_main
        check_stop("the ladder, before rung vocabulary")

    with pytest.raises(SystemExit) as e:
        cli.cli_main(lambda a: a, ladder_run, [])
    assert e.value.code == 143
    assert (
        capsys.readouterr().err.strip().splitlines()[-1] == "stopped: SIGTERM during the ladder, before rung vocabulary"
    )
    assert not cli.STOP


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ladder", "--rung", "attention"], "--ladder runs every rung itself; drop --rung attention"),
        (["--proto", "published"], "unrecognized arguments: --proto published"),
    ],
)
def test_a_ladder_with_a_rung_and_abbreviated_flags_are_refused(extra, message, sst2_small, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        experiment.main(["--data-dir", str(sst2_small), "--out", str(tmp_path / "x"), *TINY, *extra])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_the_ladder_is_one_bh_family_and_bold_means_adjusted_p_below_005():
    """Issue 32: a rung whose raw p is 0.04 among other tests with larger p is not beyond seed noise
    once the ladder's tests are Benjamini–Hochberg-adjusted together; the report counts the family."""
    from analysis.metrics import delta_test

    def stat(deltas):
        return {"mean": 80.0, "std": 1.0, "vs_base": {"seeds": [1, 2, 3], **delta_test(deltas, [0.0] * len(deltas))}}

    near = [-1.0, -1.2, -0.5]  # paired t over three seeds: p ≈ 0.04 raw
    noise = [[1.0, -1.0, 0.5], [0.3, -0.6, 0.2], [-0.4, 0.9, -0.1]]
    rungs = [
        {
            "rung": "base",
            "changes": {},
            "variants": ["sentiment_only"],
            "command": "c",
            "complete": True,
            "models": {"sentiment_only": {"best_val_acc": {"mean": 80.0, "std": 1.0}}},
        }
    ]
    for i, d in enumerate([near, *noise]):
        rungs.append(
            {
                "rung": f"r{i}",
                "changes": {"x": i},
                "variants": ["sentiment_only"],
                "command": "c",
                "complete": True,
                "models": {"sentiment_only": {"best_val_acc": stat(d)}},
            }
        )
    s = {"base": "written", "other": "published", "seeds": [1, 2, 3], "rungs": rungs}
    raw = rungs[1]["models"]["sentiment_only"]["best_val_acc"]["vs_base"]["p"]
    assert 0.01 < raw < 0.05
    text = ladder.ladder_markdown(s)
    vs = rungs[1]["models"]["sentiment_only"]["best_val_acc"]["vs_base"]
    assert vs["p_adj"] == pytest.approx(min(1.0, raw * 4)) and vs["verdict"] == "inconclusive"
    assert s["family"] == {"method": "fdr_bh", "size": 4, "significant": 0}
    assert "**Δ" not in text and "(0 of 4)" in text
    moved = text.split("## What moves beyond seed noise")[1].split("## What is shown unchanged")[0]
    assert "- nothing" in moved
