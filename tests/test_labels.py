"""The labels parameter: `labels=seed` (the seed's published CSV, fetched from a loopback server
standing in for GitHub, checked and cached) and one-line errors for bad labels CSVs."""

from __future__ import annotations

import hashlib
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from millvae.config import make_config
from millvae.data import sources
from millvae.data.prepare import prepare
from millvae.data.sources import (
    SEED_LABELS_NAME,
    DataFile,
    download_seed_labels,
    resolve_labels,
)
from millvae.data.windows import read_labels
from millvae.errors import MillvaeError

from .servers import FileServer, free_port, isolate_downloads, serving_folder
from .test_data_prep import SEED_TABLE, tool_records, write_mill

HEADER = "case,run,VB,time,DOC,feed,material,cut_no,tool_class,window_start,window_end\n"
# stands in for the seed's file: three cuts of case 1, regions on the 64-sample grid
CSV = (HEADER + "1,1,0,2,1.5,0.5,1,0,0,2496,6976\n1,2,,4,1.5,0.5,1,1,0,2496,6976\n").encode()
CSV += b"1,3,0.11,7,1.5,0.5,1,2,0,2112,6464\n"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Cache in a tmp folder, a clean cwd, downloads allowed (loopback only), no proxies."""
    return isolate_downloads(tmp_path, monkeypatch, keep_nasa_url=True)


@pytest.fixture
def cache(isolated: Path) -> Path:
    return isolated


@pytest.fixture
def file_server(tmp_path: Path):
    """A loopback HTTP server standing in for GitHub's raw file host."""
    with serving_folder(tmp_path) as srv:
        yield srv


@pytest.fixture
def seed_served(file_server: FileServer, monkeypatch: pytest.MonkeyPatch) -> FileServer:
    """`labels=seed` pointed at CSV on the loopback server: URL by env, checksum by constant."""
    monkeypatch.setenv("MILLVAE_LABELS_URL", file_server.add("labels.csv", CSV))
    monkeypatch.setattr(sources, "SEED_LABELS_SHA256", _sha(CSV))
    return file_server


def _leftovers(folder: Path) -> list[str]:
    """Files in the cache other than lock files."""
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message.strip() == message
    return message


# ---------------------------------------------------------------------------------------------
# labels=seed


def test_published_url_and_checksum_are_the_seed_repositorys():
    assert sources.SEED_LABELS_URL.startswith(
        "https://raw.githubusercontent.com/tvhahn/ml-tool-wear/"
    )
    assert sources.SEED_LABELS_URL.endswith("/data/processed/labels_with_tool_class.csv")
    assert sources.SEED_LABELS_SHA256 == (
        "acda3c5e26d67ccd36cceec390bef29cac6604c70bc426d3d1e037eae25d2d87"
    )


def test_fetch_verifies_caches_and_the_second_resolve_makes_no_request(cache, seed_served):
    got = resolve_labels("seed", progress=False)
    assert got == DataFile((cache / SEED_LABELS_NAME).resolve(), "seed", _sha(CSV))
    assert got.path.read_bytes() == CSV
    assert seed_served.requests == ["/labels.csv"]
    assert _leftovers(cache) == [SEED_LABELS_NAME]

    again = resolve_labels(" SEED ", progress=False)
    assert again == got
    assert seed_served.requests == ["/labels.csv"], "a verified cached copy must not be fetched"


def test_download_seed_labels_takes_url_and_checksum_arguments(cache, file_server):
    url = file_server.add("other.csv", CSV)
    path = download_seed_labels(cache / "x", url=url, sha256=_sha(CSV).upper(), progress=False)
    assert path == (cache / "x" / SEED_LABELS_NAME).resolve() and path.read_bytes() == CSV


def test_progress_lines_name_the_url_and_the_cached_file(cache, seed_served, capsys):
    resolve_labels("seed")
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("downloading http://127.0.0.1:") and err[0].endswith(str(cache))
    assert err[1] == f"saved {cache / SEED_LABELS_NAME}"


def test_corrupted_cache_is_fetched_again(cache, seed_served):
    cache.mkdir(parents=True)
    (cache / SEED_LABELS_NAME).write_bytes(CSV.replace(b"2496", b"2497", 1))  # an edited copy
    path = resolve_labels("seed", progress=False).path
    assert path.read_bytes() == CSV and seed_served.requests == ["/labels.csv"]


def test_parallel_callers_fetch_once(cache, seed_served):
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(resolve_labels("seed", progress=False).path)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(results)) == 1
    assert seed_served.requests == ["/labels.csv"]


def test_prepare_with_labels_seed_uses_the_fetched_regions(tmp_path, cache, seed_served):
    path = write_mill(tmp_path / "mill.mat", tool_records(1, [0.0, np.nan, 0.11]))
    p = prepare(make_config(data=str(path), labels="seed"))
    assert p.regions_from == "labels"
    assert p.labels_path == str((cache / SEED_LABELS_NAME).resolve())
    assert p.labels_sha256 == _sha(CSV)
    assert p.cuts["region_start"].tolist() == [2496, 2496, 2112]
    assert p.cuts["region_end"].tolist() == [6976, 6976, 6464]
    # (6976 - 2496) / 64 = 70 windows in cuts 0 and 1, (6464 - 2112) / 64 = 68 in cut 2
    assert p.counts()["n_windows"] == 70 + 70 + 68


def test_labels_path_and_empty_work_as_before(tmp_path):
    csv = tmp_path / "mine.csv"
    csv.write_bytes(CSV)
    got = resolve_labels(str(csv))
    assert got == DataFile(csv.resolve(), "file", _sha(CSV))
    assert resolve_labels("") is None and resolve_labels("  ") is None
    path = write_mill(tmp_path / "mill.mat", tool_records(1, [0.0, np.nan, 0.11]))
    p = prepare(make_config(data=str(path), labels=str(csv)))
    assert p.regions_from == "labels" and p.labels_sha256 == _sha(CSV)
    p = prepare(make_config(data=str(path)))
    assert p.regions_from == "detected" and p.labels_path == "" and p.labels_sha256 == ""


def test_config_accepts_seed_without_a_file_and_fetches_nothing(file_server, monkeypatch):
    monkeypatch.setenv("MILLVAE_LABELS_URL", file_server.add("labels.csv", CSV))
    assert make_config(labels="seed").labels == "seed"
    assert file_server.requests == [], "validation must not touch the network"


def test_millvae_download_labels_prints_the_cached_path(cache, seed_served, capsys):
    code = sources.main(["--labels", "--quiet"])
    out = capsys.readouterr()
    assert code == 0 and out.err == ""
    assert out.out.strip() == str((cache / SEED_LABELS_NAME).resolve())


@pytest.mark.bad_input
def test_millvae_download_labels_failure_is_one_line(cache, capsys):
    url = f"http://127.0.0.1:{free_port()}/labels.csv"
    code = sources.main(["--labels", "--quiet", "--url", url])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"millvae download: error: could not download {url}: connection refused")


def _served_bad(server: FileServer, kind: str) -> tuple[str, str]:
    """(url, expected message part) of one bad download."""
    if kind == "checksum":
        other = CSV.replace(b"6976", b"6912", 1)
        return server.add("labels.csv", other), f"got {_sha(other)}"
    if kind == "html-page":
        page = b"<!DOCTYPE html><html><body>Not the CSV</body></html>"
        return server.add("labels.csv", page), f"got {_sha(page)}"
    if kind == "empty":
        return server.add("labels.csv", b""), f"got {_sha(b'')}"
    if kind == "oversized":
        return server.add("big.csv", b"x" * (sources.SEED_LABELS_MAX_BYTES + 1)), (
            "expected at most 1,048,576 bytes, got more"
        )
    if kind == "http-404":
        return f"{server.url}/missing.csv", "expected HTTP 200, got HTTP 404"
    if kind == "server-down":
        return f"http://127.0.0.1:{free_port()}/labels.csv", "connection refused"
    if kind == "not-a-url":
        return "ftp//nowhere", "unknown url type"
    raise AssertionError(kind)


BAD_DOWNLOADS = ["checksum", "html-page", "empty", "oversized", "http-404", "server-down"]
BAD_DOWNLOADS += ["not-a-url"]


@pytest.mark.bad_input
@pytest.mark.parametrize("kind", BAD_DOWNLOADS)
def test_bad_download_is_one_line_and_caches_nothing(cache, file_server, monkeypatch, kind):
    url, expected = _served_bad(file_server, kind)
    monkeypatch.setenv("MILLVAE_LABELS_URL", url)
    monkeypatch.setattr(sources, "SEED_LABELS_SHA256", _sha(CSV))
    start = time.monotonic()
    with pytest.raises(MillvaeError) as info:
        resolve_labels("seed", progress=False)
    message = _one_line(info)
    assert expected in message, message
    assert time.monotonic() - start < 5
    if kind in ("checksum", "html-page", "empty"):
        assert message == (
            f"labels CSV from {url}: expected sha256 {_sha(CSV)}, {expected} "
            "(corrupted or changed download; nothing was cached)"
        )
    else:
        assert f"put the seed's {SEED_LABELS_NAME} (sha256 {_sha(CSV)}) at " in message
        assert message.endswith("or pass labels=PATH")
    assert _leftovers(cache) == [], "a failed download must cache nothing"


@pytest.mark.bad_input
def test_offline_is_refused_in_one_line(cache, seed_served, monkeypatch):
    monkeypatch.setenv("MILLVAE_OFFLINE", "1")
    with pytest.raises(MillvaeError) as info:
        resolve_labels("seed")
    message = _one_line(info)
    assert "MILLVAE_OFFLINE is set" in message and str(cache / SEED_LABELS_NAME) in message
    assert seed_served.requests == [] and _leftovers(cache) == []


@pytest.mark.bad_input
def test_corrupted_cache_while_offline_is_refused_and_kept(cache, seed_served, monkeypatch):
    cache.mkdir(parents=True)
    stale = CSV[:-5]
    (cache / SEED_LABELS_NAME).write_bytes(stale)
    monkeypatch.setenv("MILLVAE_OFFLINE", "1")
    with pytest.raises(MillvaeError) as info:
        resolve_labels("seed")
    assert "MILLVAE_OFFLINE is set; the copy at " in _one_line(info)
    assert "does not match" in str(info.value) and seed_served.requests == []
    assert (cache / SEED_LABELS_NAME).read_bytes() == stale  # the user's file is not destroyed


@pytest.mark.bad_input
def test_corrupted_cache_and_bad_download_never_returns_the_bad_copy(
    cache, file_server, monkeypatch
):
    cache.mkdir(parents=True)
    (cache / SEED_LABELS_NAME).write_bytes(b"stale")
    url, _ = _served_bad(file_server, "checksum")
    monkeypatch.setenv("MILLVAE_LABELS_URL", url)
    monkeypatch.setattr(sources, "SEED_LABELS_SHA256", _sha(CSV))
    with pytest.raises(MillvaeError, match="expected sha256"):
        resolve_labels("seed", progress=False)
    assert file_server.requests == ["/labels.csv"]


def test_the_real_download_needs_the_real_checksum(cache, file_server, monkeypatch):
    # the module's checksum is the published file's: a stand-in is refused
    monkeypatch.setenv("MILLVAE_LABELS_URL", file_server.add("labels.csv", CSV))
    with pytest.raises(MillvaeError, match=f"expected sha256 {sources.SEED_LABELS_SHA256}"):
        resolve_labels("seed", progress=False)


@pytest.mark.realdata
def test_labels_seed_served_from_loopback_reproduces_the_seed_split(
    cache, file_server, monkeypatch, real5, labels_csv
):
    # the real file, under its real checksum, from a loopback stand-in for GitHub
    monkeypatch.setenv("MILLVAE_LABELS_URL", file_server.add("labels.csv", labels_csv.read_bytes()))
    cfg = make_config(data=str(real5), signals="available", labels="seed")
    with pytest.warns(UserWarning, match=r"dropped corrupted records \[17, 94\]"):
        p = prepare(cfg)
    assert p.labels_sha256 == sources.SEED_LABELS_SHA256 and p.regions_from == "labels"
    c = p.counts()
    assert c["n_windows"] == 11570
    for s, (n, h, d, f) in SEED_TABLE.items():
        assert (c[f"n_{s}"], c[f"n_{s}_healthy"], c[f"n_{s}_degraded"], c[f"n_{s}_failed"]) == (
            n,
            h,
            d,
            f,
        )
    assert file_server.requests == ["/labels.csv"]
    with pytest.warns(UserWarning, match="dropped corrupted records"):
        again = prepare(cfg)
    assert again.counts() == c and file_server.requests == ["/labels.csv"], "served from cache"


# ---------------------------------------------------------------------------------------------
# bad labels CSVs: one line each, saying what was expected and what came

GOOD_ROW = "0,2496,6976\n"
COLS = "cut_no,window_start,window_end\n"

BAD_CSVS = [
    # (id, file bytes, expected message part)
    (
        "missing-columns",
        b"case,run,start,stop\n1,1,0,64\n",
        "lacks cut_no, window_start, window_end",
    ),
    ("semicolons", b"cut_no;window_start;window_end\n0;2496;6976\n", "lacks cut_no, window_start"),
    ("empty-file", b"", "expected a CSV file with a header row; labels.csv is empty"),
    ("header-only", COLS.encode(), "expected one row per cut; labels.csv has only its header"),
    (
        "text-in-start",
        (COLS + "0,start,6976\n").encode(),
        "column 'window_start' of labels.csv; got 'start'",
    ),
    (
        "fraction-in-end",
        (COLS + "0,2496,6976.5\n").encode(),
        "column 'window_end' of labels.csv; got 6976.5",
    ),
    ("booleans", (COLS + "0,True,False\n").encode(), "whole numbers in column 'window_start'"),
    ("empty-cell", (COLS + "0,,6976\n").encode(), "whole numbers in column 'window_start'"),
    ("fraction-cut-no", (COLS + "0.5,2496,6976\n").encode(), "whole numbers in column 'cut_no'"),
    ("text-case", b"case,cut_no,window_start,window_end\none,0,2496,6976\n", "column 'case'"),
    ("negative-cut-no", (COLS + "-1,2496,6976\n").encode(), "expected cut_no >= 0"),
    ("duplicate-cut-no", (COLS + GOOD_ROW + GOOD_ROW).encode(), "cut_no 0 appears twice"),
    (
        "ragged-row",
        (COLS + GOOD_ROW + "1,2,3,4,5\n").encode(),
        "Expected 3 fields in line 3, saw 5",
    ),
    (
        "open-quote",
        (COLS + '0,"2496,6976\n').encode(),
        "could not parse labels.csv (Error tokenizing",
    ),
    ("random-bytes", random.Random(0).randbytes(2000), "labels.csv is not UTF-8 text (byte 0x"),
    (
        "png-image",
        b"\x89PNG\r\n\x1a\n" + bytes(range(256)),
        "not UTF-8 text (byte 0x89 at position 0)",
    ),
    ("utf16-text", (COLS + GOOD_ROW).encode("utf-16"), "not UTF-8 text (byte 0xff at position 0)"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("data", "expected"), [c[1:] for c in BAD_CSVS], ids=[c[0] for c in BAD_CSVS]
)
def test_bad_labels_csv_is_one_line(tmp_path, data, expected):
    path = tmp_path / "labels.csv"
    path.write_bytes(data)
    with pytest.raises(MillvaeError) as info:
        read_labels(path)
    message = _one_line(info)
    assert message.startswith("labels: expected ") and expected in message, message


@pytest.mark.bad_input
@pytest.mark.parametrize("where", ["config", "resolve", "read"])
def test_a_directory_is_named_as_one(tmp_path, where):
    folder = tmp_path / "labels"
    folder.mkdir()
    with pytest.raises(MillvaeError) as info:
        if where == "config":
            make_config(labels=str(folder))
        elif where == "resolve":
            resolve_labels(str(folder))
        else:
            read_labels(folder)
    assert _one_line(info).endswith("(a directory)")


@pytest.mark.bad_input
def test_a_missing_file_is_named_with_the_seed_alternative(tmp_path):
    with pytest.raises(MillvaeError) as info:
        make_config(labels=str(tmp_path / "nope.csv"))
    assert _one_line(info) == (
        f"labels: expected a CSV file or 'seed'; got '{tmp_path / 'nope.csv'}' (no such file)"
    )


BAD_FOR_THE_DATA = [
    # (id, rows for cuts 0, 1, 2 of case 1, expected message)
    (
        "unknown-case",
        "7,0,2496,6976\n1,1,2496,6976\n1,2,2112,6464\n",
        "labels: expected each cut_no's case to match the data; cut 0 is case 1 in the data but "
        "case 7 in the labels (1 cuts differ: labels for another file?)",
    ),
    (
        "missing-cut",
        "1,0,2496,6976\n1,2,2112,6464\n",
        "labels: expected a row for every cut of the data; missing cut_no [1]",
    ),
    (
        "end-past-record",
        "1,0,2496,6976\n1,1,2496,9064\n1,2,2112,6464\n",
        "labels: expected 0 <= window_start < window_end <= 9000; cut 1 has 2496..9064",
    ),
    (
        "start-after-end",
        "1,0,2496,6976\n1,1,2496,6976\n1,2,6464,2112\n",
        "labels: expected 0 <= window_start < window_end <= 9000; cut 2 has 6464..2112",
    ),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("rows", "expected"), [c[1:] for c in BAD_FOR_THE_DATA], ids=[c[0] for c in BAD_FOR_THE_DATA]
)
def test_labels_that_do_not_fit_the_data_are_one_line(tmp_path, rows, expected):
    csv = tmp_path / "labels.csv"
    csv.write_text("case,cut_no,window_start,window_end\n" + rows)
    path = write_mill(tmp_path / "mill.mat", tool_records(1, [0.0, np.nan, 0.11]))
    with pytest.raises(MillvaeError) as info:
        prepare(make_config(data=str(path), labels=str(csv)))
    assert _one_line(info) == expected
