"""Bad input: a one-line error naming what was expected and what came, a non-zero exit, and the
run that `mlflow run` created before us ended FAILED (never left RUNNING)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import mlflow
import numpy as np
import pytest
import scipy.io

from millvae.cli import main

from .conftest import REPO


@pytest.fixture
def external_run(tracking, monkeypatch):
    """A RUNNING run, as `mlflow run` leaves one for the entry point (MLFLOW_RUN_ID)."""
    exp = mlflow.set_experiment("millvae")
    run = mlflow.MlflowClient().create_run(exp.experiment_id)
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    return run.info.run_id


@pytest.fixture
def served(tmp_path):
    """A loopback HTTP server with a corrupted NASA-style archive."""
    root = tmp_path / "www"
    root.mkdir()
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("mill.mat", b"not the real data")
    with zipfile.ZipFile(root / "milling.zip", "w") as z:
        z.writestr("3. Milling/mill.zip", inner.getvalue())
    handler = partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _nomill(tmp_path):
    p = tmp_path / "nomill.mat"
    scipy.io.savemat(p, {"data": np.zeros(3)})
    return p


def _text(tmp_path):
    p = tmp_path / "text.mat"
    p.write_text("hello, I am not MATLAB\n" * 30)
    return p


def _labels(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("cut,start,stop\n0,0,64\n")
    return p


def _five_signals(tmp_path, synthetic_mat):
    mat = scipy.io.loadmat(synthetic_mat)["mill"]
    names = [n for n in mat.dtype.names if n != "AE_spindle"]
    out = np.empty(mat.shape, dtype=[(n, "O") for n in names])
    for n in names:
        out[n] = mat[n]
    p = tmp_path / "five.mat"
    scipy.io.savemat(p, {"mill": out})
    return p


CASES = [
    # (id, argv builder, expected substring of the message)
    ("missing-file", lambda t, s: ["--data", str(t / "nope.mat")], "no such file"),
    ("not-a-mat", lambda t, s: ["--data", str(_text(t))], "expected a MATLAB .mat file"),
    ("mat-without-mill", lambda t, s: ["--data", str(_nomill(t))], "expected a variable 'mill'"),
    (
        "missing-signal",
        lambda t, s: ["--data", str(_five_signals(t, s))],
        "lacks AE_spindle; it has smcAC",
    ),
    (
        "labels-wrong-columns",
        lambda t, s: ["--data", str(s), "--labels", str(_labels(t))],
        "expected columns cut_no, window_start, window_end",
    ),
    ("unknown-source", lambda t, s: ["--data", "kaggle"], "got 'kaggle'"),
    ("negative-beta", lambda t, s: ["--beta", "-0.5"], "beta: expected a number >= 0; got -0.5"),
    (
        "window-not-divisible",
        lambda t, s: ["--window_size", "60", "--conv_layers", "3"],
        "multiple of 2**conv_layers = 8; got 60",
    ),
    ("malformed-dilations", lambda t, s: ["--dilations", "1,two,4"], "dilations: expected"),
    (
        "epochs-zero",
        lambda t, s: ["--epochs", "0"],
        "epochs: expected 1 <= epochs <= 100000; got 0",
    ),
    ("unknown-activation", lambda t, s: ["--final_activation", "relu"], "final_activation"),
    ("unknown-split", lambda t, s: ["--split", "random"], "split: expected one of"),
    ("unknown-signal", lambda t, s: ["--signals", "smcAC,force"], "signals: expected"),
    ("not-a-number", lambda t, s: ["--batch_size", "big"], "batch_size: expected an integer"),
    ("unknown-schedule", lambda t, s: ["--lr_schedule", "step"], "lr_schedule: expected one of"),
    (
        "peak-below-start",
        lambda t, s: ["--lr_schedule", "onecycle", "--lr_max", "0.0001"],
        "lr_max: expected >= learning_rate (0.001); got 0.0001",
    ),
    # sizes: every one bounded, and what the bounds let through is checked against memory
    ("kernel-huge", lambda t, s: ["--kernel_size", "100000"], "kernel_size <= window_size (64)"),
    ("codings-huge", lambda t, s: ["--codings_size", "1e8"], "codings_size <= 4096; got 100000000"),
    ("filters-huge", lambda t, s: ["--start_filter_no", "5000"], "start_filter_no <= 1024"),
    ("filters-zero", lambda t, s: ["--start_filter_no", "0"], "1 <= start_filter_no"),
    ("dilation-wider-than-window", lambda t, s: ["--dilations", "1,128"], "each <= window_size"),
    ("too-many-dilations", lambda t, s: ["--dilations", ",".join(["1"] * 17)], "at most 16"),
    ("window-huge", lambda t, s: ["--window_size", "16384"], "window_size <= 9000"),
    ("stride-zero", lambda t, s: ["--stride", "0"], "1 <= stride <= 9000; got 0"),
    ("stride-huge", lambda t, s: ["--stride", "100000"], "stride <= 9000"),
    ("batch-huge", lambda t, s: ["--batch_size", "1e7"], "batch_size <= 65536"),
    ("epochs-huge", lambda t, s: ["--epochs", "1e9"], "epochs <= 100000"),
    ("patience-huge", lambda t, s: ["--earlystop_patience", "1e9"], "earlystop_patience <="),
    ("cycle-huge", lambda t, s: ["--lr_cycle_epochs", "1e12"], "lr_cycle_epochs <= 100000"),
    ("seed-beyond-32-bit", lambda t, s: ["--seed", str(2**40)], "seed <= 4294967295"),
    ("negative-split-seed", lambda t, s: ["--split_seed", "-1"], "0 <= split_seed"),
    ("score-samples-huge", lambda t, s: ["--score_samples", "100000"], "score_samples <= 100"),
    ("bootstrap-huge", lambda t, s: ["--bootstrap", "1e9"], "bootstrap <= 100000"),
    ("memory-cap-negative", lambda t, s: ["--max_memory_gb", "-1"], "max_memory_gb: expected >= 0"),
    ("memory-cap-nan", lambda t, s: ["--max_memory_gb", "nan"], "max_memory_gb: expected a finite"),
    (
        "over-memory-cap",
        lambda t, s: ["--max_memory_gb", "0.5"],
        "fits in 0.5 GB (max_memory_gb=0.5)",
    ),
    (
        "over-machine-memory",
        lambda t, s: ["--batch_size", "65536", "--start_filter_no", "1024"],
        "(this machine); this one needs about",
    ),
    ("beta-inf", lambda t, s: ["--beta", "inf"], "beta: expected a finite number"),
    (
        "codings-fraction",
        lambda t, s: ["--codings_size", "2.5"],
        "codings_size: expected an integer",
    ),
    ("layers-seven", lambda t, s: ["--conv_layers", "7"], "conv_layers: expected 1..6; got 7"),
    ("unknown-positive", lambda t, s: ["--positive", "all"], "positive: expected one of"),
    ("percentile-100", lambda t, s: ["--threshold_percentile", "100"], "threshold_percentile"),
    ("momentum-one", lambda t, s: ["--bn_momentum", "1"], "bn_momentum: expected 0 <= momentum"),
    ("empty-experiment", lambda t, s: ["--experiment", " "], "experiment: expected a non-empty"),
    ("unknown-option", lambda t, s: ["--betta", "1"], "unrecognized arguments: --betta 1"),
    ("folds-one", lambda t, s: ["--split", "casefold", "--folds", "1"], "folds: expected 2 <="),
    (
        "fold-beyond-folds",
        lambda t, s: ["--split", "casefold", "--folds", "3", "--split_seed", "3"],
        "split_seed: expected a fold 0..2 under split=casefold with folds=3; got 3",
    ),
    (
        # the synthetic data has 8 failing tools: a ninth fold would test nothing
        "more-folds-than-failing-tools",
        lambda t, s: ["--data", str(s), "--split", "casefold", "--folds", "9"],
        "expected at least folds=9 tools that reach failure, one per test fold; found 8",
    ),
    ("unknown-detector", lambda t, s: ["--detector", "forest"], "detector: expected one of"),
    ("conditional-word", lambda t, s: ["--conditional", "maybe"], "conditional: expected one of"),
    ("combine-unknown-part", lambda t, s: ["--combine", "mse,iforest"], "combine: expected"),
    ("smoothing-one", lambda t, s: ["--smoothing", "1"], "smoothing: expected 0 <= w < 1; got 1"),
    (
        # a signal's error needs that signal among the run's: refused before any data is read
        "combine-signal-not-used",
        lambda t, s: [
            *("--detector", "combined", "--combine", "mse_smcAC,pca"),
            *("--signals", "vib_table,AE_table"),
        ],
        "combine: expected errors of the run's signals (vib_table, AE_table); got mse_smcAC",
    ),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("argv", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_the_run_with_one_line(
    argv, expected, external_run, synthetic_mat, tmp_path, capsys
):
    code = main(["train", "--epochs", "1", *argv(tmp_path, synthetic_mat)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert err[-1].startswith("millvae: error: ") and expected in err[-1], err[-1]
    assert "Traceback" not in "\n".join(err)
    run = mlflow.MlflowClient().get_run(external_run)
    assert run.info.status == "FAILED"
    assert expected in run.data.tags["millvae.error"]


def test_checksum_mismatch_of_the_download(external_run, served, monkeypatch, capsys):
    monkeypatch.setenv("MILLVAE_NASA_URL", f"{served}/milling.zip")
    monkeypatch.delenv("MILLVAE_OFFLINE", raising=False)
    code = main(["train", "--data", "nasa", "--epochs", "1"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0 and "md5" in last.lower() and last.startswith("millvae: error: ")
    assert mlflow.MlflowClient().get_run(external_run).info.status == "FAILED"
    assert not list((__import__("pathlib").Path(os.environ["MILLVAE_CACHE"])).glob("mill.mat"))


def test_offline_download(external_run, monkeypatch, capsys):
    monkeypatch.setenv("MILLVAE_NASA_URL", "http://127.0.0.1:9/milling.zip")  # nothing listens
    monkeypatch.delenv("MILLVAE_OFFLINE", raising=False)
    code = main(["train", "--data", "nasa", "--epochs", "1"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0 and "could not download" in last and "127.0.0.1:9" in last
    assert mlflow.MlflowClient().get_run(external_run).info.status == "FAILED"


def test_without_mlflow_run_a_bad_parameter_creates_no_run(tracking, capsys):
    assert main(["train", "--beta", "-1"]) == 2
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_a_real_process_exits_non_zero_with_one_line(tracking):
    out = subprocess.run(
        [sys.executable, "-m", "millvae", "train", "--kernel_size", "0"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "millvae: error: kernel_size: expected 1 <= kernel_size <= window_size (64); got 0"
    )
