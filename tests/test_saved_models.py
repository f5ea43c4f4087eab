"""Models saved by earlier code still load and predict the same with the current package.

`fixtures/saved_ffcb19e.zip` was made with the code of commit ffcb19e, when the model was one
module, `millvae/model.py`: a tiny trained β-VAE logged as MLflow's Keras flavor (`model/`), its
pyfunc detector logged as models-from-code (`detector/`, with its bundled copy of that package
under `code/`), and what both predicted then on their input examples (`expected.json`). The Keras
model's pickled custom objects name `millvae.model.BetaVAE`, `millvae.model.FusedTCN` and the
others, so `millvae.model` must keep those names.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "saved_ffcb19e.zip"


@pytest.fixture
def saved(tmp_path, monkeypatch) -> Path:
    """The fixture unzipped; MLflow's additions to sys.path undone after the test."""
    with zipfile.ZipFile(FIXTURE) as archive:
        archive.extractall(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return tmp_path


def _expected(saved: Path) -> dict:
    return json.loads((saved / "expected.json").read_text())


def _detector_input(saved: Path) -> pd.DataFrame:
    """The detector's input example: raw signal rows with their cutting conditions."""
    example = json.loads((saved / "detector" / "artifacts" / "input_example.json").read_text())
    return pd.DataFrame(example["data"], columns=example["columns"])


def assert_same_predictions(got: dict, want: dict) -> None:
    """Two `to_json(orient="split")` frames (parsed) agree: numbers to 1e-5, the rest exactly."""
    assert got["columns"] == want["columns"]
    assert len(got["data"]) == len(want["data"])
    for got_row, want_row in zip(got["data"], want["data"], strict=True):
        for column, g, w in zip(want["columns"], got_row, want_row, strict=True):
            numeric = isinstance(w, (int, float)) and not isinstance(w, bool)
            if numeric and g is not None:
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=column)
            else:
                assert g == w, column


def test_old_keras_model_loads_into_the_current_classes(saved):
    import mlflow.tensorflow

    import millvae.model
    from millvae.model.vae import BetaVAE, FusedBatchNormalization, FusedTCN

    model = mlflow.tensorflow.load_model(str(saved / "model" / "artifacts"))
    assert Path(millvae.model.__file__).parents[1] == Path(__file__).parents[1] / "millvae"
    assert type(model) is BetaVAE
    assert type(model.encoder.get_layer("encoder_tcn_0")) is FusedTCN
    assert type(model.encoder.get_layer("encoder_batch_norm_0")) is FusedBatchNormalization
    assert type(model.decoder.get_layer("decoder_tcn_0")) is FusedTCN

    expected = _expected(saved)
    x = np.asarray(
        json.loads((saved / "model" / "artifacts" / "input_example.json").read_text()),
        dtype=np.float32,
    )
    assert list(x.shape) == expected["model_input_shape"]
    want = np.asarray(expected["model_output"], dtype=np.float32)
    np.testing.assert_allclose(model.predict(x, verbose=0), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.forward(x)[2], want, rtol=1e-5, atol=1e-5)


def test_old_detector_predicts_the_same_in_this_process(saved):
    import mlflow.pyfunc

    detector = mlflow.pyfunc.load_model(str(saved / "detector" / "artifacts"))
    got = json.loads(detector.predict(_detector_input(saved)).to_json(orient="split"))
    assert_same_predictions(got, _expected(saved)["detector"])


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import mlflow.pyfunc
    import pandas as pd

    import millvae.detector  # the current package, before MLflow puts the bundled copy first

    artifacts = sys.argv[1]
    example = json.load(open(artifacts + "/input_example.json"))
    frame = pd.DataFrame(example["data"], columns=example["columns"])
    detector = mlflow.pyfunc.load_model(artifacts)
    print(millvae.__file__)
    print(detector.predict(frame).to_json(orient="split"))
    """
)


def test_old_detector_predicts_the_same_in_a_fresh_process(saved):
    artifacts = saved / "detector" / "artifacts"
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(artifacts)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=Path(__file__).parents[1],
    )
    assert result.returncode == 0, result.stderr[-4000:]
    *_, package, predictions = result.stdout.strip().splitlines()
    assert Path(package).parent == Path(__file__).parents[1] / "millvae"
    got = json.loads(predictions)
    assert_same_predictions(got, _expected(saved)["detector"])
