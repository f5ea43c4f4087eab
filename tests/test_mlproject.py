"""MLproject's `main` and `repeat` entry points declare and pass exactly the training parameters."""

from __future__ import annotations

import re

import pytest
import yaml

from millvae.config import PARAM_DEFAULTS, PARAM_NAMES, make_config

from .conftest import REPO

# `repeat` sets split_seed itself, once per seed of its own split_seeds, and defaults to the
# leak-free split (split=window has no split seed to repeat over).
REPEAT_EXTRA = {"split_seeds": ""}  # empty: every fold (casefold), else 0,1,2
REPEAT_OMITS = {"split_seed"}
REPEAT_DEFAULTS = {"split": "case"}


def _spec() -> dict:
    return yaml.safe_load((REPO / "MLproject").read_text())


def _as_string(value) -> str:
    return "" if value is None else str(value)


def _expected(entry: str) -> dict[str, str]:
    if entry == "main":
        return dict(PARAM_DEFAULTS)
    params = {k: v for k, v in PARAM_DEFAULTS.items() if k not in REPEAT_OMITS}
    params.update(REPEAT_DEFAULTS)
    return params


@pytest.mark.parametrize("entry", ["main", "repeat"])
def test_entry_point_declares_exactly_the_training_parameters(entry):
    declared = _spec()["entry_points"][entry]["parameters"]
    expected = _expected(entry)
    extra = REPEAT_EXTRA if entry == "repeat" else {}
    missing = sorted(set(expected) - set(declared))
    unknown = sorted(set(declared) - set(expected) - set(extra))
    assert not missing, f"{entry} does not declare {missing}"
    assert not unknown, f"{entry} declares parameters the config does not have: {unknown}"
    training = {k: _as_string(v["default"]) for k, v in declared.items() if k in expected}
    # the same validated config as the code's defaults (MLproject writes 0 where config has 0.0)
    assert make_config(**training) == make_config(**expected)
    for name in expected:
        assert make_config(**{name: training[name]}) == make_config(**{name: expected[name]}), name
    for name, default in extra.items():
        assert _as_string(declared[name]["default"]) == default


@pytest.mark.parametrize("entry", ["main", "repeat"])
def test_every_declared_parameter_is_passed_on(entry):
    point = _spec()["entry_points"][entry]
    command = " ".join(point["command"].split())
    for name in point["parameters"]:
        assert f"--{name} {{{name}}}" in command, f"{entry} does not pass --{name}"


@pytest.mark.parametrize("entry", sorted(_spec()["entry_points"]))
def test_every_placeholder_is_declared(entry):
    point = _spec()["entry_points"][entry]
    used = set(re.findall(r"\{(\w+)\}", point["command"]))
    undeclared = sorted(used - set(point.get("parameters") or {}))
    assert not undeclared, f"{entry} uses undeclared {undeclared}"


def test_the_training_names_are_the_config_fields():
    assert set(PARAM_DEFAULTS) == set(PARAM_NAMES)
