"""Where diffquant keeps its state: ``DIFFQUANT_HOME`` (default ``./.diffquant``).

Under it: ``mlflow.db`` (MLflow's SQLite backend), ``mlartifacts/`` (run artifacts),
``prefect/`` (Prefect's home for the ephemeral API), ``runs/`` (run output folders) and
``locks/`` (one heartbeat file per live MLflow run, the Prefect start-up lock).
The usual ``MLFLOW_TRACKING_URI`` and ``PREFECT_*`` variables override the defaults.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from diffquant.errors import TrackingError


def diffquant_home() -> Path:
    """Return the diffquant home folder (not created)."""
    return Path(os.environ.get("DIFFQUANT_HOME", ".diffquant")).expanduser().resolve()


def ensure_writable(folder: Path, what: str) -> Path:
    """Create ``folder`` if needed and prove it is writable with a probe file.

    Raises:
        TrackingError: Naming ``what`` and the folder when it cannot be written.
    """
    folder = Path(folder)
    probe = folder / f".write-probe-{uuid.uuid4().hex}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise TrackingError(
            f"{what} {folder} is not writable ({error.strerror or error}); set DIFFQUANT_HOME to a writable folder"
        ) from None
    return folder


def tracking_uri(home: Path) -> str:
    """The MLflow tracking URI: ``MLFLOW_TRACKING_URI`` or SQLite under ``home``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(home) / 'mlflow.db'}"


STALE_RUN_MINUTES = 10.0
"""Default of ``DIFFQUANT_STALE_RUN_MINUTES``: a run whose heartbeat is older than this is stale."""

EPHEMERAL_STARTUP_TIMEOUT_S = 900
"""Default wait for Prefect's ephemeral API to start (Prefect's own 20 s fails on a busy machine)."""


def locks_dir(home: Path) -> Path:
    """``<home>/locks``: run heartbeats (``runs/<run id>.json``) and start-up locks (not created)."""
    return Path(home) / "locks"


def stale_run_minutes() -> float:
    """Minutes without a heartbeat after which a run counts as dead (``DIFFQUANT_STALE_RUN_MINUTES``, default 10).

    Raises:
        TrackingError: If the variable is set to something that is not a positive number.
    """
    raw = os.environ.get("DIFFQUANT_STALE_RUN_MINUTES", "").strip()
    if not raw:
        return STALE_RUN_MINUTES
    try:
        minutes = float(raw)
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        raise TrackingError(f"DIFFQUANT_STALE_RUN_MINUTES={raw!r} is not a positive number of minutes; fix or unset it")
    return minutes


def configure_environment(home: Path) -> None:
    """Set offline/telemetry variables and Prefect's home before prefect or mlflow is imported.

    Prefect's ephemeral API gets a long start-up timeout: its default (20 s) is less than a
    loaded 2-core machine needs to start it and migrate its database.
    """
    os.environ.setdefault("PREFECT_HOME", str(Path(home) / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_STARTUP_TIMEOUT_S))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
