"""MLflow tracking with an explicit client and run id (thread-safe, unlike the fluent API).

One experiment per source model; one parent run per flow run; one nested run per stage.
Runs that end with an exception are marked FAILED, runs interrupted (Ctrl-C, SIGTERM) KILLED, and
runs whose process dies without a word (SIGKILL, out of memory, machine loss) are marked KILLED
by the next diffquant command through their heartbeat file (:mod:`diffquant.registry.liveness`).
"""

from __future__ import annotations

import logging
import math
import signal
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
from diffquant.registry.home import diffquant_home
from diffquant.registry.liveness import (
    KILLED_REASON_TAG,
    RESTARTED_AS_TAG,
    RESTARTED_FROM_TAG,
    RunHeartbeat,
    reap_stale_runs,
    restarted_from,
)

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


@contextmanager
def _store_lock(tracking_uri: str) -> Iterator[None]:
    """For a SQLite store, one process at a time creates (migrates) it and its experiments.

    Two commands started together on a fresh home would otherwise both migrate the new database,
    or both create the experiment, and one of them would fail.
    """
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    lock = Path(tracking_uri.removeprefix("sqlite:///")).parent / "locks" / "mlflow-db.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _experiment_id(client: MlflowClient, experiment: str, artifact_root: Path | None) -> str:
    """The id of ``experiment``, created when missing (another process may create it at the same time)."""
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    location = (Path(artifact_root) / experiment).as_uri() if artifact_root else None
    try:
        return client.create_experiment(experiment, artifact_location=location)
    except Exception:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found.experiment_id


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop (SIGINT, SIGTERM): runs it holds end KILLED, not FAILED.

    Creating one records the signal process-wide (:func:`interrupted_by`): libraries between the
    signal handler and :func:`tracked_run` (Prefect's engines) may turn it into another exception.
    """

    def __init__(self, signal_name: str = "SIGINT") -> None:
        """Remember which signal stopped the process."""
        super().__init__(signal_name)
        self.signal_name = signal_name
        note_interrupt(signal_name)


_INTERRUPTED_BY: str | None = None


def note_interrupt(signal_name: str) -> None:
    """Record that ``signal_name`` asked this process to stop.

    A signal handler calls it before anything can raise: Prefect's SIGTERM handler raises its own
    ``TerminationSignal``, which Prefect's engine can turn into another error (seen: ``ValueError:
    Task run is not set`` when the signal lands while a task run starts); the record lets the CLI
    and :func:`tracked_run` still treat that error as the interrupt.
    """
    global _INTERRUPTED_BY
    _INTERRUPTED_BY = signal_name


def interrupted_by() -> str | None:
    """The signal that interrupted this process (an :class:`Interrupted` was raised), or None."""
    return _INTERRUPTED_BY


_INTERRUPT_HANDLED = False


def interrupt_handled() -> bool:
    """Whether a run or stage has already ended KILLED for an interrupt in this process.

    Until then the CLI delivers an interrupt again (Python drops an exception a signal handler
    raises inside a garbage-collection callback; see ``diffquant.flows.cli``).
    """
    return _INTERRUPT_HANDLED


def clear_interrupted() -> None:
    """Forget an earlier interrupt (a new command starts in this process)."""
    global _INTERRUPTED_BY, _INTERRUPT_HANDLED
    _INTERRUPTED_BY = None
    _INTERRUPT_HANDLED = False


class RunTracker:
    """Logs params, metrics and artifacts of one MLflow run by id."""

    def __init__(self, client: MlflowClient, run_id: str, heartbeat: RunHeartbeat | None = None) -> None:
        """Wrap an existing run (``heartbeat``: its liveness file, removed when the run ends)."""
        self.client = client
        self.run_id = run_id
        self.heartbeat = heartbeat

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
            with _store_lock(tracking_uri):
                client = MlflowClient(tracking_uri=tracking_uri)
                experiment_id = _experiment_id(client, experiment, artifact_root)
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

    def finish(self, status: str = "FINISHED", reason: str | None = None) -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED), then remove its heartbeat file.

        Args:
            status: The MLflow run status.
            reason: Why it was killed, stored as the ``diffquant.killed_reason`` tag (KILLED only).
        """
        if reason is not None:
            try:
                self.set_tags({KILLED_REASON_TAG: reason})
            except Exception as error:  # the status matters more than the tag
                logger.warning("could not tag MLflow run %s: %s", self.run_id, error)
        beat, self.heartbeat = self.heartbeat, None
        try:
            self.client.set_terminated(self.run_id, status=status)
        except BaseException:
            if beat is not None:
                beat.stop(remove=False)  # the file stays: the next command's reaper ends the run
            raise
        if beat is not None:
            beat.stop()

    def beat(self, home: Path) -> None:
        """Start this run's heartbeat file under ``home`` (see :mod:`diffquant.registry.liveness`).

        Raises:
            TrackingError: If the lock folder cannot be written.
        """
        run = self.client.get_run(self.run_id)
        try:
            self.heartbeat = RunHeartbeat.start(home, self.run_id, run.info.experiment_id, self.client.tracking_uri)
        except OSError as error:
            raise TrackingError(
                f"the run lock folder under {home} cannot be written ({error.strerror or error}); "
                "free space or set DIFFQUANT_HOME to a writable folder"
            ) from None

    @contextmanager
    def stage(self, name: str) -> Iterator[RunTracker]:
        """A nested run for one stage, with its wall time logged as ``seconds``; FAILED on error."""
        child = self._child(name)
        start = time.perf_counter()
        try:
            yield child
        except BaseException as error:
            status, reason = _end_status(error)
            try:
                child.log_metrics({"seconds": time.perf_counter() - start})
                child.finish(status, reason)
            except Exception:
                logger.exception("could not mark MLflow stage run %s as %s", child.run_id, status)
            raise
        child.log_metrics({"seconds": time.perf_counter() - start})
        child.finish()

    def _child(self, name: str) -> RunTracker:
        parent = self.client.get_run(self.run_id)
        tags = {"mlflow.parentRunId": self.run_id, "stage": name}
        run = self.client.create_run(parent.info.experiment_id, tags=tags, run_name=name)
        return RunTracker(self.client, run.info.run_id)


def _end_status(error: BaseException) -> tuple[str, str | None]:
    """KILLED (with the reason) for an interrupt, FAILED for any other exception."""
    name = _signal_name(error)
    if name:
        global _INTERRUPT_HANDLED
        _INTERRUPT_HANDLED = True
    return ("KILLED", f"interrupted by {name}") if name else ("FAILED", None)


def _signal_name(error: BaseException) -> str | None:
    """The signal behind ``error``: an :class:`Interrupted`, a KeyboardInterrupt, Prefect's TerminationSignal."""
    if isinstance(error, Interrupted):
        return error.signal_name
    if _INTERRUPTED_BY is not None:
        return _INTERRUPTED_BY
    if isinstance(error, KeyboardInterrupt):
        return "SIGINT"
    number = getattr(error, "signal", None)  # prefect.exceptions.TerminationSignal (registry/ never imports prefect)
    if type(error).__name__ == "TerminationSignal" and isinstance(number, int):
        try:
            return signal.Signals(number).name
        except ValueError:
            return f"signal {number}"
    return None


def _link_restart(tracker: RunTracker, spec_hash: str | None) -> None:
    """Tag ``tracker``'s run as the restart of the latest KILLED run of the same spec (if any)."""
    if not spec_hash:
        return
    try:
        run = tracker.client.get_run(tracker.run_id)
        previous = restarted_from(tracker.client, run.info.experiment_id, spec_hash, tracker.run_id)
        if previous is not None:
            tracker.set_tags({RESTARTED_FROM_TAG: previous})
            tracker.client.set_tag(previous, RESTARTED_AS_TAG, tracker.run_id)
            logger.info("run %s restarts the killed run %s", tracker.run_id, previous)
    except Exception as error:
        logger.warning("could not link run %s to the killed run it restarts: %s", tracker.run_id, error)


@contextmanager
def tracked_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    artifact_root: Path | None = None,
    tags: dict[str, str] | None = None,
    home: Path | None = None,
) -> Iterator[RunTracker]:
    """Start a run, yield its tracker, and end it FINISHED, FAILED if the body raises, KILLED if interrupted.

    First marks the store's stale runs KILLED (their processes died, see
    :func:`~diffquant.registry.liveness.reap_stale_runs`); the new run carries a heartbeat file
    under ``<home>/locks/runs`` while it is live, and ``diffquant.restarted_from=<run id>`` when it
    runs the spec (``spec_hash`` tag) of a run that was killed.

    Args:
        tracking_uri: MLflow tracking URI.
        experiment: Experiment name (created when missing).
        run_name: Name of the new run.
        artifact_root: Artifact root of a new experiment.
        tags: Tags of the new run.
        home: The diffquant home holding the heartbeat files (default ``DIFFQUANT_HOME``).
    """
    home = diffquant_home() if home is None else Path(home)
    for dead in reap_stale_runs(tracking_uri, home):
        logger.warning("MLflow run %s marked KILLED: %s", dead.run_id, dead.reason)
    tracker = RunTracker.start(tracking_uri, experiment, run_name, artifact_root, tags)
    try:
        tracker.beat(home)
        _link_restart(tracker, (tags or {}).get("spec_hash"))
        yield tracker
    except BaseException as error:
        status, reason = _end_status(error)
        try:
            tracker.finish(status, reason)
        except Exception:
            logger.exception("could not mark MLflow run %s as %s", tracker.run_id, status)
        raise
    tracker.finish()
