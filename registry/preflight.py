"""Pre-flight checks: fail in the first seconds, before any model is loaded.

A malformed MLflow tracking URI or Prefect API URL (wrong scheme, no host, a port out of range),
an unreachable or non-MLflow tracking server, a Prefect API that does not answer, a corrupt
MLflow SQLite database, or an invalid registered-model name each raise
:class:`~diffquant.errors.TrackingError` with one line.
"""

from __future__ import annotations

import socket
import sqlite3
import struct
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from diffquant.errors import TrackingError
from diffquant.registry.models import check_registered_model_name

TIMEOUT_S = 5.0
# MLflow tracking URI schemes (an SQLAlchemy URI may name a driver: postgresql+psycopg2)
TRACKING_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc")
_SQLITE_MAGIC = b"SQLite format 3\x00"


def url_problem(url: str, schemes: tuple[str, ...], allow_path: bool = False) -> str | None:
    """What is wrong with the shape of ``url`` (None when nothing): scheme, host, port.

    Args:
        url: The URL to check (nothing is contacted).
        schemes: Accepted schemes (the part before any ``+driver``).
        allow_path: Accept a plain path without a scheme (MLflow's file store).

    Returns:
        A short reason, e.g. ``"port 99999 is out of range 1-65535"``, or None.
    """
    if url != url.strip() or any(c.isspace() for c in url):
        return "it contains a space"
    split = urllib.parse.urlsplit(url)
    scheme = split.scheme.lower()
    if not scheme or (len(scheme) == 1 and allow_path):  # a:\ drive letters are paths
        if allow_path and url:
            return None
        return "it has no scheme (expected e.g. http://host:port)"
    if scheme.split("+")[0] not in schemes:
        return f"scheme {split.scheme!r} is not supported (use {', '.join(schemes[:4])}...)"
    if scheme in ("http", "https"):
        if not split.hostname:
            return "it has no host name"
        try:
            port = split.port
        except ValueError:
            port_text = split.netloc.rsplit(":", 1)[-1]
            if port_text.isdigit():
                return f"port {port_text} is out of range 1-65535"
            return f"port {port_text!r} is not a number"
        if port == 0:
            return "port 0 is out of range 1-65535"
    return None


def _answers(url: str, timeout: float) -> tuple[str, int | None] | None:
    """None when ``url`` answers 2xx, else ``(reason, HTTP status or None when unreachable)``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return None if 200 <= response.status < 300 else (f"HTTP {response.status}", response.status)
    except urllib.error.HTTPError as error:
        return f"HTTP {error.code}", error.code
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, ConnectionRefusedError):
            return "connection refused", None
        if isinstance(reason, (TimeoutError, socket.timeout)):
            return f"no answer within {timeout:g} s", None
        if isinstance(reason, socket.gaierror):
            return "host name not found", None
        return str(reason), None


def check_tracking_uri(uri: str) -> None:
    """Require ``uri`` to have the shape of an MLflow tracking URI (nothing is contacted).

    Raises:
        TrackingError: Naming what is wrong (scheme, host, port).
    """
    problem = url_problem(uri, TRACKING_SCHEMES, allow_path=True)
    if problem is not None:
        raise TrackingError(
            f"MLflow tracking URI {uri!r} is malformed: {problem}; "
            "use http(s)://host:port, sqlite:///path or a folder, or unset MLFLOW_TRACKING_URI"
        )


def check_tracking_server(uri: str, timeout: float = TIMEOUT_S) -> None:
    """Check the URI's shape; for an HTTP tracking URI, require ``/health`` to answer.

    Local SQLite/file URIs pass (see :func:`check_tracking_store` for the database itself).

    Raises:
        TrackingError: If the URI is malformed, the server is unreachable within ``timeout``
            seconds, or it answers with an HTTP error (it is not an MLflow server).
    """
    check_tracking_uri(uri)
    if not uri.lower().startswith(("http://", "https://")):
        return
    answer = _answers(f"{uri.rstrip('/')}/health", timeout)
    if answer is None:
        return
    reason, status = answer
    if status is None:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it or unset MLFLOW_TRACKING_URI"
        )
    raise TrackingError(
        f"MLflow tracking server {uri} answers {reason} on /health, so it is not a working MLflow server; "
        "check MLFLOW_TRACKING_URI or unset it"
    )


def _sqlite_problem(path: Path) -> str | None:
    """What makes ``path`` unusable as MLflow's SQLite database (None when it looks sound)."""
    if path.is_dir():
        return "it is a folder, not a database file"
    size = path.stat().st_size
    if size == 0:
        return None  # SQLite treats an empty file as an empty database; MLflow creates its tables
    with path.open("rb") as handle:
        header = handle.read(100)
    if header[: len(_SQLITE_MAGIC)] != _SQLITE_MAGIC:
        if len(header) < len(_SQLITE_MAGIC) and _SQLITE_MAGIC.startswith(header):
            return f"it is truncated ({size} bytes)"
        return "it is not an SQLite database"
    if len(header) < 100:
        return f"it is truncated ({size} bytes)"
    page_size = struct.unpack(">H", header[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    pages, change, valid_for = struct.unpack(">I", header[28:32])[0], header[24:28], header[92:96]
    if pages and change == valid_for and size < pages * page_size:
        return f"it is truncated ({size} of {pages * page_size} bytes)"
    try:
        with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if tables and "alembic_version" not in tables:
                return "it is an SQLite database but not MLflow's"
            if tables:
                db.execute("SELECT version_num FROM alembic_version").fetchall()
    except sqlite3.OperationalError as error:
        if "locked" in str(error):
            return None  # another run is writing: busy, not broken
        return str(error)
    except sqlite3.DatabaseError as error:
        return str(error)
    return None


def check_tracking_store(uri: str) -> None:
    """For an SQLite tracking URI, require an existing database file to be a sound MLflow database.

    Reads the file's header and schema only (cheap); a missing file passes (MLflow creates it).

    Raises:
        TrackingError: If the file is not an SQLite database, is truncated, or is not MLflow's.
    """
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    if not path.exists():
        return
    try:
        problem = _sqlite_problem(path)
    except OSError as error:
        problem = f"it cannot be read ({error.strerror or error})"
    if problem is not None:
        raise TrackingError(
            f"MLflow at {uri} cannot be used: {problem}; move {path} aside or set DIFFQUANT_HOME to another folder"
        )


def check_prefect_api(api_url: str | None, timeout: float = TIMEOUT_S) -> None:
    """When a Prefect API URL is configured, require a well-formed URL whose ``/health`` answers.

    Raises:
        TrackingError: If the URL is malformed or the API does not answer within ``timeout`` seconds.
    """
    if not api_url:
        return
    problem = url_problem(api_url, ("http", "https"))
    if problem is not None:
        raise TrackingError(
            f"Prefect API URL {api_url!r} is malformed: {problem}; use http(s)://host:port/api or unset PREFECT_API_URL"
        )
    answer = _answers(f"{api_url.rstrip('/')}/health", timeout)
    if answer is not None:
        raise TrackingError(
            f"Prefect API {api_url} does not answer ({answer[0]}); start the server or unset PREFECT_API_URL"
        )


def preflight(tracking_uri: str, prefect_api_url: str | None, registered_model: str | None) -> None:
    """Run every check (registry name and URL shapes first: they need no network).

    Args:
        tracking_uri: MLflow tracking URI.
        prefect_api_url: Configured Prefect API URL, or None for the embedded API.
        registered_model: The name versions will be registered under, or None when not registering.

    Raises:
        TrackingError: On the first failing check.
    """
    if registered_model is not None:
        check_registered_model_name(registered_model)
    check_tracking_uri(tracking_uri)
    check_tracking_store(tracking_uri)
    check_tracking_server(tracking_uri)
    check_prefect_api(prefect_api_url)
