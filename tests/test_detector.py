"""The pyfunc detector: same scores as the evaluation, clear errors, fresh-process load, serving."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from millvae.detect.scoring import CONDITION_COLUMNS, ConditionNormalizer, window_scores
from millvae.detector import (
    MAX_BODY_BYTES,
    detector_config,
    score_raw,
    signal_ranges,
)
from millvae.errors import MillvaeError
from millvae.tracking import log_detector

from .servers import serving_model

pytestmark = pytest.mark.slow

SCORES = ("mse", "kl", "mse_cond", "kl_cond")


@dataclass
class Trained:
    model: object
    config: dict
    normalizer: ConditionNormalizer
    raw: np.ndarray  # raw windows of the test split, [n, 64, 6]
    x: np.ndarray  # the same windows scaled by the training run's preparation
    conditions: pd.DataFrame  # DOC, feed, material per window
    signals: list[str]


def _tiny_vae():
    """The β-VAE the tests score with: 6 synthetic signals, one small TCN layer."""
    from millvae.model.vae import build_vae

    return build_vae(
        window_size=64,
        n_signals=6,
        codings_size=4,
        conv_layers=1,
        start_filter_no=8,
        kernel_size=2,
        dilations=[1, 2],
        final_activation="sigmoid",
        beta=1.0,
        seed=1,
    )


@pytest.fixture(scope="module")
def trained(synthetic_mat) -> Trained:
    """A tiny β-VAE fitted for one epoch on synthetic healthy windows, with its detector config."""
    import keras

    from millvae.config import make_config
    from millvae.data.mat import load_mill
    from millvae.data.prepare import prepare
    from millvae.data.windows import cut_windows

    mill = load_mill(synthetic_mat)
    prepared = prepare(make_config(data=str(synthetic_mat)), mill=mill)
    w = prepared.windows
    rows = mill.cuts.index.get_indexer(w["cut_no"])
    raw_all = cut_windows(mill.signals, rows, w["start"].to_numpy(), 64)
    assert np.array_equal(prepared.scaler.transform(raw_all), prepared.x)

    model = _tiny_vae()
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(prepared.get("train", slim=True), epochs=1, batch_size=256, verbose=0)

    healthy = prepared.mask("train", slim=True) | prepared.mask("val", slim=True)
    names = list(prepared.signal_names)
    scores = window_scores(model, prepared.x[healthy], names)
    normalizer = ConditionNormalizer.fit(scores, w[healthy], ["mse", "kl"])
    scores = scores.join(normalizer.transform(scores, w[healthy]))
    thresholds = {s: float(np.percentile(scores[s], 99)) for s in SCORES}
    config = detector_config(
        scaler=prepared.scaler,
        thresholds=thresholds,
        normalizer=normalizer,
        decision_score="kl_cond",
        data_source="synthetic",
    )
    # 40 test windows: every class, several conditions
    test = np.flatnonzero(prepared.mask("test"))
    pick = np.random.default_rng(0).choice(test, size=40, replace=False)
    pick.sort()
    conditions = w.iloc[pick][list(CONDITION_COLUMNS)].reset_index(drop=True)
    return Trained(model, config, normalizer, raw_all[pick], prepared.x[pick], conditions, names)


def as_frame(raw: np.ndarray, signals: list[str], conditions: pd.DataFrame | None = None):
    """Windows [n, window, signal] as detector input: a row per sample, window after window."""
    n, window, _ = raw.shape
    df = pd.DataFrame(raw.reshape(n * window, -1).astype(np.float64), columns=signals)
    if conditions is not None:
        for c in CONDITION_COLUMNS:
            df[c] = np.repeat(conditions[c].to_numpy(dtype=float), window)
    return df


def test_score_raw_gives_exactly_the_evaluation_scores(trained):
    t = trained
    expected = window_scores(t.model, t.x, t.signals)
    expected = expected.join(t.normalizer.transform(expected, t.conditions))

    from_array = score_raw(t.model, t.config, t.raw, conditions=t.conditions)
    from_frame = score_raw(t.model, t.config, as_frame(t.raw, t.signals, t.conditions))

    for out in (from_array, from_frame):
        for col in ["mse", "kl", "mse_cond", "kl_cond", *[f"mse_{s}" for s in t.signals]]:
            np.testing.assert_array_equal(out[col].to_numpy(), expected[col].to_numpy(), col)
        assert (out["decision"] == "kl_cond").all()
        np.testing.assert_array_equal(out["score"], expected["kl_cond"])
        assert (out["threshold"] == t.config["thresholds"]["kl_cond"]).all()
        np.testing.assert_array_equal(
            out["is_anomaly"], expected["kl_cond"] >= t.config["thresholds"]["kl_cond"]
        )
    # sampled reconstructions: the stored samples and seed reach window_scores
    sampled = {**t.config, "score_samples": 3, "score_seed": 5}
    np.testing.assert_array_equal(
        score_raw(t.model, sampled, t.raw)["mse"],
        window_scores(t.model, t.x, t.signals, samples=3, seed=5)["mse"],
    )
    # a single window [window, signal] is one row; alone it runs through oneDNN kernels blocked
    # for one window, not 40, whose float rounding differs (KL 0.9e-6 and 1.9e-6 apart, relative,
    # for two trainings of this model)
    one = score_raw(t.model, t.config, t.raw[3])
    assert len(one) == 1 and one["kl"].iloc[0] == pytest.approx(expected["kl"].iloc[3], rel=1e-5)


def test_decision_uses_its_threshold_and_falls_back_without_a_condition(trained):
    t = trained
    kl_cond = score_raw(t.model, t.config, t.raw, conditions=t.conditions)["kl_cond"]
    kl = window_scores(t.model, t.x, t.signals)["kl"]
    # thresholds at one window's score: that window and those above are anomalies (>=)
    at_cond, at_kl = float(kl_cond.sort_values().iloc[20]), float(kl.sort_values().iloc[25])
    config = {**t.config, "thresholds": {**t.config["thresholds"], "kl_cond": at_cond, "kl": at_kl}}
    with_cond = score_raw(t.model, config, t.raw, conditions=t.conditions)
    assert with_cond["is_anomaly"].tolist() == (kl_cond >= at_cond).tolist()
    assert with_cond["is_anomaly"].sum() == 20

    assert (with_cond["score_name"] == "kl_cond").all() and with_cond["warning"].isna().all()
    without = score_raw(t.model, config, t.raw)
    assert without["kl_cond"].isna().all() and without["mse_cond"].isna().all()
    assert (without["decision"] == "kl (no condition given)").all()
    # the fallback is named in every row: which score, against which threshold, and why
    assert (without["score_name"] == "kl").all()
    assert without["warning"].nunique() == 1
    warning = without["warning"].iloc[0]
    assert warning.startswith("no condition columns (DOC, feed, material): decided on kl against")
    assert f"{at_kl:.6g}" in warning and f"kl_cond (threshold {at_cond:.6g})" in warning
    np.testing.assert_array_equal(without["score"], without["kl"])
    assert (without["threshold"] == config["thresholds"]["kl"]).all()
    assert without["is_anomaly"].tolist() == (without["kl"] >= config["thresholds"]["kl"]).tolist()
    assert without["is_anomaly"].sum() == 15

    raw_decision = {**t.config, "decision_score": "mse"}
    out = score_raw(t.model, raw_decision, t.raw, conditions=t.conditions)
    assert (out["decision"] == "mse").all() and (out["score_name"] == "mse").all()
    assert out["is_anomaly"].tolist() == (out["mse"] >= t.config["thresholds"]["mse"]).tolist()
    assert out["warning"].isna().all()

    # a condition the normalizer never saw healthy: scored against all healthy windows, said so
    unseen = t.conditions.copy()
    unseen.loc[2, "DOC"] = 9.0
    flagged = score_raw(t.model, t.config, t.raw, conditions=unseen)["warning"]
    assert flagged.notna().tolist() == [i == 2 for i in range(len(flagged))]
    assert flagged.iloc[2].startswith("condition 9|")


def _bad_input(t: Trained, label: str) -> tuple[object, str, int | None]:
    """One bad input by label: (input, expected part of the message, max_windows)."""
    df = as_frame(t.raw[:3], t.signals, t.conditions.iloc[:3])
    low, high = signal_ranges(t.config)
    if label == "missing column":
        return df.drop(columns="smcDC"), "missing smcDC; unknown none", None
    if label == "misspelled column":
        return df.rename(columns={"smcDC": "smcdc"}), "missing smcDC; unknown smcdc", None
    if label == "rows":
        return df.iloc[:100], "expected a multiple of 64 rows", None
    if label == "no rows":
        return df.iloc[:0], "got 0 rows", None
    if label == "window length":
        return t.raw[:, :32], "expected an array [n, 64, 6] or [64, 6]", None
    if label == "signal count":
        return t.raw[:, :, :5], "got shape [40, 64, 5]", None
    if label == "flat array":
        return t.raw.reshape(-1, 6), "got shape [2560, 6]", None
    if label == "NaN":
        bad = df.copy()
        bad.iloc[70, 2] = np.nan
        return bad, "1 NaN/inf value(s) in the signal columns, the first at row 70 (window 1)", None
    if label == "inf":
        bad = t.raw[:3].copy()
        bad[1, 5, 0] = np.inf
        return bad, "1 NaN/inf value(s) in the array, the first at window 1, sample 5", None
    if label == "1e300":  # finite, but inf in float32: it gave NaN scores ("a broken model?")
        bad = df.copy()
        bad.loc[70, "vib_table"] = 1e300
        return bad, f"expected vib_table within [{low[2]:.6g}, {high[2]:.6g}]", None
    if label == "-1e300 in an array":
        bad = t.raw[:3].astype(np.float64)  # float32 windows would hold -inf
        bad[2, 7, 4] = -1e300
        return bad, "got -1e+300 at window 2, sample 7, 1 value(s) out of range", None
    if label == "just above the range":
        bad = df.copy()
        bad.loc[3, "smcAC"] = float(np.nextafter(high[0], np.inf))
        return bad, "expected smcAC within", None
    if label == "condition varies":
        bad = df.copy()
        bad.loc[10, "DOC"] = 99.0
        return bad, "expected DOC constant within each window", None
    if label == "partial condition":
        return df.drop(columns=["feed", "material"]), "or none; got DOC without", None
    if label == "text":
        bad = df.copy().astype({"smcAC": object})
        bad.loc[5, "smcAC"] = "oops"
        return bad, "expected numbers in column 'smcAC'; got 'oops'", None
    if label == "type":
        return {"smcAC": [1.0]}, "got dict", None
    if label == "too many windows (frame)":
        return df, "expected at most 2 windows (128 rows) per request", 2
    if label == "too many windows (array)":
        return t.raw, "expected at most 39 windows (2496 rows) per request", 39
    raise AssertionError(label)


BAD_INPUTS = [
    "missing column",
    "misspelled column",
    "rows",
    "no rows",
    "window length",
    "signal count",
    "flat array",
    "NaN",
    "inf",
    "1e300",
    "-1e300 in an array",
    "just above the range",
    "condition varies",
    "partial condition",
    "text",
    "type",
    "too many windows (frame)",
    "too many windows (array)",
]


@pytest.mark.bad_input
@pytest.mark.parametrize("label", BAD_INPUTS)
def test_bad_inputs_give_one_line_errors(trained, label):
    bad, expected, max_windows = _bad_input(trained, label)
    limit = {} if max_windows is None else {"max_windows": max_windows}
    with pytest.raises(MillvaeError) as err:
        score_raw(trained.model, trained.config, bad, **limit)
    message = str(err.value)
    assert expected in message, message
    assert "\n" not in message


def test_values_far_outside_the_training_range_are_still_scored(trained):
    # the range refuses no reading of the machine: 99 training ranges out is an alarm, not an error
    t = trained
    low, high = signal_ranges(t.config)
    assert np.allclose(
        high - low, 201 * (np.asarray(t.config["scaler"]["max"]) - t.config["scaler"]["min"])
    )
    far = t.raw[:2].copy()
    far[0, 10, 1] = high[1]  # the limit itself is allowed
    span = np.asarray(t.config["scaler"]["max"]) - t.config["scaler"]["min"]
    far[1, :, 3] = t.config["scaler"]["max"][3] + 20 * span[3]
    out = score_raw(t.model, t.config, far)
    assert np.isfinite(out[["mse", "kl", "score"]].to_numpy()).all()
    assert out["is_anomaly"].all()


def test_detector_config_refuses_what_it_cannot_serve(trained):
    t = trained
    from millvae.data.windows import MinMaxScaler

    scaler = MinMaxScaler.from_dict(t.config["scaler"])
    ok = dict(scaler=scaler, normalizer=t.normalizer, thresholds=t.config["thresholds"])
    cases = [
        ({"decision_score": "mse_smcAC"}, "decision_score: expected one of"),
        (
            {"decision_score": "kl_cond", "thresholds": {"kl_cond": 1.0}},
            "expected a finite threshold for 'kl'",
        ),
        (
            {"decision_score": "kl", "thresholds": {"kl": float("nan")}},
            "expected a finite threshold for 'kl'",
        ),
        (
            {"decision_score": "mse_cond", "normalizer": ConditionNormalizer({})},
            "expected statistics for 'mse'",
        ),
        ({"decision_score": "kl", "score_samples": -1}, "score_samples"),
    ]
    for change, expected in cases:
        with pytest.raises(MillvaeError, match=expected):
            detector_config(**{**ok, **change})
    config = detector_config(**ok, decision_score="kl", score_samples=3)
    assert json.loads(json.dumps(config)) == config
    assert config["score_samples"] == 3 and config["window_size"] == 64


FRESH_PROCESS = textwrap.dedent(
    """
    import pickle, sys
    import mlflow, numpy as np, pandas as pd
    from mlflow.exceptions import MlflowException

    uri, path_in, path_out = sys.argv[1:4]
    with open(path_in, "rb") as f:
        frame, raw, bad = pickle.load(f)
    model = mlflow.pyfunc.load_model(uri)
    import millvae

    out = {"millvae_file": millvae.__file__}
    out["with_conditions"] = model.predict(frame)
    out["without_conditions"] = model.predict(frame.drop(columns=["DOC", "feed", "material"]))
    out["array_unwrapped"] = model.unwrap_python_model().predict(None, raw)
    for key, data in (("array_pyfunc", raw), ("bad_pyfunc", bad)):
        try:
            model.predict(data)
            out[key] = "no error"
        except MlflowException as exc:
            out[key] = (exc.error_code, exc.message)
    with open(path_out, "wb") as f:
        pickle.dump(out, f)
    """
)


def strict_json(text: str | bytes) -> object:
    """json.loads as strict parsers read JSON: the NaN and Infinity tokens are refused."""

    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: a bare {token}")

    return json.loads(text, parse_constant=refuse)


def _post(url: str, body: dict) -> tuple[int, dict]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, strict_json(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, strict_json(exc.read())


def _assert_same(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert list(got.columns) == list(expected.columns)
    text = ["score_name", "decision", "warning"]
    numeric = [c for c in expected.columns if c not in (*text, "is_anomaly")]
    # None (JSON null, served) and NaN (in process) both read as NaN here
    np.testing.assert_allclose(
        got[numeric].to_numpy(dtype=float), expected[numeric].to_numpy(dtype=float), rtol=1e-6
    )
    for c in text:
        assert got[c].fillna("-").tolist() == expected[c].fillna("-").tolist(), c
    assert got["is_anomaly"].astype(bool).tolist() == expected["is_anomaly"].tolist()


def test_logged_detector_loads_in_a_fresh_process_and_serves(trained, tracking, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    t = trained
    frame = as_frame(t.raw, t.signals, t.conditions)
    expected = score_raw(t.model, t.config, frame)
    expected_plain = score_raw(t.model, t.config, t.raw)
    bad = frame.iloc[:100]
    with pytest.raises(MillvaeError) as err:
        score_raw(t.model, t.config, bad)
    bad_message = str(err.value)

    with mlflow.start_run():
        info = log_detector(t.model, t.config, example_raw=t.raw, example_conditions=t.conditions)
    inputs = info.signature.inputs
    assert inputs.required_input_names() == t.signals
    assert inputs.optional_input_names() == list(CONDITION_COLUMNS)
    assert "is_anomaly" in info.signature.outputs.input_names()
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    example = mlflow.models.Model.load(local).load_input_example(local)
    assert example.shape == (128, 9)
    assert list(example.columns) == [*t.signals, *CONDITION_COLUMNS]
    requirements = (local / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in requirements} >= {"tensorflow", "keras-tcn", "mlflow"}

    # a fresh interpreter: imports millvae from the model's own code copy
    path_in, path_out = tmp_path / "in.pkl", tmp_path / "out.pkl"
    pd.to_pickle((frame, t.raw, bad), path_in)
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, info.model_uri, str(path_in), str(path_out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = pd.read_pickle(path_out)
    assert "/code/millvae/" in Path(fresh["millvae_file"]).as_posix(), fresh["millvae_file"]
    _assert_same(fresh["with_conditions"], expected)
    _assert_same(fresh["without_conditions"], expected_plain)
    _assert_same(fresh["array_unwrapped"], expected_plain)
    # MLflow 3.17 enforces the column signature before the model: an array is refused there
    assert fresh["array_pyfunc"][0] == "INVALID_PARAMETER_VALUE"
    assert fresh["bad_pyfunc"] == ("INVALID_PARAMETER_VALUE", bad_message)

    # the registry and `mlflow models serve` on loopback
    name = "millvae-detector-test"
    version = mlflow.register_model(info.model_uri, name).version
    MlflowClient().set_registered_model_alias(name, "champion", version)
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking)
    with serving_model(f"models:/{name}@champion", tmp_path, env) as (base, _):
        status, body = _post(f"{base}/invocations", {"dataframe_split": frame.to_dict("split")})
        assert status == 200, body
        _assert_same(pd.DataFrame(body["predictions"]), expected)

        plain = frame[t.signals].iloc[: 5 * 64]
        status, body = _post(f"{base}/invocations", {"dataframe_split": plain.to_dict("split")})
        assert status == 200, body
        _assert_same(pd.DataFrame(body["predictions"]), expected_plain.iloc[:5])

        assert body["predictions"][0]["kl_cond"] is None  # not computed: null, not NaN

        status, body = _post(f"{base}/invocations", {"dataframe_split": bad.to_dict("split")})
        assert status == 400, body
        assert body["error_code"] == "INVALID_PARAMETER_VALUE"
        # the model's one-line message alone: no dump of the data MLflow got, no trace
        assert body["message"] == bad_message
        assert "stack_trace" not in body

        # the default body limit: refused on the header, before the body is read
        status, body = _declare_body(base, MAX_BODY_BYTES + 1)
        assert status == 413 and f"at most {MAX_BODY_BYTES} bytes" in body["message"], body


def _declare_body(base: str, length: int) -> tuple[int, dict]:
    """POST headers announcing `length` bytes and only the first 100: the answer comes first."""
    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=60)
    try:
        conn.putrequest("POST", "/invocations")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        conn.send(b'{"dataframe_split": {"columns": ["smcAC"], "data": [' + b"[1.0]," * 12)
        response = conn.getresponse()
        return response.status, strict_json(response.read())
    finally:
        conn.close()


def test_a_detector_that_cannot_score_its_example_is_not_logged(trained, tracking):
    # MLflow's reload-and-predict check is skipped for speed; the in-memory check replaces it
    import mlflow

    broken = _tiny_vae()
    broken(trained.x[:1])
    broken.set_weights([np.full_like(w, np.nan) for w in broken.get_weights()])
    with mlflow.start_run() as run:
        with pytest.raises(MillvaeError, match="expected finite"):
            log_detector(broken, trained.config, example_raw=trained.raw)
    assert mlflow.MlflowClient().list_artifacts(run.info.run_id) == []
    assert not mlflow.search_logged_models(
        filter_string=f"source_run_id = '{run.info.run_id}'", output_format="list"
    )
