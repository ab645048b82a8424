"""Faults leave nothing behind: killed runs are reaped, no process outlives its command, full disks say so.

The subprocess tests run the real ``diffquant compress`` (small overrides) against a fresh
``DIFFQUANT_HOME`` with Prefect's ephemeral API, as a user would; the rest call the pieces directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.pipeline.conftest import SMALL, isolated_home, mlflow_runs  # noqa: F401  (isolated_home: fixture)
from tests.pipeline.test_cli import assert_clean_failure

ROOT = Path(__file__).resolve().parents[2]
TINY = [*SMALL, "sampler.steps=4", "calibration.size=16", "evaluate.samples=20", "export.parity_samples=0"]


def start_compress(home: Path, out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``diffquant compress`` with the TINY overrides in a subprocess of its own session."""
    args = [sys.executable, "-m", "diffquant.flows.cli", "compress", "--out", str(out)]
    for item in [*TINY, *extra]:
        args += ["--set", item]
    full_env = {**os.environ, "DIFFQUANT_HOME": str(home), "COLUMNS": "250", **(env or {})}
    for key in ("PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI"):
        full_env.pop(key, None)
    return subprocess.Popen(
        args,
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def processes_of(home: Path) -> list[int]:
    """Pids of every process whose environment or command line names ``home``."""
    needle = str(home).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "environ").read_bytes() + (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in blob:
            found.append(int(entry.name))
    return found


def kill_all(folder: Path) -> None:
    """SIGKILL every process that :func:`processes_of` finds for ``folder``."""
    for pid in processes_of(folder):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def reaper(tmp_path: Path) -> Iterator[list[Path]]:
    """Homes registered here have every process left behind killed at teardown (the test failed)."""
    homes: list[Path] = []
    yield homes
    for home in homes:
        kill_all(home)


def db_runs(home: Path) -> list[tuple[str, str, str | None, str | None]]:
    """(run id, status, stage tag, parent run id) of every run, read straight from MLflow's SQLite file."""
    db = home / "mlflow.db"
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            rows = conn.execute(
                "SELECT r.run_uuid, r.status, "
                "(SELECT value FROM tags t WHERE t.run_uuid = r.run_uuid AND t.key = 'stage'), "
                "(SELECT value FROM tags t WHERE t.run_uuid = r.run_uuid AND t.key = 'mlflow.parentRunId') "
                "FROM runs r"
            ).fetchall()
    except sqlite3.Error:  # not migrated yet, or busy
        return []
    return rows


def wait_for_stage(proc: subprocess.Popen, home: Path, stage: str, timeout: float = 400) -> str:
    """Wait until the run is inside ``stage`` (its nested run RUNNING); return the parent run id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"compress ended before {stage}: {proc.stderr.read()[-3000:]}")
        for _, status, name, parent in db_runs(home):
            if name == stage and status == "RUNNING" and parent:
                return parent
        time.sleep(0.1)
    pytest.fail(f"compress never reached {stage}")


def one_error_line(result: SimpleNamespace, code: int) -> str:
    """Assert the command failed with ``code``, no traceback and exactly one ``error:`` line, its last; return it.

    (``assert_clean_failure`` also requires every MLflow run FAILED: right for pre-flight errors,
    not for a fault in mid-run, where the stages before it FINISHED.)
    """
    output = result.output.strip()
    lines = output.splitlines()
    assert result.exit_code == code, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert sum(line.startswith("error:") for line in lines) == 1 and lines[-1].startswith("error:"), output[-3000:]
    return lines[-1]


def finished(proc: subprocess.Popen, timeout: float = 600) -> SimpleNamespace:
    """Wait for ``proc``; its result in the shape ``assert_clean_failure`` reads."""
    out, err = proc.communicate(timeout=timeout)
    return SimpleNamespace(exit_code=proc.returncode, output=err + out, stdout=out, stderr=err)


def test_sigkilled_run_is_reaped_and_its_restart_links_to_it(tmp_path, reaper):
    from mlflow.tracking import MlflowClient

    home = tmp_path / "home"
    reaper.append(home)
    first = start_compress(home, tmp_path / "a")
    killed_id = wait_for_stage(first, home, "evaluate_fp")
    first.kill()  # SIGKILL: no handler, no atexit, no finally
    first.wait(timeout=30)
    assert (home / "locks" / "runs" / f"{killed_id}.json").exists()

    second = finished(start_compress(home, tmp_path / "b"))
    assert second.exit_code == 0, second.output[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    old = client.get_run(killed_id)
    assert old.info.status == "KILLED"
    assert "is gone" in old.data.tags["diffquant.killed_reason"]
    assert "RUNNING" not in {status for _, status, _, _ in db_runs(home)}
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    new = client.get_run(summary["run_id"])
    assert new.data.tags["diffquant.restarted_from"] == killed_id
    assert old.data.tags["diffquant.restarted_as"] == summary["run_id"]
    versions = client.search_model_versions("name='digits-unet'")
    assert [v.run_id for v in versions] == [summary["run_id"]]
    assert f"MLflow run {killed_id} marked KILLED" in second.output
    assert not list((home / "locks" / "runs").glob("*.json"))


def test_sigkill_of_the_cli_leaves_no_process(tmp_path, reaper):
    home = tmp_path / "home"
    reaper.append(home)
    proc = start_compress(home, tmp_path / "out", "evaluate.samples=2000")  # a stage that lasts seconds
    wait_for_stage(proc, home, "evaluate_fp")
    children = [pid for pid in processes_of(home) if pid != proc.pid]
    assert children, "the ephemeral Prefect server was not found"
    os.kill(proc.pid, signal.SIGKILL)  # the CLI alone, not its process group
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while processes_of(home) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:200] for pid in processes_of(home)}
    assert not left, left


@pytest.mark.slow  # two full CLI runs at once (minutes on 2 cores); run with -m slow
def test_two_runs_started_together_on_one_fresh_home_both_succeed(tmp_path, reaper):
    from mlflow.tracking import MlflowClient

    home = tmp_path / "home"
    reaper.append(home)
    procs = [start_compress(home, tmp_path / name) for name in ("a", "b")]
    results = [finished(p) for p in procs]
    for result in results:
        assert result.exit_code == 0, result.output[-3000:]
        assert "Timed out" not in result.output
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    versions = sorted(int(v.version) for v in client.search_model_versions("name='digits-unet'"))
    assert versions == [1, 2]
    run_ids = {json.loads((tmp_path / name / "summary.json").read_text())["run_id"] for name in ("a", "b")}
    assert {v.run_id for v in client.search_model_versions("name='digits-unet'")} == run_ids
    assert {status for _, status, _, _ in db_runs(home)} == {"FINISHED"}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 20 MB tmpfs (skipped where it cannot be mounted), unmounted afterwards."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield folder
    finally:
        kill_all(folder)
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path, leave: int) -> Path:
    """Write a ballast file into ``folder`` until only about ``leave`` bytes stay free."""
    ballast = folder / "ballast"
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with ballast.open("wb") as handle:
        handle.write(b"\0" * max(free - leave, 0))
    return ballast


def test_full_disk_says_which_folder_and_leaves_no_partial_files(small_disk, tmp_path):
    home = small_disk / "home"
    proc = start_compress(home, small_disk / "out")
    wait_for_stage(proc, home, "evaluate_fp")
    fill(small_disk, leave=256 * 1024)  # the disk fills up: the export's files no longer fit
    result = finished(proc)
    line = one_error_line(result, 2)
    assert f"no space left on the disk of {small_disk}" in line
    assert not [p for p in small_disk.rglob("*") if ".tmp" in p.name or p.name.startswith(".model.onnx")]
    assert not (small_disk / "out" / "summary.json").exists()
    runs = db_runs(home)
    assert "RUNNING" not in {status for _, status, _, _ in runs}, runs
    assert [status for _, status, _, parent in runs if parent is None] == ["FAILED"]
    assert not list((home / "locks" / "runs").glob("*.json"))


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_interrupted_run_is_marked_killed_with_one_line(tmp_path, reaper, sig, code):
    home = tmp_path / "home"
    reaper.append(home)
    proc = start_compress(home, tmp_path / "out", "evaluate.samples=2000")  # a stage that lasts seconds
    run_id = wait_for_stage(proc, home, "evaluate_fp")
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # Ctrl-C: the whole foreground group (the Prefect server has a session of its own)
    else:
        os.kill(proc.pid, sig)  # a supervisor stopping the command
    result = finished(proc, timeout=120)
    assert one_error_line(result, code).startswith(f"error: interrupted by {sig.name}")
    statuses = {rid: status for rid, status, _, _ in db_runs(home)}
    assert statuses[run_id] == "KILLED" and "RUNNING" not in statuses.values()
    assert not (tmp_path / "out" / "summary.json").exists()
    assert not list((home / "locks" / "runs").glob("*.json"))
    time.sleep(1)
    assert not processes_of(home)


def test_prefect_database_locked_by_another_process_fails_in_one_line(tmp_path, reaper):
    home = tmp_path / "home"
    reaper.append(home)
    (home / "prefect").mkdir(parents=True)
    holder = sqlite3.connect(str(home / "prefect" / "prefect.db"), isolation_level=None)
    holder.execute("CREATE TABLE hold (x)")
    holder.execute("BEGIN EXCLUSIVE")  # another process holds the write lock for the whole run
    try:
        proc = start_compress(home, tmp_path / "out", env={"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "15"})
        result = finished(proc, timeout=300)
    finally:
        holder.rollback()
        holder.close()
    assert_clean_failure(result, f"Prefect's local API under {home / 'prefect'}", home)
    assert str(home / "prefect" / "ephemeral-server.log") in result.output  # where the server's own error is
    time.sleep(1)
    assert not processes_of(home)


def test_read_only_home_fails_in_one_line(tmp_path, isolated_home):  # noqa: F811
    from typer.testing import CliRunner

    from diffquant.flows.cli import app

    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        os.environ["DIFFQUANT_HOME"] = str(folder / "home")
        result = CliRunner().invoke(app, ["compress"])
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
    assert_clean_failure(result, "not writable (Read-only file system)", isolated_home)


def _heartbeat(home: Path, run_id: str, **fields) -> Path:
    path = home / "locks" / "runs" / f"{run_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {
        "run_id": run_id,
        "tracking_uri": f"sqlite:///{home / 'mlflow.db'}",
        "pid": os.getpid(),
        "pid_start": None,
        "host": socket.gethostname(),
        "heartbeat_at": time.time(),
        **fields,
    }
    path.write_text(json.dumps(info))
    return path


def test_silent_heartbeat_on_another_host_is_reaped_by_promote(isolated_home, monkeypatch):  # noqa: F811
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from diffquant.flows.cli import app
    from diffquant.registry.tracking import RunTracker

    uri = f"sqlite:///{isolated_home / 'mlflow.db'}"
    isolated_home.mkdir(parents=True)
    silent = RunTracker.start(uri, "digits-unet", "compress-x", tags={"spec_hash": "x"})
    stage = silent._child("quantize")
    live = RunTracker.start(uri, "digits-unet", "compress-y", tags={"spec_hash": "y"})
    _heartbeat(isolated_home, silent.run_id, host="other-machine", pid=1, heartbeat_at=time.time() - 3 * 60)
    _heartbeat(isolated_home, live.run_id, host="other-machine", pid=1, heartbeat_at=time.time() - 60)
    monkeypatch.setenv("DIFFQUANT_STALE_RUN_MINUTES", "2")
    result = CliRunner().invoke(app, ["promote", "digits-unet", "1"])
    assert result.exit_code == 2 and "no heartbeat for 3.0 minutes" in result.output, result.output
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(silent.run_id).info.status == "KILLED"
    assert client.get_run(stage.run_id).info.status == "KILLED"
    assert client.get_run(live.run_id).info.status == "RUNNING"  # its heartbeat is recent enough


def test_reused_pid_does_not_keep_a_dead_run_alive(isolated_home):  # noqa: F811
    from mlflow.tracking import MlflowClient

    from diffquant.registry.liveness import reap_stale_runs
    from diffquant.registry.tracking import RunTracker

    uri = f"sqlite:///{isolated_home / 'mlflow.db'}"
    isolated_home.mkdir(parents=True)
    run = RunTracker.start(uri, "digits-unet", "compress-z")
    # the pid is alive (this test), but it was started at another time: a different process
    _heartbeat(isolated_home, run.run_id, pid_start="1")
    reaped = reap_stale_runs(uri, isolated_home)
    assert [r.run_id for r in reaped] == [run.run_id]
    assert MlflowClient(tracking_uri=uri).get_run(run.run_id).info.status == "KILLED"
    assert not list((isolated_home / "locks" / "runs").iterdir())


def test_bad_stale_minutes_setting_fails_in_one_line(isolated_home, monkeypatch):  # noqa: F811
    from typer.testing import CliRunner

    from diffquant.flows.cli import app

    isolated_home.mkdir(parents=True)
    (isolated_home / "mlflow.db").touch()
    monkeypatch.setenv("DIFFQUANT_STALE_RUN_MINUTES", "soon")
    result = CliRunner().invoke(app, ["rollback", "digits-unet"])
    assert_clean_failure(result, "DIFFQUANT_STALE_RUN_MINUTES='soon'", isolated_home)


def test_atomic_writes_on_a_full_disk_leave_nothing(small_disk):
    import torch

    from diffquant.errors import DiskFullError
    from diffquant.storage import save_safetensors, write_json

    with pytest.raises(DiskFullError, match=f"no space left on the disk of {small_disk}.*big.safetensors"):
        save_safetensors({"w": torch.zeros(8_000_000)}, small_disk / "big.safetensors")
    with pytest.raises(DiskFullError, match=r"big\.json"):
        write_json({"x": "y" * 30_000_000}, small_disk / "big.json")
    assert not list(small_disk.iterdir())


def test_busy_machine_gets_a_long_prefect_startup_timeout(tmp_path, monkeypatch):
    from diffquant.registry.home import configure_environment

    monkeypatch.delenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", raising=False)
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    configure_environment(tmp_path)
    assert int(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]) >= 600  # Prefect's own: 20 s
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "30")
    configure_environment(tmp_path)
    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "30"  # the user's setting wins


def test_an_interrupt_nothing_acted_on_is_delivered_again(monkeypatch):
    """Python drops a handler's exception raised inside a gc callback; the CLI sends the signal again."""
    import diffquant.flows.cli as cli
    import diffquant.registry.tracking as tracking

    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(cli, "REDELIVER_AFTER_S", 0.05)
    monkeypatch.setattr(cli.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    tracking.clear_interrupted()
    redelivery = cli._Redelivery()
    redelivery.arm(signal.SIGTERM)
    time.sleep(0.5)
    assert sent == [(os.getpid(), signal.SIGTERM)]
    tracking._end_status(tracking.Interrupted("SIGTERM"))  # a run ended KILLED for it
    assert tracking.interrupt_handled()
    redelivery.arm(signal.SIGTERM)
    time.sleep(0.5)
    assert len(sent) == 1
    tracking.clear_interrupted()
    assert not tracking.interrupt_handled()
