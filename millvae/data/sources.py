"""Turn the ``data`` parameter into a local ``mill.mat`` (a path, the NASA download, or a simulator)
and the ``labels`` parameter into a local labels CSV (a path, or the seed's published file).

``resolve_data`` and ``resolve_labels`` are the entry points the training code uses;
``download_nasa`` fetches and verifies the official archive (a zip holding a nested ``mill.zip``
holding ``mill.mat``) into a cache folder, ``download_seed_labels`` the seed's labels CSV into the
same folder; ``main`` is the ``millvae download`` subcommand.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO

from millvae.cache import default_cache_dir, file_lock
from millvae.data.synthetic import SYNTHETIC_VERSION, write_synthetic_mat
from millvae.errors import ArgParser, MillvaeError

NASA_URL = "https://phm-datasets.s3.amazonaws.com/NASA/3.+Milling.zip"
NASA_ZIP_MD5 = "4da3afb0aa50cb3dcdd8e20ed1ed1c7c"
MILL_MAT_SIZE = 72_575_144
MILL_MAT_SHA256 = "71486a857939d1416c86c7cf0c469d5e69c7c30495e01ec8a0e13aafd2a313cb"

# The seed's hand-picked stable cutting regions (Hahn & Mechefske 2021), published in the seed's
# repository github.com/tvhahn/ml-tool-wear as data/processed/labels_with_tool_class.csv (MIT
# licence). The URL names the commit that added the file (it is unchanged on master since), so
# what it serves cannot move under the checksum.
SEED_LABELS_URL = (
    "https://raw.githubusercontent.com/tvhahn/ml-tool-wear/"
    "e1b4980915df421ac3674970b47b3c0b2258aa9c/data/processed/labels_with_tool_class.csv"
)
SEED_LABELS_SHA256 = "acda3c5e26d67ccd36cceec390bef29cac6604c70bc426d3d1e037eae25d2d87"
SEED_LABELS_NAME = "labels_with_tool_class.csv"
# The real file has 6,449 bytes; far more means the URL serves something else (a page, an archive).
SEED_LABELS_MAX_BYTES = 1 << 20

MAT_NAME = "mill.mat"
DATA_WORDS = ("nasa", "synthetic", "auto")
LABELS_WORDS = ("seed",)
_CHUNK = 1 << 16
_TMP_PREFIX = ".millvae-tmp-"

log = logging.getLogger(__name__)


class SyntheticDataWarning(UserWarning):
    """``data=auto`` found no real milling data and fell back to the simulator."""


@dataclass(frozen=True)
class DataFile:
    """A resolved data or labels file: absolute path, where it came from, its content hash."""

    path: Path
    origin: str  # "file" | "nasa" | "synthetic"; for a labels CSV "file" | "seed"
    sha256: str


# ----------------------------------------------------------------------------------------------
# small helpers


# Hashing the 72 MB mill.mat costs ~0.2 s; a search resolves data once per trial, so remember the
# hash per (file identity, size, mtime) within the process instead of writing sidecar files next to
# data that may live on a read-only share.
_HASH_MEMO: dict[tuple[str, int, int, int], str] = {}


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (streamed; memoised per path, inode, size and mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASH_MEMO:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASH_MEMO[key] = h.hexdigest()
    return _HASH_MEMO[key]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MillvaeError(
            f"cache: expected a writable folder at {path}; got {type(e).__name__} ({e.strerror})"
        ) from None


def _tmp_path(folder: Path, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(dir=folder, prefix=_TMP_PREFIX, suffix=suffix)
    os.close(fd)
    return Path(name)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _matches(path: Path, size: int | None, sha256: str) -> bool:
    """Whether `path` is a file of `size` bytes (any size: None) with that sha256."""
    try:
        sized = size is None or path.stat().st_size == size
        return path.is_file() and sized and sha256_file(path) == sha256
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------
# progress


class _Progress:
    """Download progress on stderr: a live line on a TTY, else a plain line every ~10 %."""

    def __init__(self, total: int | None, enabled: bool, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total = total if total and total > 0 else None
        self.enabled = enabled
        self.live = enabled and _isatty(self.stream)
        self.done = 0
        self._last_draw = 0.0
        self._next_step = 1  # next tenth (or next 10 MB when the size is unknown) to report

    def _text(self) -> str:
        mb = self.done / 1e6
        if self.total is None:
            return f"downloading: {mb:,.1f} MB"
        pct = 100.0 * self.done / self.total
        return f"downloading: {mb:,.1f} / {self.total / 1e6:,.1f} MB ({pct:.1f} %)"

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.live:
            now = time.monotonic()
            if now - self._last_draw >= 0.2:  # redraw at most 5x a second
                self._last_draw = now
                self.stream.write("\r" + self._text())
                self.stream.flush()
            return
        step = 10_000_000 if self.total is None else self.total / 10
        if self.done >= self._next_step * step:
            while self.done >= self._next_step * step:
                self._next_step += 1
            self.stream.write(self._text() + "\n")
            self.stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.live:
            self.stream.write("\r" + self._text() + "\n")
            self.stream.flush()
        elif self.total is None or self.done < self.total:
            # the 10 % lines already ended on 100 % for a complete download of known size
            self.stream.write(self._text() + "\n")
            self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------
# download


def _network_reason(exc: BaseException, timeout: float) -> str:
    """A short human reason for a failed connection or read."""
    reason: object = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, socket.gaierror):
        return f"DNS lookup failed ({reason.strerror or reason}; offline?)"
    if isinstance(reason, TimeoutError):
        return f"timed out after {timeout:g} s"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, ConnectionResetError):
        return "connection reset by the server"
    if isinstance(reason, http.client.IncompleteRead):
        return f"connection closed early ({len(reason.partial):,} bytes read, more expected)"
    if isinstance(reason, str):
        return reason
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__


def _fetch(
    url: str,
    dest: Path,
    timeout: float,
    progress: bool,
    *,
    hint: str | None = None,
    limit: int | None = None,
) -> str:
    """Stream ``url`` into ``dest`` (at most ``limit`` bytes); return the md5 of what came.

    Raises MillvaeError; ``hint`` ends the network messages (what the user can do instead).
    """
    if hint is None:
        hint = f"put a {MAT_NAME} at {dest.parent / MAT_NAME} or use data=synthetic"
    md5 = hashlib.md5()
    got = 0
    try:
        # built inside the try: Request itself refuses a malformed URL with a ValueError
        request = urllib.request.Request(url, headers={"User-Agent": "millvae-downloader"})
        with urllib.request.urlopen(request, timeout=timeout) as resp, open(dest, "wb") as out:
            length = resp.headers.get("Content-Length")
            bar = _Progress(int(length) if length and length.isdigit() else None, progress)
            for chunk in iter(lambda: resp.read(_CHUNK), b""):
                got += len(chunk)
                if limit is not None and got > limit:
                    raise MillvaeError(
                        f"could not download {url}: expected at most {limit:,} bytes, got more "
                        f"(the URL serves something else?); {hint}"
                    )
                out.write(chunk)
                md5.update(chunk)
                bar.update(len(chunk))
            bar.close()
    except urllib.error.HTTPError as e:
        raise MillvaeError(
            f"could not download {url}: expected HTTP 200, got HTTP {e.code} {e.reason}; {hint}"
        ) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        if isinstance(e, OSError) and e.filename is not None:  # a local file problem, not network
            raise MillvaeError(f"could not write {e.filename}: {e.strerror or e}") from None
        raise MillvaeError(
            f"could not download {url}: {_network_reason(e, timeout)}; {hint}"
        ) from None
    except ValueError as e:  # e.g. "unknown url type"
        raise MillvaeError(f"could not download {url!r}: {e}; {hint}") from None
    return md5.hexdigest()


def _single_member(zf: zipfile.ZipFile, name: str) -> zipfile.ZipInfo | None:
    """The member whose base name is ``name`` (any folder), skipping macOS resource forks."""
    for info in zf.infolist():
        if info.is_dir() or info.filename.startswith("__MACOSX/"):
            continue
        if info.filename.replace("\\", "/").rsplit("/", 1)[-1].lower() == name:
            return info
    return None


def _copy_limited(src: BinaryIO, dst: BinaryIO, limit: int) -> int:
    """Copy at most ``limit`` bytes (guards against a lying zip header); return bytes copied."""
    copied = 0
    while copied < limit:
        chunk = src.read(min(_CHUNK * 16, limit - copied))
        if not chunk:
            break
        dst.write(chunk)
        copied += len(chunk)
    return copied


def _extract_mat(archive: Path, url: str, folder: Path, mat_size: int) -> Path:
    """outer zip → nested mill.zip → mill.mat, into a temp file in ``folder``."""
    inner_zip = _tmp_path(folder, ".zip")
    mat_tmp = _tmp_path(folder, ".mat")
    try:
        try:
            with zipfile.ZipFile(archive) as outer:
                member = _single_member(outer, "mill.zip")
                if member is None:
                    names = ", ".join(outer.namelist()[:5]) or "nothing"
                    raise MillvaeError(
                        f"archive from {url}: expected a nested mill.zip, found only: {names}"
                    )
                with outer.open(member) as src, open(inner_zip, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK * 16)
        except zipfile.BadZipFile as e:
            raise MillvaeError(
                f"archive from {url}: expected a zip file, got something else ({e})"
            ) from None
        try:
            with zipfile.ZipFile(inner_zip) as inner:
                member = _single_member(inner, MAT_NAME)
                if member is None:
                    names = ", ".join(inner.namelist()[:5]) or "nothing"
                    raise MillvaeError(
                        f"archive from {url}: expected {MAT_NAME} inside the nested mill.zip, "
                        f"found only: {names}"
                    )
                with inner.open(member) as src, open(mat_tmp, "wb") as dst:
                    got = _copy_limited(src, dst, mat_size + 1)
        except zipfile.BadZipFile as e:
            raise MillvaeError(
                f"archive from {url}: expected the nested mill.zip to be a zip file, "
                f"got something else ({e})"
            ) from None
        if got != mat_size:
            shown = f"more than {mat_size:,}" if got > mat_size else f"{got:,}"
            raise MillvaeError(
                f"{MAT_NAME} from {url}: expected {mat_size:,} bytes, got {shown} bytes"
            )
        return mat_tmp
    except BaseException:
        _unlink_quietly(mat_tmp)
        raise
    finally:
        _unlink_quietly(inner_zip)


def download_nasa(
    cache_dir: Path | None = None,
    *,
    url: str | None = None,
    zip_md5: str = NASA_ZIP_MD5,
    mat_size: int = MILL_MAT_SIZE,
    mat_sha256: str = MILL_MAT_SHA256,
    progress: bool = True,
    timeout: float = 30.0,
) -> Path:
    """Return ``cache_dir/mill.mat``, downloading and verifying the NASA archive when it is missing.

    ``url`` defaults to ``$MILLVAE_NASA_URL``, else :data:`NASA_URL`. A verified cached file is
    returned without network access. ``$MILLVAE_OFFLINE=1`` forbids the download. Every failure is a
    one-line :class:`MillvaeError`, and leaves no partial file in the cache.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    url = url or os.environ.get("MILLVAE_NASA_URL") or NASA_URL
    target = folder / MAT_NAME
    if _matches(target, mat_size, mat_sha256):
        return target.resolve()
    _make_dir(folder)
    with file_lock(folder / f".{MAT_NAME}.lock", f"waiting for another process to fetch {target}"):
        # another process may have finished the download while this one waited for the lock
        if _matches(target, mat_size, mat_sha256):
            return target.resolve()
        if _env_flag("MILLVAE_OFFLINE"):
            raise MillvaeError(
                f"could not download {url}: MILLVAE_OFFLINE is set; put a {MAT_NAME} at {target} "
                "or use data=synthetic"
            )
        if progress:
            print(f"downloading {url} into {folder}", file=sys.stderr, flush=True)
        archive = _tmp_path(folder, ".zip")
        try:
            got_md5 = _fetch(url, archive, timeout, progress)
            if got_md5 != zip_md5.lower():
                raise MillvaeError(
                    f"archive from {url}: expected md5 {zip_md5}, got {got_md5} "
                    "(corrupted or changed download)"
                )
            mat_tmp = _extract_mat(archive, url, folder, mat_size)
            try:
                got_sha = sha256_file(mat_tmp)
                if got_sha != mat_sha256.lower():
                    raise MillvaeError(
                        f"{MAT_NAME} from {url}: expected sha256 {mat_sha256}, got {got_sha}"
                    )
                os.replace(mat_tmp, target)
            except BaseException:
                _unlink_quietly(mat_tmp)
                raise
        finally:
            _unlink_quietly(archive)
    if progress:
        print(f"saved {target}", file=sys.stderr, flush=True)
    return target.resolve()


def download_seed_labels(
    cache_dir: Path | None = None,
    *,
    url: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 30.0,
) -> Path:
    """Return ``cache_dir/labels_with_tool_class.csv`` (the seed's labels), fetching it if absent.

    ``url`` defaults to ``$MILLVAE_LABELS_URL``, else :data:`SEED_LABELS_URL`; ``sha256`` to
    :data:`SEED_LABELS_SHA256` (read at call time). A cached copy with that hash is returned without
    network access; one without it (a corrupted or edited file) is fetched again.
    ``$MILLVAE_OFFLINE=1`` forbids the download. Every failure is a one-line :class:`MillvaeError`
    and leaves the cache as it was (a verified file is only ever moved in whole).
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    url = url or os.environ.get("MILLVAE_LABELS_URL") or SEED_LABELS_URL
    want = (sha256 or SEED_LABELS_SHA256).lower()
    target = folder / SEED_LABELS_NAME
    if _matches(target, None, want):
        return target.resolve()
    _make_dir(folder)
    note = f"waiting for another process to fetch {target}"
    with file_lock(folder / f".{SEED_LABELS_NAME}.lock", note):
        if _matches(target, None, want):  # fetched by another process while this one waited
            return target.resolve()
        hint = f"put the seed's {SEED_LABELS_NAME} (sha256 {want}) at {target} or pass labels=PATH"
        stale = target.exists()
        if stale:
            log.warning("%s does not match sha256 %s; fetching it again", target, want)
        if _env_flag("MILLVAE_OFFLINE"):
            why = f"the copy at {target} does not match; " if stale else ""
            raise MillvaeError(
                f"could not download the seed's labels CSV from {url}: MILLVAE_OFFLINE is set; "
                f"{why}{hint}"
            )
        if progress:
            print(f"downloading {url} into {folder}", file=sys.stderr, flush=True)
        tmp = _tmp_path(folder, ".csv")
        try:
            # a 6 kB file: no progress bar, only the two lines around it
            _fetch(url, tmp, timeout, False, hint=hint, limit=SEED_LABELS_MAX_BYTES)
            got = sha256_file(tmp)
            if got != want:
                raise MillvaeError(
                    f"labels CSV from {url}: expected sha256 {want}, got {got} "
                    "(corrupted or changed download; nothing was cached)"
                )
            os.replace(tmp, target)
        except BaseException:
            _unlink_quietly(tmp)
            raise
    if progress:
        print(f"saved {target}", file=sys.stderr, flush=True)
    return target.resolve()


# ----------------------------------------------------------------------------------------------
# synthetic


def _synthetic_file(folder: Path, seed: int) -> Path:
    """``folder/synthetic_v{VERSION}_seed{seed}.mat``, generated once even for parallel callers."""
    target = folder / f"synthetic_v{SYNTHETIC_VERSION}_seed{seed}.mat"
    if target.is_file():
        return target.resolve()
    _make_dir(folder)
    note = f"waiting for another process to write {target}"
    with file_lock(folder / f".{target.name}.lock", note):
        if target.is_file():
            return target.resolve()
        tmp = _tmp_path(folder, ".mat")  # ends in .mat so savemat does not append another suffix
        try:
            write_synthetic_mat(tmp, seed=seed)
            os.replace(tmp, target)
        except BaseException:
            _unlink_quietly(tmp)
            raise
    return target.resolve()


# ----------------------------------------------------------------------------------------------
# resolve


def _bad_data(data: str, why: str) -> MillvaeError:
    return MillvaeError(
        f"data: expected a path to a {MAT_NAME} file, 'nasa', 'synthetic' or 'auto'; "
        f"got {data!r} ({why})"
    )


def _as_file(data: str) -> DataFile:
    p = Path(data).expanduser()
    if p.is_dir():
        raise _bad_data(data, "a directory")
    if not p.is_file():
        raise _bad_data(data, "no such file")
    p = p.resolve()
    return DataFile(p, "file", sha256_file(p))


_SAID: set[str] = set()


def _say(message: str) -> None:
    """Which data a run uses and why, in its first lines (before any download starts); once per
    process (a search prepares the data again for each new window size)."""
    if message not in _SAID:
        _SAID.add(message)
        print(f"millvae: {message}", file=sys.stderr, flush=True)


def _auto(synthetic_seed: int) -> DataFile:
    env = os.environ.get("MILLVAE_DATA", "").strip()
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            # an explicit setting that points nowhere is a mistake, not a cue for the simulator
            raise MillvaeError(
                f"MILLVAE_DATA: expected a path to a {MAT_NAME} file; got {env!r} "
                f"({'a directory' if p.is_dir() else 'no such file'})"
            )
        _say(f"data=auto: using $MILLVAE_DATA = {p}")
        return DataFile(p.resolve(), "file", sha256_file(p))
    local = Path("data") / MAT_NAME
    if local.is_file():
        _say(f"data=auto: using ./data/{MAT_NAME}")
        return DataFile(local.resolve(), "file", sha256_file(local))
    folder = default_cache_dir()
    cached = folder / MAT_NAME
    if cached.is_file():
        digest = sha256_file(cached)
        origin = "nasa" if digest == MILL_MAT_SHA256 else "file"  # a user may put their own there
        what = "the NASA download" if origin == "nasa" else "a file of your own"
        _say(f"data=auto: using {cached} ({what}, in the cache)")
        return DataFile(cached.resolve(), origin, digest)

    if _env_flag("MILLVAE_OFFLINE"):
        why = "MILLVAE_OFFLINE is set, so no download was tried"
    else:
        _say(
            f"data=auto: no real data yet ($MILLVAE_DATA unset, no ./data/{MAT_NAME}, "
            f"no {cached}); fetching the UC Berkeley milling data once from NASA "
            "(MILLVAE_OFFLINE=1 skips this; if it fails, the synthetic simulator is used)"
        )
        try:
            path = download_nasa(folder)
            return DataFile(path, "nasa", sha256_file(path))
        except MillvaeError as e:
            why = f"download failed: {e}"
    message = (
        f"no real milling data found (MILLVAE_DATA unset, no ./data/{MAT_NAME}, no {cached}; "
        f"{why}); using the SYNTHETIC simulator: its numbers say nothing about real tool wear"
    )
    warnings.warn(message, SyntheticDataWarning, stacklevel=3)
    path = _synthetic_file(folder, synthetic_seed)
    return DataFile(path, "synthetic", sha256_file(path))


def resolve_data(data: str, *, synthetic_seed: int = 0) -> DataFile:
    """Turn the ``data`` parameter into a local file.

    ``data`` is a path to a ``mill.mat``; ``nasa`` (download into the cache); ``synthetic`` (the
    simulator, cached per seed); or ``auto``: ``$MILLVAE_DATA``, ``./data/mill.mat``, the cached
    download, a fresh download (unless ``$MILLVAE_OFFLINE``), and last the simulator with a warning.
    """
    text = os.fspath(data).strip()
    word = text.lower()
    if word == "nasa":
        path = download_nasa()
        return DataFile(path, "nasa", sha256_file(path))
    if word == "synthetic":
        path = _synthetic_file(default_cache_dir(), synthetic_seed)
        return DataFile(path, "synthetic", sha256_file(path))
    if word == "auto":
        return _auto(synthetic_seed)
    if not text:
        raise _bad_data(text, "empty")
    return _as_file(text)


def resolve_labels(labels: str, *, progress: bool = True) -> DataFile | None:
    """Turn the ``labels`` parameter into a local CSV: None for empty (detect the regions).

    ``seed`` is the seed's published labels CSV, fetched once into the cache and checked against
    its sha256 (see :func:`download_seed_labels`); anything else is a path to a CSV of your own.
    The word wins over a file named ``seed`` in the working folder (pass ``./seed`` for that).
    """
    text = os.fspath(labels).strip()
    if not text:
        return None
    if text.lower() in LABELS_WORDS:
        path = download_seed_labels(progress=progress)
        return DataFile(path, "seed", SEED_LABELS_SHA256)  # just checked against it
    p = Path(text).expanduser()
    if not p.is_file():
        why = "a directory" if p.is_dir() else "no such file"
        raise MillvaeError(f"labels: expected a CSV file or 'seed'; got {text!r} ({why})")
    p = p.resolve()
    return DataFile(p, "file", sha256_file(p))


# ----------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``millvae download``: fetch the NASA milling data (or ``--labels``: the seed's labels CSV)
    into the cache and print its path."""
    parser = ArgParser(
        prog="millvae download",
        description="Download the UC Berkeley milling data (NASA archive), verify it, and cache "
        f"{MAT_NAME}; with --labels, the seed's labels CSV instead ({SEED_LABELS_NAME}, what "
        "labels=seed uses). Prints the path of the cached file.",
    )
    parser.add_argument(
        "--labels",
        action="store_true",
        help=f"fetch the seed's labels CSV ({SEED_LABELS_URL}, checked against its sha256) "
        "instead of the data",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="folder for the cached files (default: $MILLVAE_CACHE, $XDG_CACHE_HOME/millvae, "
        "or ~/.cache/millvae)",
    )
    parser.add_argument(
        "--url",
        default=None,
        help=f"archive URL (default: $MILLVAE_NASA_URL or {NASA_URL}); with --labels the CSV's "
        "(default: $MILLVAE_LABELS_URL or the seed's)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    try:
        if args.labels:
            path = download_seed_labels(
                args.cache_dir, url=args.url, progress=not args.quiet, timeout=args.timeout
            )
            print(path)
            return 0
        # module constants read at call time, so a test can point them at a small fake archive
        path = download_nasa(
            args.cache_dir,
            url=args.url,
            zip_md5=NASA_ZIP_MD5,
            mat_size=MILL_MAT_SIZE,
            mat_sha256=MILL_MAT_SHA256,
            progress=not args.quiet,
            timeout=args.timeout,
        )
    except MillvaeError as e:
        print(f"millvae download: error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
