"""No MLflow run left RUNNING by a dead process: one heartbeat file per live run, and a reaper.

While a run is live, ``<DIFFQUANT_HOME>/locks/runs/<run id>.json`` holds its process id, the
process's start time (so a reused pid is not mistaken for it), the host and a heartbeat that a
daemon thread refreshes every :data:`HEARTBEAT_S` seconds. A run is *stale* when its process is
gone on this host, or when its heartbeat is older than ``DIFFQUANT_STALE_RUN_MINUTES`` (default
10). :func:`reap_stale_runs`, called when any diffquant command starts, marks stale runs and their
nested stage runs ``KILLED`` and tags why; a restarted run of the same spec links to the reaped one
(``diffquant.restarted_from``, see :func:`diffquant.registry.tracking.tracked_run`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffquant.registry.home import locks_dir, stale_run_minutes

logger = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
"""Seconds between two heartbeats of a live run."""

KILLED_REASON_TAG = "diffquant.killed_reason"
RESTARTED_FROM_TAG = "diffquant.restarted_from"
RESTARTED_AS_TAG = "diffquant.restarted_as"


def run_locks_dir(home: Path) -> Path:
    """``<home>/locks/runs``: one heartbeat file per live run (not created)."""
    return locks_dir(home) / "runs"


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (None when it does not exist)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its closing one
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int, start: str | None) -> bool:
    """Whether ``pid`` runs and is the process that wrote the heartbeat (same start time)."""
    if Path("/proc").is_dir():
        current = _process_start(pid)
        return current is not None and (start is None or current == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


class RunHeartbeat:
    """The heartbeat file of one live run, refreshed by a daemon thread until :meth:`stop`."""

    def __init__(self, path: Path, info: dict[str, Any], interval_s: float = HEARTBEAT_S) -> None:
        """Hold ``info`` (written to ``path`` with a fresh ``heartbeat_at`` on every beat)."""
        self.path = Path(path)
        self.info = info
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def start(
        cls, home: Path, run_id: str, experiment_id: str, tracking_uri: str, interval_s: float = HEARTBEAT_S
    ) -> RunHeartbeat:
        """Write the first heartbeat of ``run_id`` and start the thread that refreshes it.

        Raises:
            OSError: If the lock folder cannot be written (the caller decides whether that is fatal).
        """
        folder = run_locks_dir(home)
        folder.mkdir(parents=True, exist_ok=True)
        now = time.time()
        info = {
            "run_id": run_id,
            "experiment_id": experiment_id,
            "tracking_uri": tracking_uri,
            "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()),
            "host": socket.gethostname(),
            "started_at": now,
            "heartbeat_at": now,
        }
        beat = cls(folder / f"{run_id}.json", info, interval_s)
        _write_atomic(beat.path, info)
        beat._thread = threading.Thread(target=beat._loop, name=f"diffquant-heartbeat-{run_id[:8]}", daemon=True)
        beat._thread.start()
        return beat

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.info["heartbeat_at"] = time.time()
            try:
                _write_atomic(self.path, self.info)
            except OSError as error:  # a full or read-only disk: the run goes on, the reaper judges by pid
                logger.debug("heartbeat of run %s not written: %s", self.info["run_id"], error)

    def stop(self, remove: bool = True) -> None:
        """Stop the thread and remove the heartbeat file (the run has ended).

        Args:
            remove: False keeps the file, so that the reaper ends a run whose end could not be recorded.
        """
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if not remove:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as error:
            logger.warning("could not remove the heartbeat file %s: %s", self.path, error)


@dataclass(frozen=True)
class ReapedRun:
    """A run found stale and marked KILLED."""

    run_id: str
    experiment_id: str
    reason: str


def stale_reason(info: dict[str, Any], minutes: float, now: float | None = None) -> str | None:
    """Why the run of heartbeat ``info`` is dead, or None while it is live.

    Args:
        info: A heartbeat file's content.
        minutes: Heartbeat age after which a run is stale whatever its process.
        now: The current time (seconds since the epoch); default ``time.time()``.
    """
    now = time.time() if now is None else now
    pid, host = int(info.get("pid", -1)), str(info.get("host", ""))
    if host == socket.gethostname() and not _pid_alive(pid, info.get("pid_start")):
        return f"its process {pid} on {host} is gone (killed, out of memory or crashed)"
    age = now - float(info.get("heartbeat_at", 0.0))
    if age > minutes * 60:
        return f"its process {pid} on {host} sent no heartbeat for {age / 60:.1f} minutes"
    return None


def _kill_run(client: Any, run_id: str, reason: str) -> bool:
    """Mark ``run_id`` and its RUNNING nested runs KILLED with the reason as a tag; False if it had ended."""
    run = client.get_run(run_id)
    children = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'RUNNING'",
    )
    for child in children:
        _kill_run(client, child.info.run_id, f"its parent run {run_id} was killed: {reason}")
    if run.info.status != "RUNNING":
        return False
    from mlflow.entities import RunTag

    tags = [
        RunTag(KILLED_REASON_TAG, reason),
        RunTag("diffquant.reaped_at", str(int(time.time()))),
        RunTag("diffquant.reaped_by", f"{os.getpid()}@{socket.gethostname()}"),
    ]
    client.log_batch(run_id, tags=tags)
    client.set_terminated(run_id, status="KILLED")
    return True


def _claim(path: Path) -> Path | None:
    """Take ``path`` for this process by renaming it (two reapers never handle one file)."""
    claimed = path.with_name(f"{path.name}.reaping-{os.getpid()}")
    try:
        path.rename(claimed)
    except FileNotFoundError:
        return None
    return claimed


def _local_db_unusable(tracking_uri: str) -> bool:
    """True for a SQLite store that is missing, not a file or not an SQLite database (left to the command's check).

    MLflow would retry opening such a store with back-off for minutes before it gives up.
    """
    if not tracking_uri.startswith("sqlite:///"):
        return False
    path = Path(tracking_uri.removeprefix("sqlite:///"))
    try:
        with path.open("rb") as handle:
            return handle.read(16) != b"SQLite format 3\x00"
    except OSError:
        return True


def _orphans(client: Any, home: Path, minutes: float, live: set[str]) -> list[tuple[str, str]]:
    """Parent runs of diffquant left RUNNING without a heartbeat file for longer than ``minutes``."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    runs = client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'", max_results=1000)
    cutoff = (time.time() - minutes * 60) * 1000
    found = []
    for run in runs:
        tags = run.data.tags
        if "mlflow.parentRunId" in tags or "diffquant.version" not in tags or run.info.run_id in live:
            continue
        if run.info.start_time < cutoff and not (run_locks_dir(home) / f"{run.info.run_id}.json").exists():
            found.append((run.info.run_id, f"it has been RUNNING without a heartbeat for over {minutes:g} minutes"))
    return found


def reap_stale_runs(tracking_uri: str, home: Path, client: Any = None) -> list[ReapedRun]:
    """Mark every stale run of ``tracking_uri`` (and its nested runs) KILLED; return them.

    A run is stale when its heartbeat file says its process is gone or silent (see
    :func:`stale_reason`). With the home's own SQLite store, parent runs left RUNNING without a
    heartbeat file (a crash before the file was written, an older diffquant) are also reaped once
    they are older than the stale limit. Errors of the tracking store are logged, not raised:
    reaping never stops a command.
    """
    folder = run_locks_dir(home)
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    local_store = tracking_uri == f"sqlite:///{Path(home) / 'mlflow.db'}"
    minutes = stale_run_minutes()  # a bad setting is refused even when there is nothing to reap
    if _local_db_unusable(tracking_uri) or (not files and not local_store):
        return []
    stale: list[tuple[Path, str, str]] = []
    live: set[str] = set()
    for path in files:
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now, or unreadable: judged on the next start
        if info.get("tracking_uri") != tracking_uri:
            continue
        reason = stale_reason(info, minutes)
        if reason is None:
            live.add(str(info.get("run_id")))
        else:
            stale.append((path, str(info["run_id"]), reason))
    if not stale and not local_store:
        return []
    if client is None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
    reaped: list[ReapedRun] = []
    for path, run_id, reason in stale:
        claimed = _claim(path)
        if claimed is not None:
            _reap_one(client, run_id, reason, claimed, path, reaped)
    if local_store:
        try:
            for run_id, reason in _orphans(client, home, minutes, live):
                if _kill_run(client, run_id, reason):
                    reaped.append(ReapedRun(run_id, client.get_run(run_id).info.experiment_id, reason))
        except Exception as error:  # the store is locked or damaged: the command's own checks say so
            logger.debug("could not look for MLflow runs left RUNNING: %s", _first_line(error))
    for run in reaped:
        logger.info("MLflow run %s marked KILLED: %s", run.run_id, run.reason)
    return reaped


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


def _reap_one(client: Any, run_id: str, reason: str, claimed: Path, path: Path, reaped: list[ReapedRun]) -> None:
    """Kill one stale run; its heartbeat file goes unless the store failed (then it is put back for later)."""
    try:
        if _kill_run(client, run_id, reason):
            reaped.append(ReapedRun(run_id, client.get_run(run_id).info.experiment_id, reason))
    except Exception as error:
        if "RESOURCE_DOES_NOT_EXIST" in str(getattr(error, "error_code", "")) or "not found" in str(error):
            claimed.unlink(missing_ok=True)  # the run was deleted: nothing to mark
            return
        logger.warning("could not mark the stale MLflow run %s KILLED: %s", run_id, _first_line(error))
        claimed.replace(path)
        return
    claimed.unlink(missing_ok=True)


def restarted_from(client: Any, experiment_id: str, spec_hash: str, new_run_id: str) -> str | None:
    """The latest KILLED run of ``spec_hash`` in the experiment not yet restarted, or None.

    Only runs diffquant marked KILLED (reaped or interrupted) count, and only parent runs.
    """
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.spec_hash = '{spec_hash}' and attributes.status = 'KILLED'",
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    for run in runs:
        tags = run.data.tags
        if run.info.run_id == new_run_id or "mlflow.parentRunId" in tags:
            continue
        if KILLED_REASON_TAG in tags and RESTARTED_AS_TAG not in tags:
            return run.info.run_id
    return None
