"""Pipeline fixtures: a temporary Prefect API for the session, an isolated diffquant home per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

SMALL = [
    "sampler.steps=10",
    "calibration.trajectories=8",
    "calibration.size=32",
    "evaluate.samples=40",
    "evaluate.sqnr_inputs=16",
    "export.parity_samples=40",
]


@pytest.fixture(scope="session", autouse=True)
def prefect_api() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """DIFFQUANT_HOME in tmp_path with MLflow on SQLite there; environment restored afterwards."""
    saved = dict(os.environ)
    home = tmp_path / "home"
    monkeypatch.setenv("DIFFQUANT_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield home
    os.environ.clear()
    os.environ.update(saved)


def mlflow_runs(home: Path) -> list:
    """Every run in the home's MLflow database (empty when none was created)."""
    db = home / "mlflow.db"
    if not db.exists():
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments) if experiments else []
