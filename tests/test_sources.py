"""Data-source resolution and the NASA downloader, against a local HTTP server (no internet)."""

from __future__ import annotations

import hashlib
import io
import os
import random
import socket
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from millvae.cache import default_cache_dir
from millvae.data import sources
from millvae.data.sources import (
    DataFile,
    download_nasa,
    resolve_data,
    sha256_file,
)
from millvae.errors import MillvaeError

from .servers import FileServer as Server
from .servers import isolate_downloads, serving_folder

MAT_BYTES = random.Random(0).randbytes(300_000)  # stands in for mill.mat: any bytes will do


def _zip_bytes(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _archive(
    mat: bytes, inner_name: str = "mill.mat", nested: str = "3. Milling/mill.zip"
) -> bytes:
    """Outer zip with a folder holding a nested mill.zip holding ``inner_name``, like NASA's."""
    inner = _zip_bytes({inner_name: mat})
    return _zip_bytes({"3. Milling/Readme.txt": b"UC Berkeley milling data\n", nested: inner})


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Cache in a tmp folder, a clean cwd, no millvae/proxy settings from the caller's shell."""
    return isolate_downloads(tmp_path, monkeypatch)


@pytest.fixture
def cache(isolated: Path) -> Path:
    return isolated


@pytest.fixture
def server(tmp_path: Path):
    with serving_folder(tmp_path) as srv:
        yield srv


@pytest.fixture
def good(server: Server) -> dict:
    """Download kwargs for a good archive on the local server."""
    data = _archive(MAT_BYTES)
    return {
        "url": server.add("good.zip", data),
        "zip_md5": _md5(data),
        "mat_size": len(MAT_BYTES),
        "mat_sha256": _sha(MAT_BYTES),
    }


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _leftovers(folder: Path) -> list[str]:
    """Files in the cache other than lock files: after a failure there must be none."""
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


# ---------------------------------------------------------------------------------------------
# download_nasa


def test_download_extracts_verified_mat_and_second_call_makes_no_request(cache, server, good):
    path = download_nasa(cache, progress=False, **good)
    assert path == (cache / "mill.mat").resolve()
    assert path.read_bytes() == MAT_BYTES
    assert _leftovers(cache) == ["mill.mat"]
    assert len(server.requests) == 1

    again = download_nasa(cache, progress=False, **good)
    assert again == path
    assert len(server.requests) == 1, "a verified cached file must not be downloaded again"


def test_corrupted_cached_file_is_replaced(cache, server, good):
    cache.mkdir(parents=True)
    (cache / "mill.mat").write_bytes(MAT_BYTES[:-1] + b"\x00")  # same size, wrong hash
    path = download_nasa(cache, progress=False, **good)
    assert path.read_bytes() == MAT_BYTES
    assert len(server.requests) == 1


def _expect_failure(cache: Path, match: str, **kwargs) -> str:
    with pytest.raises(MillvaeError, match=match) as info:
        download_nasa(cache, progress=False, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert _leftovers(cache) == [], "a failed download must leave no partial file"
    return message


def test_md5_mismatch(cache, server, good):
    data = bytearray(_archive(MAT_BYTES))
    data[len(data) // 2] ^= 0xFF
    url = server.add("corrupt.zip", bytes(data))
    message = _expect_failure(cache, "expected md5", **{**good, "url": url})
    assert good["zip_md5"] in message
    assert _md5(bytes(data)) in message


def test_inner_sha256_mismatch(cache, server, good):
    other = MAT_BYTES[:-1] + b"\x01"  # same size, other bytes
    data = _archive(other)
    url = server.add("wrongsha.zip", data)
    message = _expect_failure(
        cache, "expected sha256", **{**good, "url": url, "zip_md5": _md5(data)}
    )
    assert good["mat_sha256"] in message and _sha(other) in message


def test_inner_size_mismatch(cache, good):
    _expect_failure(cache, "expected 300,001 bytes, got 300,000", **{**good, "mat_size": 300_001})
    _expect_failure(cache, "expected 299,999 bytes, got more than", **{**good, "mat_size": 299_999})


def test_not_a_zip(cache, server):
    data = b"<html>this is not a zip</html>"
    url = server.add("page.zip", data)
    _expect_failure(cache, "expected a zip file", url=url, zip_md5=_md5(data))


def test_archive_without_nested_mill_zip(cache, server):
    data = _zip_bytes({"3. Milling/other.zip": b"x"})
    url = server.add("nonested.zip", data)
    _expect_failure(cache, r"expected a nested mill\.zip.*other\.zip", url=url, zip_md5=_md5(data))


def test_nested_zip_without_mill_mat(cache, server):
    data = _archive(MAT_BYTES, inner_name="notes.mat")
    url = server.add("nomat.zip", data)
    _expect_failure(cache, r"expected mill\.mat inside.*notes\.mat", url=url, zip_md5=_md5(data))


def test_http_404(cache, server, good):
    url = good["url"].replace("good.zip", "missing.zip")
    _expect_failure(cache, "expected HTTP 200, got HTTP 404", **{**good, "url": url})


@pytest.mark.bad_input
def test_malformed_url_is_one_line(cache, good):
    message = _expect_failure(cache, "unknown url type", **{**good, "url": "ftp//nowhere"})
    assert message.startswith("could not download 'ftp//nowhere': ")


def test_offline_connection_refused_is_fast_and_clear(cache, good):
    url = f"http://127.0.0.1:{_closed_port()}/3.+Milling.zip"
    start = time.monotonic()
    message = _expect_failure(cache, "connection refused", **{**good, "url": url})
    assert time.monotonic() - start < 5
    assert message.startswith(f"could not download {url}: ")
    assert str(cache / "mill.mat") in message and "data=synthetic" in message


def test_timeout_when_server_never_answers(cache, good):
    with socket.socket() as silent:  # listens (the kernel accepts) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/x.zip"
        start = time.monotonic()
        _expect_failure(cache, r"timed out after 0\.3 s", **{**good, "url": url, "timeout": 0.3})
        assert time.monotonic() - start < 5


def test_millvae_offline_forbids_download(cache, server, good, monkeypatch):
    monkeypatch.setenv("MILLVAE_OFFLINE", "1")
    _expect_failure(cache, "MILLVAE_OFFLINE", **good)
    assert server.requests == []


def test_millvae_nasa_url_is_honoured(cache, server, good, monkeypatch):
    monkeypatch.setenv("MILLVAE_NASA_URL", good.pop("url"))
    path = download_nasa(cache, progress=False, **good)
    assert path.read_bytes() == MAT_BYTES
    assert server.requests == ["/good.zip"]


def test_default_cache_dir_used_when_none_given(cache, good):
    assert download_nasa(progress=False, **good) == (cache / "mill.mat").resolve()


def test_progress_lines_on_stderr_when_not_a_tty(cache, good, capsys):
    download_nasa(cache, progress=True, **good)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("downloading:")]
    assert 3 <= len(lines) <= 12, err  # about one line per 10 %
    assert "MB" in lines[-1] and "100.0 %" in lines[-1]
    assert "\r" not in err


def test_no_progress_output_when_disabled(cache, good, capsys):
    download_nasa(cache, progress=False, **good)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_progress_line_on_a_tty(cache, good, monkeypatch):
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    download_nasa(cache, progress=True, **good)
    text = tty.getvalue()
    assert "\rdownloading:" in text and "100.0 %" in text


# ---------------------------------------------------------------------------------------------
# resolve_data


def test_default_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MILLVAE_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("MILLVAE_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "millvae"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "millvae"


def test_resolve_existing_path(tmp_path):
    f = tmp_path / "my mill.mat"
    f.write_bytes(b"abc")
    got = resolve_data(str(f))
    assert got == DataFile(f.resolve(), "file", _sha(b"abc"))
    assert sha256_file(f) == _sha(b"abc")


def test_resolve_relative_path_becomes_absolute():
    Path("here.mat").write_bytes(b"xyz")
    got = resolve_data("here.mat")
    assert got.path.is_absolute() and got.path == Path("here.mat").resolve()


@pytest.mark.parametrize(
    ("data", "why"),
    [("missing/mill.mat", "no such file"), ("nsaa", "no such file"), ("", "empty")],
)
def test_resolve_rejects_missing_path_or_unknown_word(data, why):
    expected = (
        "data: expected a path to a mill.mat file, 'nasa', 'synthetic' or 'auto'; "
        f"got '{data}' ({why})"
    )
    with pytest.raises(MillvaeError) as info:
        resolve_data(data)
    assert str(info.value) == expected


def test_resolve_rejects_directory(tmp_path):
    with pytest.raises(MillvaeError, match=r"got '.*' \(a directory\)"):
        resolve_data(str(tmp_path))


def test_resolve_nasa_downloads_from_configured_url(server, good, monkeypatch):
    # the official md5 cannot match our fake archive: the error proves the download was attempted
    monkeypatch.setenv("MILLVAE_NASA_URL", good["url"])
    with pytest.raises(MillvaeError, match="expected md5 4da3afb0aa50cb3dcdd8e20ed1ed1c7c"):
        resolve_data("nasa")
    assert server.requests == ["/good.zip"]


def test_auto_prefers_millvae_data(tmp_path, monkeypatch):
    f = tmp_path / "elsewhere.mat"
    f.write_bytes(b"env")
    Path("data").mkdir()
    Path("data/mill.mat").write_bytes(b"local")
    monkeypatch.setenv("MILLVAE_DATA", str(f))
    got = resolve_data("auto")
    assert (got.path, got.origin, got.sha256) == (f.resolve(), "file", _sha(b"env"))


def test_auto_millvae_data_pointing_nowhere_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MILLVAE_DATA", str(tmp_path / "nope.mat"))
    with pytest.raises(MillvaeError, match=r"MILLVAE_DATA: expected .*no such file"):
        resolve_data("auto")


def test_auto_uses_local_data_then_cache(cache):
    cache.mkdir(parents=True)
    (cache / "mill.mat").write_bytes(b"cached")
    got = resolve_data("auto")
    assert got.path == (cache / "mill.mat").resolve() and got.sha256 == _sha(b"cached")
    Path("data").mkdir()
    Path("data/mill.mat").write_bytes(b"local")
    got = resolve_data("auto")
    assert got.path == Path("data/mill.mat").resolve() and got.origin == "file"


# ---------------------------------------------------------------------------------------------
# synthetic (needs millvae.data.synthetic, written alongside this module)


@pytest.fixture
def synthetic_module():
    return pytest.importorskip(
        "millvae.data.synthetic", reason="millvae.data.synthetic not present"
    )


def test_auto_offline_falls_back_to_synthetic_loudly(cache, monkeypatch, synthetic_module):
    monkeypatch.setenv("MILLVAE_OFFLINE", "1")
    with pytest.warns(sources.SyntheticDataWarning, match="using the SYNTHETIC simulator") as w:
        got = resolve_data("auto", synthetic_seed=3)
    assert got.origin == "synthetic"
    version = synthetic_module.SYNTHETIC_VERSION
    assert got.path == (cache / f"synthetic_v{version}_seed3.mat").resolve()
    assert got.sha256 == sha256_file(got.path)
    assert len(w) == 1 and "no real milling data found" in str(w[0].message)  # said once
    assert _leftovers(cache) == [got.path.name]


def test_auto_failed_download_falls_back_with_reason(cache, monkeypatch, synthetic_module):
    monkeypatch.setenv("MILLVAE_NASA_URL", f"http://127.0.0.1:{_closed_port()}/m.zip")
    with pytest.warns(sources.SyntheticDataWarning, match="connection refused"):
        got = resolve_data("auto")
    assert got.origin == "synthetic"


def test_synthetic_is_cached_per_seed(cache, synthetic_module):
    first = resolve_data("synthetic", synthetic_seed=0)
    stamp = first.path.stat().st_mtime_ns
    again = resolve_data("synthetic", synthetic_seed=0)
    assert again == first and again.path.stat().st_mtime_ns == stamp
    other = resolve_data("synthetic", synthetic_seed=1)
    assert other.path != first.path and other.origin == "synthetic"


def test_synthetic_generation_is_safe_for_parallel_callers(cache, synthetic_module):
    results: list[DataFile] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(resolve_data("synthetic", synthetic_seed=7))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({r.path for r in results}) == 1 and len({r.sha256 for r in results}) == 1
    assert _leftovers(cache) == [results[0].path.name]


# ---------------------------------------------------------------------------------------------
# millvae download


def test_main_prints_path(cache, good, capsys, monkeypatch):
    # main checks the official hashes; point them at the fake archive's
    monkeypatch.setattr(sources, "NASA_ZIP_MD5", good["zip_md5"])
    monkeypatch.setattr(sources, "MILL_MAT_SIZE", good["mat_size"])
    monkeypatch.setattr(sources, "MILL_MAT_SHA256", good["mat_sha256"])
    code = sources.main(["--cache-dir", str(cache / "x"), "--url", good["url"], "--quiet"])
    out = capsys.readouterr()
    assert code == 0
    assert out.out.strip() == str((cache / "x" / "mill.mat").resolve())
    assert out.err == ""


def test_main_failure_exits_1_with_one_line(cache, capsys):
    url = f"http://127.0.0.1:{_closed_port()}/m.zip"
    code = sources.main(["--url", url, "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("millvae download: error: could not download")
    assert not os.path.exists(cache / "mill.mat")
