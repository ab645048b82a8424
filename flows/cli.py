"""The ``diffquant`` command line (typer + rich).

Exit status: 0 on success, 2 on any user error (one line on stderr, no traceback), 1 on a bug,
130/143 when interrupted by SIGINT/SIGTERM (the MLflow run is marked KILLED).
Prefect's own console logs are silenced unless ``--verbose`` or ``PREFECT_LOGGING_LEVEL`` is set;
every flow and task run is still recorded in Prefect's API (``<DIFFQUANT_HOME>/prefect``).

Nothing a command starts outlives it: Prefect's ephemeral API server is started here, one process
per home at a time (a file lock serializes its database migration), and is killed by the kernel
when this process dies, even by SIGKILL. Every command first marks the MLflow runs of dead
processes KILLED (:func:`diffquant.registry.liveness.reap_stale_runs`).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="diffquant: compress diffusion models (calibrate, quantize, evaluate), tracked in MLflow.",
)
console = Console(stderr=True)

RunnerOption = Annotated[
    str | None, typer.Option(help="Task runner of the parallel stages: default or dask (runtime.runner).")
]
WorkersOption = Annotated[
    int | None, typer.Option(help="Threads (default runner) or Dask worker processes (runtime.workers).", min=1)
]


class _RichHandle:
    def __init__(self, progress: Progress, task: TaskID) -> None:
        self.progress, self.task = progress, task

    def advance(self, amount: int = 1) -> None:
        self.progress.advance(self.task, amount)


class RichReporter:
    """Progress reporter that draws rich bars (installed into diffquant.progress)."""

    def __init__(self, progress: Progress) -> None:
        """Use ``progress`` (already started) for all bars."""
        self.progress = progress

    def start(self, description: str, total: int) -> _RichHandle:
        """Add a bar."""
        return _RichHandle(self.progress, self.progress.add_task(description, total=total))

    def stop(self, handle: _RichHandle) -> None:
        """Complete a bar (it stays visible)."""
        task = self.progress.tasks[[t.id for t in self.progress.tasks].index(handle.task)]
        self.progress.update(handle.task, completed=task.total)


def _setup(verbose: bool, reap: bool = True) -> Path:
    from diffquant.errors import DiffquantError
    from diffquant.registry.home import configure_environment, diffquant_home, ensure_writable

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
        force=True,
    )
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
    try:
        home = ensure_writable(diffquant_home(), "diffquant home (MLflow and Prefect state)")
    except DiffquantError as error:
        _fail(error)
    configure_environment(home)
    if reap:
        _reap_stale_runs(home)
    return home


def _reap_stale_runs(home: Path) -> None:
    """Mark the runs of dead diffquant processes KILLED (one note line per run)."""
    from diffquant.errors import DiffquantError
    from diffquant.registry.home import tracking_uri
    from diffquant.registry.liveness import reap_stale_runs

    try:
        reaped = reap_stale_runs(tracking_uri(home), home)
    except DiffquantError as error:
        _fail(error)
    for run in reaped:
        console.print(f"note: MLflow run {run.run_id} marked KILLED: {run.reason}", highlight=False, soft_wrap=True)


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking the kernel to SIGKILL the child when this thread's process dies (Linux)."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the call took effect
            os._exit(1)

    return hook


_SERVER_STARTS = 4
"""Start attempts of the ephemeral Prefect server (each on a new port) before giving up."""


def _ephemeral_server_class(log: Path) -> type:
    """Prefect's ``SubprocessASGIServer`` whose uvicorn child dies with this process and logs to ``log``."""
    import prefect
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class ChildASGIServer(SubprocessASGIServer):
        starts = 0
        launched: subprocess.Popen[Any] | None = None  # started ahead by _launch_prefect_api

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            if self.launched is not None:  # start() adopts the process launched ahead, once
                process, self.launched = self.launched, None
                return process
            # Prefect restarts a server that exits with 3 (uvicorn's start-up failure, meant for a
            # taken port) without counting the time: a locked database would loop for ever
            self.starts += 1
            if self.starts > _SERVER_STARTS:
                raise RuntimeError(f"ephemeral Prefect API server failed to start {_SERVER_STARTS} times")
            # Prefect 3.x's command and environment, plus the parent-death signal
            args = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent)]
            args += ["--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1"]
            args += ["--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
            env = {
                **os.environ,
                "PREFECT_UI_ENABLED": "0",
                "PREFECT__SERVER_EPHEMERAL": "1",
                "PREFECT__SERVER_FINAL": "1",
                **get_current_settings().to_environment_variables(exclude_unset=True),
            }
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("ab") as out:  # the server's tracebacks stay out of the one-line CLI output
                # a session of its own: Ctrl-C in a terminal signals the whole foreground group, and a
                # server killed with it left the interrupted run retrying Prefect's API for about 70 s
                # before it could exit; the server ends with this process (the parent-death signal)
                return subprocess.Popen(
                    args=args,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent(),
                    start_new_session=True,
                )

    return ChildASGIServer


_EARLY: dict[str, Any] = {}
"""The Prefect API server launched ahead (``server``) and its start-up lock (``lock``), until adopted."""


def _ephemeral_api_wanted() -> bool:
    """Whether this command starts its own Prefect API (no ``PREFECT_API_URL``, none running here)."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return False
    current = SubprocessASGIServer._instances.get(None)
    return current is None or not current.running


def _server_log(home: Path) -> Path:
    return home / "prefect" / "ephemeral-server.log"


def _launch_prefect_api(home: Path) -> None:
    """Launch the ephemeral Prefect API now without waiting for it (see :func:`_early_prefect_api`).

    Does nothing when no server is wanted or another command of this home holds the start-up
    lock (that command's server is then waited for in :func:`_start_prefect_api`, as before).
    """
    if not _ephemeral_api_wanted():
        return
    lock = _api_lock(home, wait=False)
    if lock is None:
        return
    server = _new_server(home)
    server.port = server.find_available_port()
    server.launched = server._run_uvicorn_command()
    _EARLY.update(server=server, lock=lock)


@contextmanager
def _early_prefect_api(home: Path, enabled: bool = True) -> Iterator[None]:
    """Launch Prefect's ephemeral API at the start of the block, so that its start-up overlaps with the command's own.

    The server's imports and database migration (about 5 s warm and 12 s on a new home, measured
    on 2 cores) then run beside the spec checks, MLflow's preflight and the model load instead of
    after them; :func:`_start_prefect_api` adopts the process and waits for its health check.
    A server not adopted by the end of the block (a spec error, a dry run) is killed and its lock
    released.
    """
    if enabled:
        _launch_prefect_api(home)
    try:
        yield
    finally:
        server, lock = _EARLY.pop("server", None), _EARLY.pop("lock", None)
        if server is not None and server.launched is not None:
            server.launched.kill()
            server.launched.wait()
        if lock is not None:
            lock.close()


def _start_prefect_api(home: Path) -> None:
    """Start Prefect's ephemeral API (when no ``PREFECT_API_URL`` is set) before the flow does.

    Started from the main thread so that the parent-death signal fires only when the process
    ends; one command per home starts its server at a time (a file lock), since two servers
    migrating one SQLite database at once fail. A server launched ahead
    (:func:`_early_prefect_api`) is adopted and waited for.
    """
    if not _ephemeral_api_wanted():
        return
    server, lock = _EARLY.pop("server", None), _EARLY.pop("lock", None)
    if lock is None:  # nothing launched ahead
        lock = _api_lock(home, wait=True)
        assert lock is not None  # waited for
        server = _new_server(home)
    try:
        _wait_started(server, home)
    finally:
        lock.close()


def _api_lock(home: Path, wait: bool) -> IO[str] | None:
    """This home's Prefect API start-up lock, held; None if another command holds it and ``wait`` is False."""
    import fcntl

    from diffquant.registry.home import locks_dir

    path = locks_dir(home) / "prefect-api.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if not wait:
            handle.close()
            return None
        console.print(f"waiting for another diffquant command to start its Prefect API in {home} ...")
        fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def _new_server(home: Path) -> Any:
    """A fresh ephemeral server object for ``home`` (the one Prefect's client finds), not started."""
    from prefect.server.api.server import SubprocessASGIServer

    SubprocessASGIServer._instances.pop(None, None)
    return _ephemeral_server_class(_server_log(home))()


def _wait_started(server: Any, home: Path) -> None:
    """``server.start()`` (launch unless launched ahead, then wait for health), with one-line errors."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    from diffquant.errors import TrackingError

    log = _server_log(home)
    try:
        server.start()
    except RuntimeError as error:
        if "ephemeral Prefect API" not in str(error):
            raise
        process = server.server_process
        if process is not None and process.poll() is not None:
            raise TrackingError(
                f"Prefect's local API under {home / 'prefect'} stopped at start-up (exit code "
                f"{process.returncode}, see {log}); is its database locked by another process? "
                "Stop that process, or point PREFECT_API_URL at a running server"
            ) from None
        if process is not None:
            process.kill()
        timeout = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        raise TrackingError(
            f"Prefect's local API under {home / 'prefect'} did not start within {timeout} s (see {log}); "
            "raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or point PREFECT_API_URL at a running server"
        ) from None


def _quiet_prefect(verbose: bool) -> None:
    """Silence Prefect's and MLflow's console loggers (also when imported before the CLI ran)."""
    if verbose:
        return
    for name in list(logging.root.manager.loggerDict):
        if name == "prefect" or name.startswith("prefect."):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _fail(error: BaseException) -> None:
    console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


REDELIVER_AFTER_S = 5.0
"""An interrupt no run has handled yet is delivered again after this many seconds (see :class:`_Redelivery`)."""


class _Redelivery:
    """Deliver SIGINT/SIGTERM again until a run ends KILLED for it.

    A signal handler's exception is raised wherever the main thread is; Python drops one raised
    inside a garbage-collection callback (``Exception ignored in ...``; seen with SQLAlchemy's
    weakref callbacks while Prefect's SIGTERM handler was installed), and the run would go on as if
    nothing happened. Each handler call arms a timer; when it fires before any run or stage has
    ended KILLED (:func:`~diffquant.registry.tracking.interrupt_handled`), the signal is sent again.
    """

    def __init__(self) -> None:
        """No timer armed."""
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def arm(self, signum: int) -> None:
        """(Re)start the timer for ``signum``."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(REDELIVER_AFTER_S, self._fire, (signum,))
            self._timer.daemon = True
            self._timer.start()

    def _fire(self, signum: int) -> None:
        from diffquant.registry.tracking import interrupt_handled

        if not interrupt_handled():
            logging.getLogger(__name__).warning(
                "signal %s was not acted on; delivering it again", signal.Signals(signum).name
            )
            os.kill(os.getpid(), signum)

    def disarm(self) -> None:
        """Cancel the timer."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = None


@contextmanager
def _interruptible() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`~diffquant.registry.tracking.Interrupted` (main thread only).

    Prefect replaces the SIGTERM handler while a flow runs (its handler raises
    ``TerminationSignal``); both handlers arm a :class:`_Redelivery`.
    """
    import prefect.utilities.engine as engine

    from diffquant.registry.tracking import Interrupted, clear_interrupted, note_interrupt

    clear_interrupted()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    redelivery = _Redelivery()

    def handler(signum: int, frame: Any) -> None:
        redelivery.arm(signum)
        raise Interrupted(signal.Signals(signum).name)

    prefect_handler = engine._prefect_sigterm_handler

    def prefect_sigterm(signum: int, *args: object) -> NoReturn:
        redelivery.arm(signum)
        note_interrupt(signal.Signals(signum).name)  # before Prefect's engine can turn it into another error
        prefect_handler(signum, *args)
        raise AssertionError("unreachable: Prefect's handler raises")

    unraisable = sys.unraisablehook

    def quiet_dropped_interrupt(info: Any) -> None:
        # an interrupt raised inside a gc callback: Python drops it (the redelivery follows); say so
        # in the log, not with a traceback on the console
        if isinstance(info.exc_value, KeyboardInterrupt) or type(info.exc_value).__name__ == "TerminationSignal":
            logging.getLogger(__name__).debug("an interrupt raised in %r was dropped by Python", info.object)
            return
        unraisable(info)

    engine._prefect_sigterm_handler = prefect_sigterm  # read by prefect's capture_sigterm at each flow run
    sys.unraisablehook = quiet_dropped_interrupt
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        redelivery.disarm()
        engine._prefect_sigterm_handler = prefect_handler
        sys.unraisablehook = unraisable
        for sig, old in previous.items():
            signal.signal(sig, old)


def _disk_full(error: BaseException, home: Path) -> Any:
    """The one-line error for an out-of-space failure anywhere in ``error``'s chain, or None."""
    from diffquant.storage import disk_full_error, is_disk_full

    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if is_disk_full(cause):
            name = getattr(cause, "filename", None)
            return disk_full_error(Path(name).parent if name else home)
        cause = cause.__cause__ or cause.__context__
    return None


def _run_flow(verbose: bool, flow_fn: Any, **kwargs: Any) -> Any:
    """Run a flow under rich progress bars; a user error prints one line and exits 2.

    A full disk anywhere below prints one line naming the folder (exit 2); SIGINT or SIGTERM
    marks the run KILLED and prints one line (exit 130 or 143).
    """
    from diffquant import progress as progress_mod
    from diffquant.errors import DiffquantError
    from diffquant.registry.home import diffquant_home
    from diffquant.registry.tracking import interrupted_by

    _quiet_prefect(verbose)
    home = diffquant_home()
    with _progress() as bars, _interruptible():
        progress_mod.set_reporter(RichReporter(bars))
        try:
            _start_prefect_api(home)
            return flow_fn(**kwargs)
        except DiffquantError as error:
            bars.stop()
            _fail(error)
        except KeyboardInterrupt as error:
            bars.stop()
            _interrupted(error)
        except Exception as error:
            full = _disk_full(error, home)
            if full is None and interrupted_by() is None:
                raise
            bars.stop()
            if full is None:
                _interrupted(error)
            _fail(full)
        finally:
            progress_mod.set_reporter(None)


def _interrupted(error: BaseException) -> None:
    from diffquant.registry.tracking import interrupted_by

    name = getattr(error, "signal_name", None) or interrupted_by() or "SIGINT"
    console.print(
        f"[bold red]error:[/] interrupted by {name}; the MLflow run is marked KILLED, "
        "rerun the same command to start it again (finished stages are reused)",
        highlight=False,
        soft_wrap=True,
    )
    raise typer.Exit(_EXIT_CODES.get(name, 130))


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _preflight(uri: str, spec: Any) -> None:
    """Registry name (when the spec registers), MLflow server and Prefect API checks, before any model is loaded."""
    from prefect.settings import PREFECT_API_URL

    from diffquant.registry.preflight import preflight

    preflight(uri, PREFECT_API_URL.value(), spec.registered_model_name() if spec.promote.register_model else None)


def _check_out(out: Path | None) -> None:
    """Refuse an ``--out`` that is, or lies under, an existing file (before the run starts)."""
    from diffquant.errors import SpecError

    if out is None:
        return
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                where = "" if folder == out else f" ({folder} is a file)"
                raise SpecError(f"--out {out} is not a folder{where}; give a folder path (created if missing)")
            return


def _check_sampler(spec: Any, model: Any) -> None:
    """Refuse now a device or dtype this machine lacks, a scheduler the model's config cannot build, or guidance without a null condition."""
    from diffquant.errors import spec_section
    from diffquant.placement import resolve
    from diffquant.sampling import check_sampler

    with spec_section("runtime"):
        resolve(spec.runtime.device, spec.runtime.dtype)
    with spec_section("sampler"):
        check_sampler(spec.sampler, model.scheduler_config, model.null_conditions(1))


def _check_clip_model(spec: Any, model: Any) -> None:
    """Refuse now an ``evaluate.clip_model`` that is missing, not a CLIP model, or set for a model without prompts."""
    if spec.evaluate.clip_model is None:
        return
    from diffquant.clip_score import check_clip_model
    from diffquant.errors import spec_section

    with spec_section("evaluate"):
        check_clip_model(spec.evaluate.clip_model, text_model=model.condition == "text")


def _check_latency_table(spec: Any, unet: Any = None) -> None:
    """Read ``allocation.latency_table`` now, so a missing or malformed file fails before the calibration pool.

    With the model's ``unet``, a layer the table has no option for fails now too (one line).
    """
    if spec.allocation is None or spec.allocation.latency_table is None:
        return
    from diffquant.errors import spec_section
    from diffquant.mixed_precision.allocate import latency_gaps, read_latency_table

    with spec_section("allocation"):
        if unet is None:
            read_latency_table(spec.allocation.latency_table)
        else:
            latency_gaps(unet, spec.allocation)  # reads the table too


def _check_allocation(spec: Any, model: Any) -> None:
    """Resolve the allocation's content-layer and pin globs and its content metric now (one line, exit 2)."""
    if spec.allocation is None:
        return
    from diffquant.errors import spec_section
    from diffquant.mixed_precision.allocate import check_allocation

    with spec_section("allocation"):
        check_allocation(model, spec.allocation, classifier_fits=model.digits_compatible)


def _check_quantize(spec: Any, model: Any) -> None:
    """Outlier-method settings the model cannot take (a low-rank rank above a layer's size, bad globs) fail here."""
    from diffquant.errors import spec_section
    from diffquant.ptq import check_outlier_methods

    with spec_section("quantize"):
        check_outlier_methods(model, spec.quantize)


def _check_uniform_plan(spec: Any, model: Any) -> None:
    """Build the uniform plan now and refuse what its device class cannot run (NVFP4 blocks, FP4 on a convolution)."""
    if spec.allocation is not None:
        return
    from diffquant.errors import spec_section
    from diffquant.ptq import check_device_plan, plan_from_spec

    with spec_section("quantize"):
        plan = plan_from_spec(model, spec.quantize, spec.calibration.observer, spec.export.target)
        check_device_plan(model.unet, plan, spec.export.device_class, spec.export.target)


def _check_baselines(spec: Any, model: Any, bits: list[int]) -> None:
    """A sweep's uniform baselines are specs of their own: validate each and check its plan (as compress does)."""
    from diffquant.errors import SpecError
    from diffquant.flows.sweep import baseline_spec
    from diffquant.spec import spec_from_dict

    for b in bits:
        try:
            baseline = spec_from_dict(baseline_spec(spec.to_dict(), b, spec.allocation.activation_bits[0]))
            _check_uniform_plan(baseline, model)
        except SpecError as error:
            raise SpecError(f"--baselines {b}: {error}") from None


def _runtime_overrides(runner: str | None, workers: int | None) -> list[str]:
    """``--runner``/``--workers`` as spec overrides (they win over ``--set``)."""
    items = [f"runtime.runner={runner}"] if runner is not None else []
    return items + ([f"runtime.workers={workers}"] if workers is not None else [])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def _summary_table(summary: dict[str, Any]) -> Table:
    metrics = summary["metrics"]
    table = Table(title=f"diffquant compress: {summary['model']['name']} ({summary['plan']['description']})")
    table.add_column("metric")
    for stage in metrics:
        table.add_column(stage, justify="right")
    for name in sorted({k for stage in metrics.values() for k in stage}):
        table.add_row(name, *(_fmt(metrics[s].get(name)) for s in metrics))
    sizes = summary["sizes"]
    table.add_row("weight bytes", f"{sizes['fp32_bytes']:,}", f"{sizes['packed_bytes']:,}")
    return table


def _dry_run(spec: Any, model: Any, home: Path) -> None:
    """Print the cost estimate of a compress run of ``spec`` (:func:`diffquant.cost.estimate_cost`); write nothing."""
    from diffquant.flows.compress import cached_stages
    from diffquant.tasks.estimate import run_estimate
    from diffquant.tasks.load import load_model_task

    estimate = run_estimate(spec, *cached_stages(spec, home, load_model_task.fn(spec.model)))
    costs = estimate.costs
    where = "GPU memory" if costs.device.startswith("cuda") else "RSS"
    table = Table(title=f"diffquant compress --dry-run: {model.name} on {costs.device}, {costs.dtype}")
    for column in ("stage", "evaluations", "calls", "seconds", f"peak {where}", "note"):
        # every column but the note keeps its cells whole on an 80-column terminal (the note wraps)
        table.add_column(column, justify="left" if column in ("stage", "note") else "right", no_wrap=column != "note")
    for stage in estimate.stages:
        table.add_row(
            stage.stage,
            f"{stage.evaluations:,}",
            f"{stage.calls:,}",
            f"{stage.seconds:.1f}",
            f"{stage.peak_bytes / 2**20:,.0f} MB",
            stage.note,
        )
    table.add_row("total", f"{estimate.evaluations:,}", "", f"{estimate.seconds:.1f}", "", "")
    console.print(table)
    for kind, cost in costs.kinds.items():
        console.print(
            f"{kind} forward: {cost.overhead_s * 1000:.2f} ms per call + {cost.per_input_s * 1000:.3f} ms per input "
            f"(timed at batches {cost.timed_batches[0]} and {cost.timed_batches[1]}); "
            f"{cost.activation_bytes_per_input / 2**20:.2f} MB of activations per input",
            highlight=False,
            soft_wrap=True,
        )
    console.print(
        "Evaluations: denoiser inputs; calls: forward calls; peak GPU memory is torch's CUDA allocations, "
        "RSS the process's. "
        f"Not estimated: start-up, MLflow logging, ONNX tracing{''.join(f'; {n}' for n in costs.notes)}. "
        f"Measured in {costs.measure_s:.1f} s. Dry run: no run was written.",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def compress(
    config: Annotated[
        Path | None, typer.Argument(help="YAML spec (configs/*.yaml); default: W8A8 on digits-unet.")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a spec key: section.key=value (repeatable).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default: <DIFFQUANT_HOME>/runs/<time>-<spec hash>).")
    ] = None,
    runner: RunnerOption = None,
    workers: WorkersOption = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Validate everything, time one denoiser forward on the chosen device and print each stage's "
            "denoiser evaluations, estimated wall time and peak memory; write no run.",
        ),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show diffquant and Prefect logs.")] = False,
) -> None:
    """Calibrate, quantize and evaluate a model; log everything to MLflow and write summary.json."""
    home = _setup(verbose)
    with _early_prefect_api(home, enabled=not dry_run):  # its start-up overlaps with the checks below
        from diffquant.calibration.labels import read_labels_file
        from diffquant.errors import DiffquantError
        from diffquant.models.cache import model_copy
        from diffquant.registry.home import ensure_writable, tracking_uri
        from diffquant.spec import check_memory, load_spec

        try:
            spec = load_spec(config, [*(set_ or []), *_runtime_overrides(runner, workers)])
            _check_out(out)
            uri = tracking_uri(home)
            if uri.startswith("sqlite:///"):
                ensure_writable(Path(uri.removeprefix("sqlite:///")).parent, "MLflow home")
            _preflight(uri, spec)
            model = model_copy(name=spec.model.name, path=spec.model.path, prompts=spec.model.prompts)
            check_memory(spec, model.sample_shape)
            _check_sampler(spec, model)
            _check_clip_model(spec, model)
            _check_latency_table(spec, model.unet)
            _check_allocation(spec, model)
            _check_uniform_plan(spec, model)
            _check_quantize(spec, model)
            if spec.calibration.labels_file:
                read_labels_file(Path(spec.calibration.labels_file), model.num_classes, model.condition)
            if dry_run:
                _dry_run(spec, model, home)
                return
        except DiffquantError as error:
            _fail(error)
        from diffquant.flows.compress import compress_flow

        start = time.perf_counter()
        summary = _run_flow(verbose, compress_flow, spec=spec.to_dict(), out_dir=str(out) if out else None)
        console.print(_summary_table(summary))
        console.print(f"total wall time: {time.perf_counter() - start:.1f} s")
        console.print(
            f"MLflow run {summary['run_id']} (experiment {summary['experiment']}); "
            f"UI: mlflow ui --backend-store-uri {summary['tracking_uri']}",
            highlight=False,
            soft_wrap=True,
        )
    typer.echo(summary["summary_path"])


@app.command()
def sweep(
    config: Annotated[Path, typer.Argument(help="YAML spec with an 'allocation' section.")],
    budgets: Annotated[str, typer.Option(help="Average weight bits budgets, comma-separated.")] = "3,3.5,4,5,6,8",
    baselines: Annotated[str, typer.Option(help="Uniform weight bits to compare, comma-separated.")] = "8,4,3",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a spec key (repeatable).")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default <DIFFQUANT_HOME>/sweeps/<time>).")
    ] = None,
    runner: RunnerOption = None,
    workers: WorkersOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show diffquant and Prefect logs.")] = False,
) -> None:
    """Allocate, quantize and evaluate at several budgets; write sweep.json and a Pareto plot."""
    home = _setup(verbose)
    with _early_prefect_api(home):  # its start-up overlaps with the checks below
        from diffquant.errors import DiffquantError, SpecError
        from diffquant.models.loading import load_model
        from diffquant.registry.home import tracking_uri
        from diffquant.spec import check_memory, load_spec

        try:
            spec = load_spec(config, [*(set_ or []), *_runtime_overrides(runner, workers)])
            _check_out(out)
            budget_list = [float(b) for b in budgets.split(",") if b.strip()]
            baseline_list = [int(b) for b in baselines.split(",") if b.strip()]
            if not all(math.isfinite(b) and b > 0 for b in budget_list):
                raise ValueError("budgets must be positive finite numbers")
            if spec.allocation is None:
                raise SpecError(f"{config} has no 'allocation' section; sweep varies the allocation budget")
            _preflight(tracking_uri(home), spec)
            model = load_model(name=spec.model.name, path=spec.model.path, prompts=spec.model.prompts)
            check_memory(spec, model.sample_shape)
            _check_sampler(spec, model)
            _check_clip_model(spec, model)
            _check_latency_table(spec)
            _check_allocation(spec, model)
            _check_quantize(spec, model)
            _check_baselines(spec, model, baseline_list)
        except ValueError:
            _fail(ValueError("--budgets takes numbers like 3,3.5,4 and --baselines integers like 8,4"))
        except DiffquantError as error:
            _fail(error)
        from diffquant.flows.sweep import sweep_flow

        result = _run_flow(
            verbose,
            sweep_flow,
            spec=spec.to_dict(),
            budgets=budget_list,
            baselines=baseline_list,
            out_dir=str(out) if out else None,
        )
    table = Table(title="diffquant sweep")
    for column in ("point", "bytes", "avg bits", "accuracy", "FD to real", "FD to FP", "sensitivity cached"):
        table.add_column(column)
    for p in result["points"]:
        table.add_row(
            p["label"],
            f"{p['packed_bytes']:,}",
            _fmt(p["avg_weight_bits"]),
            _fmt(p["accuracy"]),
            _fmt(p["fd_real"]),
            _fmt(p["fd_fp"]),
            _fmt(p["sensitivity_cache_hit"]),
        )
    console.print(table)
    typer.echo(result["sweep_path"])


@app.command()
def profile(
    config: Annotated[Path | None, typer.Argument(help="YAML spec with an 'allocation' section.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a spec key (repeatable).")] = None,
    batch: Annotated[int, typer.Option(help="Deployment batch size of the traced forward.", min=1)] = 1,
    threads: Annotated[int, typer.Option(help="onnxruntime intra-op threads.", min=1)] = 1,
    repeats: Annotated[int, typer.Option(help="Interleaved timing rounds (median of this many).", min=1)] = 30,
    warmup: Annotated[int, typer.Option(help="Untimed calls per graph first.", min=0)] = 3,
    runtime: Annotated[str, typer.Option(help="onnxruntime (TensorRT: refused with the reason here).")] = "onnxruntime",
    out: Annotated[Path | None, typer.Option("--out", help="Also write the table to this file.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show diffquant and Prefect logs.")] = False,
) -> None:
    """Measure each layer's latency per allocation option on the target runtime: the latency table JSON."""
    _setup(verbose)
    from diffquant.errors import DiffquantError, SpecError
    from diffquant.flows.latency_profile import check_runtime
    from diffquant.models.loading import load_model
    from diffquant.spec import load_spec

    try:
        spec = load_spec(config, set_ or [])
        if spec.allocation is None:
            raise SpecError("profile measures the allocation's candidate options; the spec has no 'allocation' section")
        check_runtime(runtime)
        if out is not None and out.is_dir():
            raise SpecError(f"--out {out} is a folder; give the table's file path")
        load_model(name=spec.model.name, path=spec.model.path, prompts=spec.model.prompts)
    except DiffquantError as error:
        _fail(error)
    from diffquant.flows.latency_profile import profile_flow

    settings = {"batch": batch, "threads": threads, "repeats": repeats, "warmup": warmup}
    result = _run_flow(
        verbose, profile_flow, spec=spec.to_dict(), settings=settings, runtime=runtime, out=str(out) if out else None
    )
    console.print(
        f"{result['layers']} layers x {result['options']} options (+ float reference), whole float graph "
        f"{result['whole_graph_fp32_ms']:.3f} ms, overhead {result['overhead_ms']:.3f} ms"
        f"{' (cached)' if result['cache_hit'] else ''}; TensorRT: "
        f"{'available' if result['tensorrt']['available'] else result['tensorrt']['skip_reason']}",
        highlight=False,
        soft_wrap=True,
    )
    typer.echo(result["table_path"])


@app.command("train-reference")
def train_reference(
    out: Annotated[
        Path | None, typer.Option("--out", help="Destination (default: the package's bundled weights).")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Training steps of each chosen model (default: its shipped run).", min=1)
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of every training.")] = 0,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model", help="digits-unet (with the classifier), digits-dit or digits-t2i; repeatable; default all."
        ),
    ] = None,
    eval_samples: Annotated[int, typer.Option(help="Samples for the model-card metrics.", min=10)] = 2000,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show diffquant and Prefect logs.")] = False,
) -> None:
    """Retrain the bundled reference models (digits-unet with its classifier, digits-dit, digits-t2i) from a seed."""
    _setup(verbose)
    from diffquant.flows.train_reference import train_reference_flow

    result = _run_flow(
        verbose,
        train_reference_flow,
        out_dir=str(out) if out else None,
        steps=steps,
        seed=seed,
        eval_samples=eval_samples,
        models=model,
    )
    table = Table(title=f"reference models written to {result['out_dir']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if key != "out_dir":
            table.add_row(key, _fmt(value))
    console.print(table)


@app.command()
def deploy(
    model: Annotated[str, typer.Argument(help="Registered model name, e.g. digits-unet.")],
    target: Annotated[
        str,
        typer.Option(
            "--target", help="Bundle folder to write: new, empty, or an earlier bundle (replaced atomically)."
        ),
    ],
    alias: Annotated[str, typer.Option(help="Alias of the version to deploy.")] = "champion",
    run_id: Annotated[str | None, typer.Option("--run-id", help="Deploy the version of this run instead.")] = None,
    device_class: Annotated[
        str | None,
        typer.Option(
            "--device-class",
            help="Class of this machine (orin, ampere, ada, hopper, blackwell, cpu; default: $DIFFQUANT_DEVICE_CLASS); "
            "a version built for another class is refused.",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show logs.")] = False,
) -> None:
    """Fetch a registered version, verify every artifact's sha256, build for this GPU, write a bundle."""
    home = _setup(verbose)
    from diffquant.devices import device_class as class_entry
    from diffquant.devices import machine_device_class
    from diffquant.errors import DiffquantError
    from diffquant.export.bundle import check_bundle_target

    try:
        machine = class_entry(device_class, "--device-class").name if device_class else machine_device_class()
        check_bundle_target(target)  # a target diffquant would refuse is refused before any download
    except DiffquantError as error:
        _fail(error)
    _registry_client(home, prefect=True)
    from diffquant.flows.deploy import deploy_flow

    result = _registry_action(
        home,
        verbose,
        lambda: deploy_flow(
            model=model, target=target, alias=None if run_id else alias, run_id=run_id, device_class=machine
        ),
    )
    console.print(
        f"{model} v{result['version']} ({result['device_class']}) -> {result['bundle']} ({result['engine_reason']})"
    )


@app.command()
def promote(
    model: Annotated[str, typer.Argument(help="Registered model name, e.g. digits-unet.")],
    version: Annotated[str, typer.Argument(help="Version to make champion.")],
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show logs.")] = False,
) -> None:
    """Make VERSION the champion of MODEL by hand (gates are not checked; the action is recorded)."""
    home = _setup(verbose)
    from diffquant.registry.promotion import promote as promote_version

    client = _registry_client(home)
    _registry_action(home, verbose, lambda: promote_version(client, model, version))
    console.print(f"{model}: champion is now version {version}")


@app.command()
def rollback(
    model: Annotated[str, typer.Argument(help="Registered model name, e.g. digits-unet.")],
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show logs.")] = False,
) -> None:
    """Demote MODEL's champion and restore the best earlier version that passed its gates."""
    home = _setup(verbose)
    from diffquant.registry.promotion import rollback as rollback_model

    client = _registry_client(home)
    restored = _registry_action(home, verbose, lambda: rollback_model(client, model))
    console.print(f"{model}: champion rolled back to version {restored}")


@app.command()
def watch(
    folder: Annotated[Path, typer.Argument(help="Folder a training job saves checkpoints to, one subfolder each.")],
    interval: Annotated[float, typer.Option(help="Seconds between two scans of FOLDER.", min=0.05)] = 10.0,
    once: Annotated[
        bool, typer.Option("--once", help="Scan twice, --interval apart, emit what is stable, then exit.")
    ] = False,
    state: Annotated[
        Path | None,
        typer.Option(help="State file of what was emitted (default: <DIFFQUANT_HOME>/watch/<folder hash>.json)."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show logs.")] = False,
) -> None:
    """Emit diffquant.checkpoint.landed to PREFECT_API_URL for each new, complete, stable diffusers folder in FOLDER.

    A subfolder is emitted once it holds model_index.json or config.json, its files did not change
    between two scans, and it loads as a diffusers model (safetensors only); the state file keeps a
    restarted watcher from emitting it again. The compress-on-checkpoint deployment's trigger
    starts a compress run for it.
    """
    home = _setup(verbose, reap=False)
    from diffquant.errors import DiffquantError
    from diffquant.flows.checkpoint import CHECKPOINT_EVENT, emit_checkpoint_landed, events_api_url
    from diffquant.watching import CheckpointWatcher, default_state_path

    _quiet_prefect(verbose)
    try:
        watcher = CheckpointWatcher(folder, state or default_state_path(folder, home))
        events_api_url()  # before the first scan: a watcher that cannot emit says so at once
        scans, emitted = 0, 0
        while True:
            for landed in watcher.scan():
                watcher.mark_emitted(landed, emit_checkpoint_landed(landed.path, landed.sha256))
                emitted += 1
                console.print(
                    f"emitted {CHECKPOINT_EVENT} for {landed.path} (weights sha256 {landed.sha256[:12]})",
                    highlight=False,
                    soft_wrap=True,
                )
            scans += 1
            if once and scans >= 2:
                break
            time.sleep(interval)
    except DiffquantError as error:
        _fail(error)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if emitted == 0:
        console.print(f"no new complete checkpoint in {folder}", highlight=False, soft_wrap=True)


def _registry_client(home: Path, prefect: bool = False) -> Any:
    """Pre-flight for the registry commands (URI shape, database, server; Prefect API when ``prefect``), then a client."""
    from diffquant.errors import DiffquantError
    from diffquant.registry.home import tracking_uri
    from diffquant.registry.models import registry_client, registry_errors
    from diffquant.registry.preflight import check_prefect_api, check_tracking_server, check_tracking_store

    uri = tracking_uri(home)
    try:
        check_tracking_server(uri)
        check_tracking_store(uri)
        if prefect:
            from prefect.settings import PREFECT_API_URL

            check_prefect_api(PREFECT_API_URL.value())
        with registry_errors(uri):
            return registry_client(uri)
    except DiffquantError as error:
        _fail(error)


def _registry_action(home: Path, verbose: bool, action: Any) -> Any:
    """Run ``action``; a user error or an MLflow/database failure prints one line and exits 2."""
    from diffquant.errors import DiffquantError
    from diffquant.registry.home import tracking_uri
    from diffquant.registry.models import registry_errors

    _quiet_prefect(verbose)
    try:
        with registry_errors(tracking_uri(home)):
            return action()
    except DiffquantError as error:
        _fail(error)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="diffquant")


if __name__ == "__main__":
    sys.exit(main())
