"""Where diffquant keeps its state: ``DIFFQUANT_HOME`` (default ``./.diffquant``).

Under it: ``mlflow.db`` (MLflow's SQLite backend), ``mlartifacts/`` (run artifacts),
``prefect/`` (Prefect's home for the ephemeral API) and ``runs/`` (run output folders).
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


def configure_environment(home: Path) -> None:
    """Set offline/telemetry variables and Prefect's home before prefect or mlflow is imported."""
    os.environ.setdefault("PREFECT_HOME", str(Path(home) / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
