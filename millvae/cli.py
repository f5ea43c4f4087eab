"""Command line: `millvae train ...` (the MLproject `main` entry point) and `millvae download`."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

# TensorFlow's C++ INFO chatter (oneDNN, CUDA probing) buries the per-epoch lines users need.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from millvae.config import PARAM_DEFAULTS, PARAM_HELP, PARAM_NAMES, make_config
from millvae.errors import ArgParser, MillvaeError


def _train_parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="millvae train", description="Train one β-VAE as one MLflow run.")
    for name in PARAM_NAMES:
        p.add_argument(f"--{name}", default=PARAM_DEFAULTS[name], help=PARAM_HELP[name])
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    return p


def _fail_external_run(message: str) -> None:
    """Under `mlflow run` the run exists before we start: never leave it RUNNING."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "millvae.error", message[:5000])
            client.set_terminated(run_id, status="FAILED")
    except Exception as exc:  # the store itself may be what failed
        print(f"millvae: could not mark run {run_id} FAILED: {exc}", file=sys.stderr)


_default_showwarning = warnings.showwarning
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our own warnings on one line, as the errors are; other libraries' as Python prints them."""
    ours = os.path.abspath(filename).startswith(_PACKAGE_DIR)
    if ours or category.__module__.startswith("millvae"):
        print(f"millvae: warning: {message}", file=file or sys.stderr, flush=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


def _install_sigterm() -> None:
    """SIGTERM (a scheduler, `kill`) unwinds like Ctrl-C: the run ends KILLED, not RUNNING."""
    import signal

    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        signal.signal(signal.SIGTERM, _raise)
    except ValueError:  # not the main thread
        pass


def train_main(argv: list[str]) -> int:
    args = vars(_train_parser().parse_args(argv))
    quiet = args.pop("quiet")
    cfg = make_config(**args)
    from millvae.train import preload, train_run

    preload()
    result = train_run(cfg, verbose=0 if quiet else 2)
    print(
        f"millvae: run {result.run_id} finished: {result.epochs_trained} epochs, best val loss "
        f"{result.best_val_loss:.5f} at epoch {result.best_epoch}, {result.training_seconds:.1f} s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "search": None,
        "train": None,
        "download": None,
        "baseline": None,
        "register": None,
        "repeat": None,
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(
            "usage: millvae {train,search,repeat,baseline,register,download} [options]\n"
            "  train     train one β-VAE as one MLflow run (`millvae train --help`)\n"
            "  search    random search: one run per ParameterSampler draw, parallel, resumable\n"
            "  repeat    one configuration over several split seeds, mean ± spread\n"
            "  baseline  PCA and Isolation Forest detectors on the same data and metrics\n"
            "  register  register the best run's detector in the Model Registry\n"
            "  download  fetch the NASA milling data into the cache",
            file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    warnings.simplefilter("default")  # our own warnings (dropped records, ...) are for the user
    warnings.showwarning = _show_warning
    # libraries' deprecation notices (SQLAlchemy's from MLflow's store, ...) are not
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("default", category=DeprecationWarning, module="millvae")
    _install_sigterm()
    try:
        if argv[0] == "download":
            from millvae.data.sources import main as download_main

            return int(download_main(argv[1:]) or 0)
        if argv[0] == "baseline":
            from millvae.baseline import main as baseline_main

            return baseline_main(argv[1:])
        if argv[0] == "search":
            from millvae.search import main as search_main

            return search_main(argv[1:])
        if argv[0] == "repeat":
            from millvae.repeat import main as repeat_main

            return repeat_main(argv[1:])
        if argv[0] == "register":
            from millvae.register import main as register_main

            return int(register_main(argv[1:]) or 0)
        return train_main(argv[1:])
    except MillvaeError as exc:
        msg = str(exc)
        _fail_external_run(msg)
        print(f"millvae: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _fail_external_run("interrupted")
        print("millvae: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: keep the traceback, end with one line
        import traceback

        traceback.print_exc()
        first = str(exc).splitlines()[0] if str(exc) else ""
        msg = f"{type(exc).__name__}: {first}"
        _fail_external_run(msg)
        print(f"millvae: error: {msg}", file=sys.stderr)
        return 1
