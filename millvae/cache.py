"""The cache folder and the one file lock (downloads, the simulator's file, the kernel build)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: locks are no-ops, os.replace keeps files whole
    fcntl = None

log = logging.getLogger("millvae")


def default_cache_dir() -> Path:
    """``$MILLVAE_CACHE``, else ``$XDG_CACHE_HOME/millvae``, else ``~/.cache/millvae``."""
    if os.environ.get("MILLVAE_CACHE"):
        return Path(os.environ["MILLVAE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "millvae"
    return Path.home() / ".cache" / "millvae"


@contextlib.contextmanager
def file_lock(lock_path: Path, waiting_note: str = "") -> Iterator[None]:
    """Hold an exclusive advisory lock on `lock_path`: one process does the work, the rest wait.

    The lock file is opened without following a link (someone else's link must not choose the
    file we create); `waiting_note` is logged when another process holds the lock.
    """
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if waiting_note:
                    log.info(waiting_note)
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
