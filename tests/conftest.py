"""Shared fixtures. Nothing here reaches the internet or the user's home cache."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "milling"
REAL5 = SHARED / "mill_partial_no_AE_spindle.mat"
FIXTURE2 = SHARED / "pyphm_fixture_mill_2cuts.mat"
LABELS = SHARED / "labels_with_tool_class.csv"


def pytest_configure(config):
    # Before any test imports millvae or TensorFlow: no downloads, no writes to ~/.cache.
    import tempfile

    os.environ["MILLVAE_CACHE"] = tempfile.mkdtemp(prefix="millvae-test-cache-")
    os.environ["MILLVAE_OFFLINE"] = "1"
    os.environ["MILLVAE_NASA_URL"] = "http://127.0.0.1:9/not-served.zip"
    os.environ.pop("MILLVAE_DATA", None)
    os.environ.pop("MLFLOW_RUN_ID", None)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["MLFLOW_ENABLE_ASYNC_LOGGING"] = "false"
    # millvae picks TensorFlow's oneDNN switch as it would for a user, before any test module's
    # `import tensorflow` loads it first: otherwise what runs depends on which file pytest
    # collects first (test_model.py alone ran without oneDNN on AVX2-only CPUs)
    import millvae  # noqa: F401


def need_real(*paths: Path) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        pytest.skip(f"real milling data not available here: {missing[0]} is absent")


@pytest.fixture
def real5() -> Path:
    need_real(REAL5)
    return REAL5


@pytest.fixture
def fixture2() -> Path:
    need_real(FIXTURE2)
    return FIXTURE2


@pytest.fixture
def labels_csv() -> Path:
    need_real(LABELS)
    return LABELS


@pytest.fixture(scope="session")
def synthetic_mat(tmp_path_factory) -> Path:
    """A full-size synthetic mill.mat (all 16 cases, six signals), written once per session."""
    from millvae.data.synthetic import write_synthetic_mat

    path = tmp_path_factory.mktemp("synthetic") / "mill_synthetic.mat"
    return write_synthetic_mat(path, seed=0)


@pytest.fixture(scope="session")
def tiny_config(synthetic_mat):
    """make_config(**overrides) of a small, fast β-VAE on the synthetic data (2 epochs)."""
    from millvae.config import make_config

    def make(**overrides):
        given = dict(
            data=str(synthetic_mat),
            epochs=2,
            codings_size=4,
            start_filter_no=8,
            dilations="1,2",
            bootstrap=20,
        )
        return make_config(**{**given, **overrides})

    return make


@pytest.fixture
def tracking(tmp_path, monkeypatch) -> str:
    """A throw-away sqlite tracking store; the test runs in tmp_path so ./mlruns lands there."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # mlflow.set_experiment() exports MLFLOW_EXPERIMENT_ID; a stale one from an earlier test's store
    # would leak into this test's subprocesses
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    import mlflow.tracking.fluent as fluent

    fluent._active_experiment_id = None
