"""MLflow tracking with an explicit client and run id (thread-safe, unlike the fluent API).

One experiment per source model; one parent run per flow run; one nested run per stage.
Runs that end with an exception are marked FAILED, never left RUNNING.
"""

from __future__ import annotations

import logging
import math
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

import diffquant
from diffquant.errors import TrackingError

logger = logging.getLogger(__name__)

_MAX_PARAM = 6000


def git_sha() -> str:
    """The current git commit, or ``unknown`` outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


class RunTracker:
    """Logs params, metrics and artifacts of one MLflow run by id."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        """Wrap an existing run."""
        self.client = client
        self.run_id = run_id

    @classmethod
    def start(
        cls,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        artifact_root: Path | None = None,
        tags: dict[str, str] | None = None,
    ) -> RunTracker:
        """Create (or reuse) ``experiment`` and start a run in it.

        Raises:
            TrackingError: If the tracking backend cannot be reached or written.
        """
        try:
            client = MlflowClient(tracking_uri=tracking_uri)
            found = client.get_experiment_by_name(experiment)
            if found is None:
                location = (Path(artifact_root) / experiment).as_uri() if artifact_root else None
                experiment_id = client.create_experiment(experiment, artifact_location=location)
            else:
                experiment_id = found.experiment_id
            all_tags = {"diffquant.version": diffquant.__version__, "git_sha": git_sha(), **(tags or {})}
            run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
        except Exception as error:
            raise TrackingError(f"MLflow at {tracking_uri} cannot be used: {str(error).splitlines()[0]}") from None
        return cls(client, run.info.run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params (values stringified and truncated to MLflow's limit)."""
        items = [Param(k, str(v)[:_MAX_PARAM]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Log finite metrics (MLflow cannot store inf; those are logged as tags instead)."""
        now = int(time.time() * 1000)
        finite = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]
        infinite = [RunTag(f"metric.{k}", str(v)) for k, v in metrics.items() if not math.isfinite(float(v))]
        self.client.log_batch(self.run_id, metrics=finite, tags=infinite)

    def log_series(self, points: list[tuple[int, dict[str, float]]]) -> None:
        """Log metrics of several steps at once (``[(step, {name: value})]``), in batches."""
        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), now, step) for step, values in points for k, v in values.items() if math.isfinite(v)
        ]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set run tags."""
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file or folder under ``artifact_path``."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED)."""
        self.client.set_terminated(self.run_id, status=status)

    @contextmanager
    def stage(self, name: str) -> Iterator[RunTracker]:
        """A nested run for one stage, with its wall time logged as ``seconds``; FAILED on error."""
        child = self._child(name)
        start = time.perf_counter()
        try:
            yield child
        except BaseException:
            child.log_metrics({"seconds": time.perf_counter() - start})
            child.finish("FAILED")
            raise
        child.log_metrics({"seconds": time.perf_counter() - start})
        child.finish()

    def _child(self, name: str) -> RunTracker:
        parent = self.client.get_run(self.run_id)
        tags = {"mlflow.parentRunId": self.run_id, "stage": name}
        run = self.client.create_run(parent.info.experiment_id, tags=tags, run_name=name)
        return RunTracker(self.client, run.info.run_id)


@contextmanager
def tracked_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    artifact_root: Path | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[RunTracker]:
    """Start a run, yield its tracker, and end it FINISHED, or FAILED if the body raises."""
    tracker = RunTracker.start(tracking_uri, experiment, run_name, artifact_root, tags)
    try:
        yield tracker
    except BaseException:
        try:
            tracker.finish("FAILED")
        except Exception:
            logger.exception("could not mark MLflow run %s as FAILED", tracker.run_id)
        raise
    tracker.finish()
