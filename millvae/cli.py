"""`millvae <command>`: dispatch to the command's module, one line for every error.

Each command lives in its own module with `main(argv)`; they are imported only when run, so
`millvae --help` answers without loading TensorFlow or MLflow.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings

# TensorFlow's C++ INFO chatter (oneDNN, CUDA probing) buries the per-epoch lines users need.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from millvae.errors import MillvaeError

COMMANDS = {
    "train": ("millvae.train", "train one β-VAE as one MLflow run (`millvae train --help`)"),
    "search": (
        "millvae.search",
        "random search: one run per ParameterSampler draw, parallel, resumable",
    ),
    "repeat": ("millvae.repeat", "one configuration over several split seeds, mean ± spread"),
    "baseline": (
        "millvae.baseline",
        "PCA and Isolation Forest detectors on the same data and metrics",
    ),
    "register": ("millvae.register", "register the best run's detector in the Model Registry"),
    "download": ("millvae.data.sources", "fetch the NASA milling data into the cache"),
}


def _usage() -> str:
    lines = [f"usage: millvae {{{','.join(COMMANDS)}}} [options]"]
    lines += [f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def _fail_external_run(message: str) -> None:
    """Under `mlflow run` the run exists before we start: never leave it RUNNING."""
    if os.environ.get("MLFLOW_RUN_ID"):
        from millvae.tracking import fail_external_run

        fail_external_run(message)


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


def _run(command: str, argv: list[str]) -> int:
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        asked = bool(argv) and argv[0] in ("-h", "--help")
        print(_usage(), file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    warnings.simplefilter("default")  # our own warnings (dropped records, ...) are for the user
    warnings.showwarning = _show_warning
    # libraries' deprecation notices (SQLAlchemy's from MLflow's store, ...) are not
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("default", category=DeprecationWarning, module="millvae")
    _install_sigterm()
    try:
        return _run(argv[0], argv[1:])
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
