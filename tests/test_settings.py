"""The typed settings keep the command line's record: metrics.json and checkpoints/run.json hold
`config`, a resume compares it with run.json files written before the settings were typed, so for
every command line it must equal what the argparse namespace held (golden_configs.json: vars of the
namespace, Paths as text, as the code before the typed settings recorded it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import experiment
import experiment_7b as e7
from run.settings import Settings

GOLDEN = json.loads((Path(__file__).parent / "golden_configs.json").read_text())


def jsonable(config: dict) -> dict:
    return json.loads(json.dumps(config))  # slurm_extra's (key, value) pairs as JSON holds them


@pytest.mark.parametrize(
    "scale, i", [("small", i) for i in range(len(GOLDEN["small"]))] + [("big", i) for i in range(len(GOLDEN["big"]))]
)
def test_the_config_is_the_namespace_of_before(monkeypatch, scale, i):
    monkeypatch.setattr("os.cpu_count", lambda: 2)  # --executor local: threads = cores // jobs, recorded
    argv, want = GOLDEN[scale][i]
    script = experiment if scale == "small" else e7
    s = script.settings(script.parse_args(argv))
    assert isinstance(s, Settings)
    assert jsonable(s.config) == want and list(s.config) == list(want)  # the same keys, values and order
    assert s.config == {k: v for k, v in s.config.items()}  # a plain dict


def test_the_7b_loss_weight_flags_are_recorded_only_when_given():
    """--lm-weight and --sent-weight came to experiment_7b.py later: unset they are not in the config
    (older run.json files lack them); given, they are, and override the preset."""
    s = e7.settings(e7.parse_args(["--lm-weight", "0.3"]))
    assert s.config["lm_weight"] == 0.3 and "sent_weight" not in s.config
    assert s.preset.lm_weight == 0.3 and s.overrides == {"lm_weight": 0.3}
    assert "lm_weight" not in e7.settings(e7.parse_args([])).config


def test_settings_are_frozen_and_threads_are_set_by_replace(monkeypatch):
    import dataclasses

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    args = experiment.parse_args(["--executor", "local", "--jobs", "2"])
    s = experiment.settings(args)
    assert s.execution.threads == 4 and args.threads is None  # the namespace is left as parsed
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.run.resume = True
