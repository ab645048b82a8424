"""Pre-flight checks: fail in the first seconds, before any model is loaded.

An unreachable MLflow tracking server, a Prefect API that does not answer, or an invalid
registered-model name each raise :class:`~diffquant.errors.TrackingError` with one line.
"""

from __future__ import annotations

import urllib.error
import urllib.request

from diffquant.errors import TrackingError
from diffquant.registry.models import check_registered_model_name

TIMEOUT_S = 5.0


def _answers(url: str, timeout: float) -> str | None:
    """None when ``url`` answers 2xx, else a short reason."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return None if 200 <= response.status < 300 else f"HTTP {response.status}"
    except urllib.error.HTTPError as error:
        return f"HTTP {error.code}"
    except (urllib.error.URLError, OSError) as error:
        return str(getattr(error, "reason", error))


def check_tracking_server(uri: str, timeout: float = TIMEOUT_S) -> None:
    """For an HTTP tracking URI, require ``/health`` to answer (local SQLite/file URIs pass).

    Raises:
        TrackingError: If the server does not answer within ``timeout`` seconds.
    """
    if not uri.startswith(("http://", "https://")):
        return
    reason = _answers(f"{uri.rstrip('/')}/health", timeout)
    if reason is not None:
        raise TrackingError(
            f"MLflow tracking server {uri} does not answer ({reason}); start it or unset MLFLOW_TRACKING_URI"
        )


def check_prefect_api(api_url: str | None, timeout: float = TIMEOUT_S) -> None:
    """When a Prefect API URL is configured, require its ``/health`` to answer.

    Raises:
        TrackingError: If the API does not answer within ``timeout`` seconds.
    """
    if not api_url:
        return
    reason = _answers(f"{api_url.rstrip('/')}/health", timeout)
    if reason is not None:
        raise TrackingError(
            f"Prefect API {api_url} does not answer ({reason}); start the server or unset PREFECT_API_URL"
        )


def preflight(tracking_uri: str, prefect_api_url: str | None, registered_model: str | None) -> None:
    """Run every check (registry name first: it needs no network).

    Args:
        tracking_uri: MLflow tracking URI.
        prefect_api_url: Configured Prefect API URL, or None for the embedded API.
        registered_model: The name versions will be registered under, or None when not registering.

    Raises:
        TrackingError: On the first failing check.
    """
    if registered_model is not None:
        check_registered_model_name(registered_model)
    check_tracking_server(tracking_uri)
    check_prefect_api(prefect_api_url)
