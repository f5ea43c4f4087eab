"""A search space is checked against the training parameters' rules before any trial runs."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import pytest
import yaml

from millvae.errors import MillvaeError
from millvae.search import main
from millvae.search.space import sample_trials

from .conftest import REPO
from .test_search import TINY_SPACE, _children, small_mat  # noqa: F401  (fixture)

# (space file text, what the one-line error must say)
BAD_SPACES = [
    ("conv_layers: [0, -1]\n", "space: conv_layers: 0 is not allowed (conv_layers: expected"),
    ("conv_layers: [1, 2, 9]\n", "space: conv_layers: 9 is not allowed"),
    ("conv_layers: [true]\n", "conv_layers: expected an integer; got True"),
    ("start_filter_no: [16, 0.5]\n", "start_filter_no: expected an integer; got 0.5"),
    ("beta: {uniform: [0.5, -1]}\n", "space: beta: expected uniform: [loc, scale] with scale > 0"),
    ("beta: {uniform: [1, 0]}\n", "with scale > 0; got scale 0"),
    ("beta: {uniform: [-1, 2]}\n", "space: beta: -1.0, an end of uniform [-1, 2], is not allowed"),
    ("beta: {uniform: [x, 2]}\n", "space: beta: expected uniform: [a, b] with two numbers"),
    ("beta: {uniform: [1]}\n", "expected uniform: [a, b] with two numbers; got [1]"),
    ("beta: {uniform: [0, .nan]}\n", "expected uniform: [a, b] with two numbers"),
    ("beta: {uniform: [true, 2]}\n", "expected uniform: [a, b] with two numbers"),
    ("beta: {uniform: 3}\n", "expected uniform: [a, b] with two numbers; got 3"),
    ("beta: {normal: [0, 1]}\n", "space: beta: expected uniform, loguniform or randint"),
    ("beta: {uniform: [1, 2], randint: [1, 2]}\n", "space: beta: expected a list of choices"),
    ("beta: 3\n", "space: beta: expected a list of choices or"),
    ("beta:\n", "space: beta: expected a list of choices or"),
    ("beta: [a, 1]\n", "space: beta: 'a' is not allowed (beta: expected a number"),
    ("beta: []\n", "space: beta: expected a non-empty list of choices"),
    ("beta: {loguniform: [0, 1]}\n", "expected loguniform: [low, high] with 0 < low < high"),
    ("learning_rate: {loguniform: [0.01, 0.001]}\n", "with 0 < low < high; got 0.01 and 0.001"),
    ("codings_size: {uniform: [2, 5]}\n", "space: codings_size: expected randint or a list"),
    ("codings_size: {loguniform: [2, 50]}\n", "codings_size: expected randint or a list"),
    ("codings_size: {randint: [5, 5]}\n", "expected randint: [low, high] with integers low < high"),
    ("codings_size: {randint: [2.5, 6]}\n", "with integers low < high (high excluded)"),
    ("codings_size: {randint: [1, 10, 2]}\n", "expected randint: [a, b] with two numbers"),
    ("kernel_size: {randint: [0, 3]}\n", "space: kernel_size: 0, an end of randint [0, 3],"),
    ("earlystop_patience: {randint: [-5, 3]}\n", "space: earlystop_patience: -5"),
    ("bn_momentum: {uniform: [0.5, 0.5]}\n", "space: bn_momentum: 1.0, an end of uniform"),
    ("final_activation: [sigmoid, relu]\n", "space: final_activation: 'relu' is not allowed"),
    ("dilations: ['1,2', '1,0']\n", "space: dilations: '1,0' is not allowed"),
    ("window_size: [64, 63]\n", "space: window_size: 63 is not allowed"),
    ("lr_max: [0.0001]\n", "space: lr_max: 0.0001 is not allowed (lr_max: expected >="),
    ("seed: [-1]\n", "space: seed: -1 is not allowed"),
    ("bogus: [1]\n", "space: unknown parameter 'bogus'"),
    ("- beta\n- codings_size\n", "space: expected a mapping of parameter names"),
    ("beta: [1, 2\n", "space: could not parse space.yaml"),
]


def _space_file(tmp_path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.bad_input
@pytest.mark.parametrize(("text", "message"), BAD_SPACES, ids=[t.strip() for t, _ in BAD_SPACES])
def test_a_bad_space_is_refused_before_any_trial_with_one_line(
    tracking,
    small_mat,  # noqa: F811
    tmp_path,
    text,
    message,
):
    space = _space_file(tmp_path, text)
    argv = ["--n_iter", "2", "--workers", "0", "--space", space, "--data", str(small_mat)]
    with pytest.raises(MillvaeError) as err:
        main([*argv, "--epochs", "1", "--bootstrap", "0"])
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "mlflow.db").exists()  # refused before the store was even opened


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "conv_layers: [0, -1]\n",
            "millvae: error: space: conv_layers: 0 is not allowed (conv_layers: expected",
        ),
        (
            "beta: {uniform: [0.5, -1]}\n",
            "millvae: error: space: beta: expected uniform: [loc, scale] with scale > 0; "
            "got scale -1",
        ),
    ],
    ids=["every-choice-invalid", "negative-scale"],
)
def test_the_command_exits_non_zero_with_one_line_and_no_traceback(
    tracking, tmp_path, text, message
):
    cmd = [sys.executable, "-m", "millvae", "search", "--n_iter", "3", "--workers", "1"]
    cmd += ["--space", _space_file(tmp_path, text), "--data", "synthetic"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith(message), out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_a_rule_between_two_searched_parameters_leaves_bad_combinations_to_the_trials():
    from millvae.search.space import check_space

    # learning_rate 0.01 is valid with lr_max 0.02 and lr_max 0.005 with learning_rate 0.001:
    # each value has a partner, so the space is accepted; the pair (0.01, 0.005) fails its trial
    check_space({"learning_rate": [0.001, 0.01], "lr_max": [0.005, 0.02]}, {})
    check_space({"conv_layers": [1, 3], "window_size": [8, 12]}, {})
    with pytest.raises(MillvaeError, match="space: window_size: 12 is not allowed"):
        check_space({"window_size": [8, 12]}, {"conv_layers": "3"})  # fixed: no partner


@pytest.mark.bad_input
def test_a_search_whose_every_trial_fails_exits_non_zero_with_its_trials_failed(
    tracking,
    small_mat,  # noqa: F811
    tmp_path,
):
    # every draw of seed 5 pairs learning_rate 0.002 with lr_max 0.0015, which validation refuses
    text = TINY_SPACE % 2 + "learning_rate: [0.001, 0.002]\nlr_max: [0.0015, 0.02]\n"
    space = _space_file(tmp_path, text)
    trials = sample_trials(yaml.safe_load(text), 4, 5)
    assert all(t["learning_rate"] > t["lr_max"] for t in trials), trials
    cmd = [sys.executable, "-m", "millvae", "search", "--n_iter", "4", "--seed", "5"]
    cmd += ["--workers", "0", "--space", space, "--data", str(small_mat), "--search_id", "none"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "millvae: error: search none: expected at least one trial to finish; none of 4 did; "
        "trial 0: lr_max: expected >= learning_rate"
    ), last
    runs = _children("none")
    assert sorted(r.info.status for r in runs) == ["FAILED"] * 4
    assert all("lr_max" in r.data.tags["millvae.error"] for r in runs)
    (parent,) = mlflow.search_runs(
        search_all_experiments=True,
        filter_string="tags.`millvae.search_parent` = 'true'",
        output_format="list",
    )
    assert parent.info.status == "FAILED"
