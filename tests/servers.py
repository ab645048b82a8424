"""Real servers for tests: MLflow tracking, Prefect API, PostgreSQL; each on 127.0.0.1, free ports.

Every helper is a context manager that starts the server as a child process, waits until it
answers (bounded), and stops it (terminate, then kill) even when the test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers 200 or ``timeout`` seconds pass.

    Raises:
        RuntimeError: If the server exits or does not answer in time.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def stop(process: subprocess.Popen) -> None:
    """Terminate a process group, kill it after 10 s."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``cmd`` in its own process group, output to ``log``."""
    handle = log.open("w")
    return subprocess.Popen(
        cmd, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
    )


@contextmanager
def mlflow_server(folder: Path, backend_uri: str | None = None) -> Iterator[str]:
    """An MLflow tracking server (SQLite in ``folder`` unless ``backend_uri``); yields its URL."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    backend = backend_uri or f"sqlite:///{folder / 'mlflow.db'}"
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        backend,
        "--artifacts-destination",
        str(folder / "artifacts"),
        "--workers",
        "1",
    ]
    process = start(cmd, folder / "mlflow-server.log", {"MLFLOW_DISABLE_TELEMETRY": "true"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", 90, process)
        yield url
    finally:
        stop(process)


@contextmanager
def prefect_server(folder: Path) -> Iterator[str]:
    """A Prefect API server with its own home in ``folder``; yields its API URL."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        "PREFECT_HOME": str(folder / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_API_URL": "",
        # a run waiting for its deployment's concurrency slot retries every 2 s, not 30 s
        "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
    }
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
    process = start(cmd, folder / "prefect-server.log", env)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(f"{url}/health", 120, process)
        yield url
    finally:
        stop(process)


def pg_bin(name: str) -> str | None:
    """Path of a PostgreSQL server program: on PATH, or in Debian's /usr/lib/postgresql/<v>/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    return str(candidates[0]) if candidates else None


def postgres_available() -> bool:
    """Whether PostgreSQL's server programs (initdb, pg_ctl, psql) and psycopg2 are here."""
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return False
    return all(pg_bin(name) for name in ("initdb", "pg_ctl", "psql"))


def missing_system_package(what: str, package: str) -> None:
    """Skip the calling test: ``what`` (from Debian's ``package``) is not on this machine.

    A new machine is not a failure: ``bash .ci/test`` (the README's test command) installs the
    package with apt-get when it can; where it could not, it exports why in
    ``DIFFQUANT_SYSTEM_PACKAGES_FAILURE`` and the reason joins the skip message, which pytest's
    summary shows with ``-rs``.
    """
    import pytest

    why = os.environ.get("DIFFQUANT_SYSTEM_PACKAGES_FAILURE")
    how = f"could not be installed ({why})" if why else "`bash .ci/test` installs it with apt-get as root"
    pytest.skip(f"{what} is not installed (Debian package {package}); {how}")


def require_chromium() -> str:
    """Path of Debian's ``chromium``; skips the calling test when it is not on PATH."""
    found = shutil.which("chromium")
    if found is None:
        missing_system_package("chromium", "chromium")
    return found


def require_postgres() -> None:
    """Skip the calling test unless PostgreSQL's server programs are here.

    psycopg2 is a dependency of the project itself, so its absence is a broken install, not a new
    machine: that fails.
    """
    import pytest

    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.fail("psycopg2 is missing although the project depends on it: reinstall with pip install -e '.[dev]'")
    if not all(pg_bin(name) for name in ("initdb", "pg_ctl", "psql")):
        missing_system_package("PostgreSQL (initdb, pg_ctl, psql)", "postgresql")


@contextmanager
def postgres_server(folder: Path) -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (run as the current user); yields a SQLAlchemy URI.

    As root, the cluster is created and run as the ``postgres`` user when it exists (initdb refuses
    root); the data folder is then owned by that user.
    """
    import tempfile

    prefix: list[str] = []
    if os.geteuid() == 0:
        # pytest's tmp folders are private to root; the postgres user needs its own folder
        folder = Path(tempfile.mkdtemp(prefix="diffquant-pg-"))
        shutil.chown(folder, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "pgdata"
    port = free_port()
    subprocess.run(
        [*prefix, pg_bin("initdb"), "-D", str(data), "-U", "diffquant", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    log = folder / "postgres.log"
    subprocess.run(
        [
            *prefix,
            pg_bin("pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(log),
            "-o",
            f"-h 127.0.0.1 -p {port} -k {folder}",
            "-w",
            "-t",
            "60",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        subprocess.run(
            [
                pg_bin("psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "diffquant",
                "-d",
                "postgres",
                "-c",
                "CREATE DATABASE mlflow",
            ],
            check=True,
            capture_output=True,
        )
        yield f"postgresql+psycopg2://diffquant@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(
            [*prefix, pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True, check=False
        )
        if prefix:
            shutil.rmtree(folder, ignore_errors=True)
