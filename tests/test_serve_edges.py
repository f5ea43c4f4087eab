"""The served detector at its edges: body and window limits, one-line errors, strict JSON.

One real `mlflow models serve` on 127.0.0.1 for the module, with non-default limits passed the
way a user passes them (environment variables of the `mlflow models serve` command).
"""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from millvae.detector import MAX_BODY_ENV, MAX_WINDOWS_ENV, _env_limit, signal_ranges
from millvae.errors import MillvaeError

from .servers import serving_model
from .test_detector import Trained, as_frame, strict_json
from .test_detector import trained as trained  # the module-scoped fixture, shared

pytestmark = pytest.mark.slow

MAX_BODY = 4 * 1024 * 1024  # what this module's server gets, not the defaults
MAX_WINDOWS = 50
CHUNK = 1 << 20  # bytes per chunk of a chunked body


@dataclass
class Served:
    base: str
    pgid: int  # the server's process group: `mlflow models serve`, uvicorn and its worker
    trained: Trained
    frame: pd.DataFrame  # 3 windows with DOC, feed, material


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory) -> Iterator[Served]:
    """The logged detector behind `mlflow models serve`, in a throw-away sqlite store."""
    import mlflow

    from millvae.tracking import log_detector

    tmp = tmp_path_factory.mktemp("serve-edges")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # ./mlruns lands there
        mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        mlflow.set_tracking_uri(uri)
        try:
            with mlflow.start_run():
                info = log_detector(
                    trained.model,
                    trained.config,
                    example_raw=trained.raw,
                    example_conditions=trained.conditions,
                )
        finally:
            mlflow.set_tracking_uri(None)

    env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    env[MAX_BODY_ENV], env[MAX_WINDOWS_ENV] = str(MAX_BODY), str(MAX_WINDOWS)
    with serving_model(info.model_uri, tmp, env) as (base, pgid):
        frame = as_frame(trained.raw[:3], trained.signals, trained.conditions.iloc[:3])
        yield Served(base, pgid, trained, frame)


def _request(
    served: Served,
    body: bytes | str,
    content_type: str = "application/json",
    chunked: bool = False,
) -> tuple[int, str, str]:
    """POST a raw body to /invocations: (status, content type, text of the answer)."""
    conn = http.client.HTTPConnection(served.base.removeprefix("http://"), timeout=120)
    data = body.encode() if isinstance(body, str) else body
    try:
        if chunked:  # no Content-Length: the server only learns the size by reading
            pieces = (data[i : i + CHUNK] for i in range(0, len(data), CHUNK))
            conn.request(
                "POST", "/invocations", pieces, {"Content-Type": content_type}, encode_chunked=True
            )
        else:
            conn.request("POST", "/invocations", data, {"Content-Type": content_type})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read().decode()
    finally:
        conn.close()


def _split(columns: list[str], data: list) -> str:
    return json.dumps({"dataframe_split": {"columns": columns, "data": data}})


def _frame_body(df: pd.DataFrame) -> str:
    return json.dumps({"dataframe_split": df.to_dict("split")})


def _edited(df: pd.DataFrame, row: int, column: str, value: object) -> str:
    """The frame as a body, one cell replaced by a JSON value (possibly NaN/Infinity tokens)."""
    data = df.to_numpy(dtype=object).tolist()
    data[row][list(df.columns).index(column)] = value
    return _split(list(df.columns), data)


def _group_peak_rss(pgid: int) -> int:
    """Peak resident memory (VmHWM) of the processes in the process group, summed, in bytes."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rpartition(")")[2].split()[2]) != pgid:
                    continue
            with open(f"/proc/{pid}/status") as f:
                total += next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total


def _assert_one_line(status: int, text: str, expected_status: int, expected: str) -> dict:
    body = strict_json(text)
    assert status == expected_status, body
    message = body["message"]
    assert expected in message, message
    # one line that says what was wrong: no dump of the data, no stack trace
    assert "\n" not in message and len(message) < 400, message
    assert set(body) <= {"error_code", "message", "sqlstate", "error_class"}, body
    return body


def _bad_bodies(s: Served) -> dict[str, tuple[str | bytes, str, str]]:
    """label -> (body, content type, expected part of the one-line message); answered 400."""
    t, df = s.trained, s.frame
    cols, signals = list(df.columns), t.signals
    rows = df.to_numpy().tolist()
    low, high = signal_ranges(t.config)
    json_type = "application/json"
    columns_message = "input: expected columns smcAC, smcDC, vib_table"
    varying = df.copy()
    varying.loc[70, "feed"] = 0.123
    many = df.iloc[:64][signals].round(2)
    return {
        "empty body": ("", json_type, "expected a JSON object; got invalid JSON"),
        "not JSON": ("{nope", json_type, "got invalid JSON (Expecting property name"),
        "JSON list": ("[1, 2]", json_type, "got a list"),
        "JSON number": ("3", json_type, "got unexpected input type"),
        "no format key": ('{"rows": []}', json_type, "got dictionary with input fields: []"),
        "two format keys": (
            json.dumps({"dataframe_split": df.to_dict("split"), "inputs": {"smcAC": [1.0]}}),
            json_type,
            "got dictionary with input fields: ['dataframe_split', 'inputs']",
        ),
        "split not an object": (
            '{"dataframe_split": [1, 2]}',
            json_type,
            "request: Dataframe split format must be a dictionary. Got list.",
        ),
        "split without data": (
            json.dumps({"dataframe_split": {"columns": cols}}),
            json_type,
            "request: Dataframe split format must have 'data' field",
        ),
        "ragged rows": (
            _split(cols, [r[:5] for r in rows]),
            json_type,
            "request: Provided dataframe_split field is not a valid dataframe representation in "
            "'split' format. Error: '9 columns passed, passed data had 5 columns'",
        ),
        "missing column": (
            _frame_body(df.drop(columns="smcDC")),
            json_type,
            f"{columns_message}, vib_spindle, AE_table, AE_spindle (optionally DOC, feed, "
            "material); missing smcDC",
        ),
        "misspelled column": (
            _frame_body(df.rename(columns={"AE_table": "ae_table"})),
            json_type,
            "missing AE_table",
        ),
        "duplicate column": (
            _split([*cols, "smcAC"], [[*r, r[0]] for r in rows]),
            json_type,
            "expected each column once; got a column name twice",
        ),
        "text value": (
            _edited(df, 5, "vib_table", "abc"),
            json_type,
            "input: expected numbers in column 'vib_table'; got something else (could not "
            "convert string to float: 'abc')",
        ),
        "nested value": (
            _edited(df, 5, "smcDC", [1.0, 2.0]),
            json_type,
            "expected numbers in column 'smcDC'",
        ),
        "object value": (
            _edited(df, 5, "smcDC", {"v": 1.0}),
            json_type,
            "expected numbers in column 'smcDC'",
        ),
        "null value": (
            _edited(df, 70, "smcAC", None),
            json_type,
            "expected finite numbers; found 1 NaN/inf value(s) in the signal columns, the first "
            "at row 70 (window 1), smcAC = nan",
        ),
        "NaN token": (_edited(df, 3, "smcAC", float("nan")), json_type, "1 NaN/inf value(s)"),
        "Infinity token": (_edited(df, 3, "smcDC", float("inf")), json_type, "smcDC = inf"),
        "-Infinity token": (_edited(df, 3, "smcDC", float("-inf")), json_type, "smcDC = -inf"),
        "1e400 (inf in float64)": (
            _frame_body(df).replace(json.dumps(rows[0][0]), "1e400", 1),
            json_type,
            "found 1 NaN/inf value(s) in the signal columns, the first at row 0",
        ),
        "1e300": (
            _edited(df, 130, "vib_spindle", 1e300),
            json_type,
            f"input: expected vib_spindle within [{low[3]:.6g}, {high[3]:.6g}]",
        ),
        "-1e300": (
            _edited(df, 4, "AE_spindle", -1e300),
            json_type,
            "got -1e+300 at row 4 (window 0), 1 value(s) out of range",
        ),
        "3.5e38 (inf in float32)": (
            _edited(df, 4, "smcAC", 3.5e38),
            json_type,
            "expected smcAC within",
        ),
        "rows not whole windows": (
            _frame_body(df.iloc[:100]),
            json_type,
            "expected a multiple of 64 rows (each 64 consecutive rows form one window); got 100",
        ),
        "no rows": (_split(cols, []), json_type, "got 0 rows"),
        "partial condition": (
            _frame_body(df.drop(columns=["material"])),
            json_type,
            "expected all condition columns DOC, feed, material or none; got DOC, feed without "
            "material",
        ),
        "condition varies": (
            _frame_body(varying),
            json_type,
            "expected feed constant within each window of 64 rows; window 1 has",
        ),
        "too many windows": (
            _frame_body(pd.concat([many] * (MAX_WINDOWS + 1))),
            json_type,
            f"expected at most {MAX_WINDOWS} windows ({MAX_WINDOWS * 64} rows) per request (the "
            f"server's {MAX_WINDOWS_ENV}); got {(MAX_WINDOWS + 1) * 64} rows",
        ),
        "records with a missing value": (
            json.dumps(
                {
                    "dataframe_records": [
                        {k: v for k, v in r.items() if i != 9 or k != "smcDC"}
                        for i, r in enumerate(df.to_dict("records"))
                    ]
                }
            ),
            json_type,
            "the first at row 9 (window 0)",
        ),
        "CSV with text": (
            df.assign(smcAC=["x", *df["smcAC"].iloc[1:]]).to_csv(index=False),
            "text/csv",
            "request: expected a table pandas reads as numbers; got an error (could not convert "
            "string to float: 'x')",
        ),
    }


BAD_BODIES = [
    "empty body",
    "not JSON",
    "JSON list",
    "JSON number",
    "no format key",
    "two format keys",
    "split not an object",
    "split without data",
    "ragged rows",
    "missing column",
    "misspelled column",
    "duplicate column",
    "text value",
    "nested value",
    "object value",
    "null value",
    "NaN token",
    "Infinity token",
    "-Infinity token",
    "1e400 (inf in float64)",
    "1e300",
    "-1e300",
    "3.5e38 (inf in float32)",
    "rows not whole windows",
    "no rows",
    "partial condition",
    "condition varies",
    "too many windows",
    "records with a missing value",
    "CSV with text",
]


@pytest.mark.bad_input
@pytest.mark.parametrize("label", BAD_BODIES)
def test_a_bad_body_gets_a_one_line_400(served, label):
    body, content_type, expected = _bad_bodies(served)[label]
    status, _, text = _request(served, body, content_type)
    _assert_one_line(status, text, 400, expected)


@pytest.mark.bad_input
def test_a_body_of_another_content_type_gets_a_one_line_415(served):
    status, content_type, text = _request(served, _frame_body(served.frame), "text/plain")
    assert status == 415 and content_type.startswith("text/plain"), text
    assert "\n" not in text.strip() and "Got 'text/plain'" in text


def _big_body(n_bytes: int) -> bytes:
    """A well-formed request of about n_bytes: the same row of six values over and over."""
    head = b'{"dataframe_split": {"columns": ["smcAC", "smcDC", "vib_table", "vib_spindle", '
    head += b'"AE_table", "AE_spindle"], "data": ['
    row = b"[1.804199, 7.207031, 3.068848, 0.656738, 0.196533, 0.300293], "
    return head + row * (n_bytes // len(row)) + row[:-2] + b"]}}"


@pytest.mark.bad_input
@pytest.mark.parametrize("how", ["declared and sent", "chunked"])
def test_a_95_mb_body_is_refused_unread_and_memory_stays_put(served, how):
    # the 95 MB body was parsed whole: server memory went from 0.84 to 1.75 GB (here,
    # before the fix: peak 1.07 to 2.32 GB and 11 s to a 400)
    body = _big_body(95_000_000)
    before = _group_peak_rss(served.pgid)
    status, _, text = _request(served, body, chunked=how == "chunked")
    got = "Content-Length 95" if how == "declared and sent" else "stopped reading at"
    answer = _assert_one_line(status, text, 413, f"expected a body of at most {MAX_BODY} bytes")
    assert got in answer["message"] and answer["error_code"] == "REQUEST_LIMIT_EXCEEDED"
    # the peak grows by at most what was read (nothing, or the limit and a chunk), not the
    # 1.2 GB that parsing such a body took
    after = _group_peak_rss(served.pgid)
    assert after - before < 3 * MAX_BODY, (before, after)
    # and the server goes on answering
    status, _, text = _request(served, _frame_body(served.frame))
    assert status == 200, text


def test_a_body_within_the_limit_is_read_and_parsed(served):
    body = _big_body(MAX_BODY - 1000)
    assert len(body) <= MAX_BODY
    status, _, text = _request(served, body)
    # read and parsed: refused by the window limit, not the body limit
    _assert_one_line(status, text, 400, f"expected at most {MAX_WINDOWS} windows")


def test_responses_are_strict_json_and_name_the_score_and_threshold_used(served):
    t, df = served.trained, served.frame
    status, _, text = _request(served, _frame_body(df[t.signals]))
    assert status == 200, text
    rows = strict_json(text)["predictions"]  # a bare NaN would raise here
    thresholds = t.config["thresholds"]
    for row in rows:
        assert row["mse_cond"] is None and row["kl_cond"] is None  # not computed: null
        assert row["score_name"] == "kl" and row["score"] == row["kl"]
        assert row["threshold"] == pytest.approx(thresholds["kl"])
        assert row["decision"] == "kl (no condition given)"
        assert row["warning"].startswith("no condition columns (DOC, feed, material): decided")
        assert "instead of the model's decision score kl_cond" in row["warning"]

    # with the condition: the model's decision score; a condition never seen healthy is named
    unseen = df.copy()
    unseen.loc[:63, "DOC"] = 1e300
    status, _, text = _request(served, _frame_body(unseen))
    assert status == 200, text
    rows = strict_json(text)["predictions"]
    for row in rows:
        assert row["score_name"] == "kl_cond" and row["score"] == row["kl_cond"]
        assert row["threshold"] == pytest.approx(thresholds["kl_cond"])
    assert rows[0]["warning"].startswith("condition 1e+300|0.")
    assert "was not seen healthy in training" in rows[0]["warning"]
    assert rows[1]["warning"] is None and rows[2]["warning"] is None


def test_readings_far_outside_the_training_range_are_scored_not_refused(served):
    t, df = served.trained, served.frame
    low, high = signal_ranges(t.config)
    far = df.copy()
    far.loc[64:127, "vib_table"] = float(high[2])  # a whole window at the limit itself
    far.loc[130, "smcAC"] = float(low[0])
    status, _, text = _request(served, _frame_body(far))
    assert status == 200, text
    rows = strict_json(text)["predictions"]
    assert rows[1]["is_anomaly"] and rows[2]["is_anomaly"]
    assert all(np.isfinite(r["score"]) for r in rows)


@pytest.mark.bad_input
@pytest.mark.parametrize("value", ["0", "-5", "2.5", "16MB", "1e6"])
def test_a_bad_limit_setting_is_a_one_line_error(monkeypatch, value):
    # read when the server loads the model: a bad one stops it with this line
    monkeypatch.setenv(MAX_BODY_ENV, value)
    with pytest.raises(MillvaeError, match=f"^{MAX_BODY_ENV}: expected a whole number >= 1; got"):
        _env_limit(MAX_BODY_ENV, 7)


def test_an_unset_or_empty_limit_setting_is_the_default(monkeypatch):
    monkeypatch.delenv(MAX_BODY_ENV, raising=False)
    assert _env_limit(MAX_BODY_ENV, 7) == 7
    monkeypatch.setenv(MAX_BODY_ENV, " ")
    assert _env_limit(MAX_BODY_ENV, 7) == 7
    monkeypatch.setenv(MAX_BODY_ENV, "123")
    assert _env_limit(MAX_BODY_ENV, 7) == 123
