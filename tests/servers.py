"""Throw-away servers for tests: a PostgreSQL cluster, an `mlflow server` backed by it, and a
plain HTTP file server standing in for the download sites.

Import the fixtures into a test module (`from .servers import mlflow_server, postgres_uri`) and
`FileServer` where a test needs a download site. All bind to 127.0.0.1 on free ports; the first two
live in their own temporary folder and are always stopped (whole process group) at teardown.
Without PostgreSQL server binaries the tests are skipped, except under CI (`CI` set), where a
missing install is a failure: `.ci/run` installs them.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_INSTALL_HINT = "apt-get install -y postgresql-15"
PG_USER_FALLBACK = "millvae-pg"
DB_NAME = "mlflow"
START_TIMEOUT_S = 180.0


def isolate_downloads(tmp_path: Path, monkeypatch, keep_nasa_url: bool = False) -> Path:
    """A tmp cache folder and a clean cwd, downloads allowed (loopback only), and none of the
    caller's millvae or proxy settings; returns the cache folder."""
    names = ["MILLVAE_DATA", "MILLVAE_LABELS_URL", "MILLVAE_OFFLINE", "XDG_CACHE_HOME"]
    names += [] if keep_nasa_url else ["MILLVAE_NASA_URL"]
    names += ["http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"]
    for var in names:
        monkeypatch.delenv(var, raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("MILLVAE_CACHE", str(cache))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return cache


@contextlib.contextmanager
def serving_folder(tmp_path: Path) -> Iterator[FileServer]:
    """A loopback HTTP server of the new folder tmp_path/served, closed afterwards."""
    root = tmp_path / "served"
    root.mkdir()
    srv = FileServer(root)
    try:
        yield srv
    finally:
        srv.close()


@contextlib.contextmanager
def serving_model(model_uri: str, cwd: Path, env: dict[str, str]) -> Iterator[tuple[str, int]]:
    """`mlflow models serve` of `model_uri` on a free loopback port, up once /ping answers:
    (base URL, process group id); the whole group (uvicorn and its workers) ended afterwards."""
    port = free_port()
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    log_path = cwd / "serve.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the model server did not answer /ping"
                time.sleep(0.5)
        yield base, server.pid
    finally:
        _stop_group(server, signal.SIGTERM, 30)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FileServer:
    """A ThreadingHTTPServer serving a folder on 127.0.0.1, recording the paths it is asked for."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):
                outer.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):  # keep pytest output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def add(self, name: str, data: bytes) -> str:
        """Serve `data` as `name`; return its URL."""
        (self.root / name).write_bytes(data)
        return f"{self.url}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _missing(reason: str) -> None:
    # Under CI the binaries are installed by .ci/run; skipping there would hide the test for good.
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must install them: {PG_INSTALL_HINT})")
    pytest.skip(f"{reason}; install them with `{PG_INSTALL_HINT}`")


def pg_bin_dir() -> Path | None:
    """Folder holding `initdb` and `postgres`: $MILLVAE_PG_BIN, Debian's 15, any other, or PATH."""
    candidates = []
    if os.environ.get("MILLVAE_PG_BIN"):
        candidates.append(Path(os.environ["MILLVAE_PG_BIN"]))
    candidates.append(Path("/usr/lib/postgresql/15/bin"))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for d in candidates:
        if (d / "initdb").is_file() and (d / "postgres").is_file():
            return d
    return None


def _server_user() -> pwd.struct_passwd | None:
    """The unprivileged account PostgreSQL runs as when we are root (it refuses to run as root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", PG_USER_FALLBACK):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    subprocess.run(
        [
            "useradd",
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            PG_USER_FALLBACK,
        ],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(PG_USER_FALLBACK)


def _as_user(user: pwd.struct_passwd | None) -> dict:
    """Popen keyword arguments that drop root to `user` (groups included)."""
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def _stop_group(proc: subprocess.Popen, sig: int, grace_s: float) -> None:
    """Signal the process group of `proc` (its leader), escalate to SIGKILL after `grace_s`."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    # workers of the group may outlive their leader
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@contextlib.contextmanager
def running_postgres(base: Path) -> Iterator[str]:
    """Start a PostgreSQL cluster under `base`; yield a SQLAlchemy URI of a fresh database."""
    bindir = pg_bin_dir()
    if bindir is None:
        _missing("PostgreSQL server binaries (initdb, postgres) not found")
    user = _server_user()
    if user is not None:
        # the server process must own its data dir and reach it (pytest's tmp root is 0700 root)
        os.chown(base, user.pw_uid, user.pw_gid)
    data, log = base / "data", base / "postgres.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    initdb = subprocess.run(
        [
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ],
        capture_output=True,
        text=True,
        cwd=base,
        env=env,
        timeout=120,
        **_as_user(user),
    )
    if initdb.returncode != 0:
        pytest.fail(f"initdb failed: {(initdb.stderr or initdb.stdout)[-2000:]}")
    port = free_port()
    with open(log, "w") as logf:
        if user is not None:
            os.chown(log, user.pw_uid, user.pw_gid)
        proc = subprocess.Popen(
            [
                str(bindir / "postgres"),
                "-D",
                str(data),
                "-p",
                str(port),
                "-h",
                "127.0.0.1",
                "-k",
                str(base),
                # a scratch database: durability only costs time here
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=base,
            env=env,
            start_new_session=True,
            **_as_user(user),
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"postgres exited with {proc.returncode}: {_tail(log)}")
            ready = subprocess.run(
                [str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"],
                capture_output=True,
                env=env,
            )
            if ready.returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"postgres not ready after {START_TIMEOUT_S:.0f} s: {_tail(log)}")
            time.sleep(0.2)
        made = subprocess.run(
            [
                str(bindir / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "postgres",
                DB_NAME,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        if made.returncode != 0:
            pytest.fail(f"createdb failed: {made.stderr[-2000:]}")
        yield f"postgresql://postgres@127.0.0.1:{port}/{DB_NAME}"
    finally:
        # SIGINT is PostgreSQL's "fast" shutdown: backends end, no waiting for clients
        _stop_group(proc, signal.SIGINT, grace_s=30)


@contextlib.contextmanager
def running_mlflow_server(backend_uri: str, base: Path) -> Iterator[str]:
    """Start `mlflow server` on `backend_uri` with artifacts proxied into `base`; yield its URL."""
    try:
        # SQLAlchemy 2.1 maps postgresql:// to psycopg 3: the server's PostgreSQL driver
        import psycopg  # noqa: F401
    except ImportError:
        pytest.fail("psycopg is not installed: the test extra must include psycopg[binary]")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = base / "mlflow-server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_uri,
        # clients send artifacts over HTTP (mlflow-artifacts:/), as remote workers would
        "--serve-artifacts", "--artifacts-destination", str(base / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port),
        "--workers", "2",
    ]  # fmt: skip
    with open(log, "w") as logf:
        proc = subprocess.Popen(
            cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=base, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}: {_tail(log)}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                pytest.fail(
                    f"mlflow server not healthy after {START_TIMEOUT_S:.0f} s: {_tail(log)}"
                )
            time.sleep(0.5)
        yield url
    finally:
        _stop_group(proc, signal.SIGTERM, grace_s=15)


@pytest.fixture(scope="session")
def postgres_uri() -> Iterator[str]:
    """`postgresql://postgres@127.0.0.1:PORT/mlflow` of a throw-away PostgreSQL cluster."""
    # /tmp rather than pytest's tmp root: the unprivileged server user must reach it, and the
    # unix socket path must stay short
    base = Path(tempfile.mkdtemp(prefix="millvae-pg-"))
    try:
        with running_postgres(base) as uri:
            yield uri
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(postgres_uri: str, tmp_path_factory) -> Iterator[str]:
    """URL (`http://127.0.0.1:PORT`) of an `mlflow server` storing runs in `postgres_uri`."""
    base = tmp_path_factory.mktemp("mlflow-server")
    with running_mlflow_server(postgres_uri, base) as url:
        yield url
