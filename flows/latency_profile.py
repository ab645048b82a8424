"""The ``profile`` flow: measure the latency table the allocator reads, cache it, log it to MLflow.

The table (:mod:`diffquant.export.profile`) has an entry per layer x candidate option of the
spec's ``allocation``, in the export form of ``export.target``, at the deployment batch size, on
onnxruntime (CPU). It is cached by model, options, runtime version, machine and settings
(:class:`~diffquant.tasks.latency.ProfileRequest`); every call logs one MLflow run (experiment:
the model's name) with the runtime and machine as params, ``cache_hit`` as a tag and the table
under ``latency/``. Point ``allocation.latency_table`` at the written file and set
``budget.latency_ms`` to allocate under a latency budget. The file is named after the stdlib-safe
``latency_profile`` (a flow file named ``profile.py`` would shadow Python's ``profile`` module).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from prefect import flow

from diffquant.errors import SpecError
from diffquant.export.profile import ProfileSettings, machine_fingerprint, machine_info, onnxruntime_info
from diffquant.export.tensorrt import tensorrt_available
from diffquant.mixed_precision.allocate import candidate_options
from diffquant.registry.home import diffquant_home, ensure_writable, tracking_uri
from diffquant.registry.tracking import tracked_run
from diffquant.spec import spec_from_dict
from diffquant.tasks.latency import LatencyArtifact, ProfileRequest, profile_task
from diffquant.tasks.load import load_model_task

logger = logging.getLogger(__name__)

RUNTIMES = ("onnxruntime", "tensorrt")


def check_runtime(runtime: str) -> None:
    """Refuse an unknown runtime, and TensorRT where it cannot run (the reason in one line).

    Raises:
        SpecError: Naming ``--runtime``.
    """
    if runtime not in RUNTIMES:
        raise SpecError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "tensorrt":
        available, reason = tensorrt_available()
        raise SpecError(
            f"--runtime tensorrt: {reason if not available else 'per-layer TensorRT timing is not implemented yet'}; "
            "use --runtime onnxruntime"
        )


def _cached_profile(request: ProfileRequest, cache_dir: str) -> tuple[LatencyArtifact, bool]:
    state = profile_task(request, cache_dir, return_state=True)
    result = state.result()
    if state.name == "Cached" and not result.intact():
        logger.warning("the cached latency table is gone or changed; measuring again")
        return profile_task.with_options(refresh_cache=True)(request, cache_dir), False
    return result, state.name == "Cached"


@flow(name="profile", log_prints=False)
def profile_flow(
    spec: dict[str, Any],
    settings: dict[str, Any] | None = None,
    runtime: str = "onnxruntime",
    out: str | None = None,
) -> dict[str, Any]:
    """Measure (or reuse) the latency table of the spec's model for its allocation's options.

    Args:
        spec: A :class:`~diffquant.spec.CompressionSpec` as data, with an ``allocation`` section.
        settings: :class:`~diffquant.export.profile.ProfileSettings` fields (batch, threads,
            repeats, ...); ``target`` defaults to the spec's ``export.target``.
        runtime: ``onnxruntime`` (TensorRT is refused with the reason where it cannot run).
        out: Also copy the table to this file.

    Returns:
        ``table_path`` (the cached table, or ``out``), ``cache_hit``, ``run_id``, ``overhead_ms``,
        ``whole_graph_fp32_ms``, ``layers``, ``options`` and the ``tensorrt`` status.

    Raises:
        SpecError: No ``allocation`` section, an unknown runtime, or TensorRT unavailable.
    """
    cfg = spec_from_dict(spec)
    if cfg.allocation is None:
        raise SpecError("profile measures the allocation's candidate options; the spec has no 'allocation' section")
    check_runtime(runtime)
    home = ensure_writable(diffquant_home(), "diffquant home")
    info = load_model_task(cfg.model)
    fields = {"target": cfg.export.target, **(settings or {})}
    profile_settings = ProfileSettings(**fields)
    ort_info = onnxruntime_info(profile_settings.threads)
    machine = machine_info()
    options = {name: list(value) for name, value in candidate_options(cfg.allocation).items()}
    request = ProfileRequest(
        model=cfg.model,
        weights_sha256=info.weights_sha256,
        options=options,
        runtime=runtime,
        runtime_version=ort_info["version"],
        machine=machine_fingerprint(machine),
        settings=profile_settings.to_dict(),
    )
    cache_dir = str(home / "cache" / "latency")
    tags = {"model.weights_sha256": info.weights_sha256, "profile.request": request.key()}
    with tracked_run(tracking_uri(home), info.name, f"profile-{request.key()[:8]}", home / "mlartifacts", tags) as run:
        artifact, hit = _cached_profile(request, cache_dir)
        run.log_params(
            {
                "runtime": runtime,
                **{f"runtime.{k}": v for k, v in ort_info.items() if k != "name"},
                **{f"machine.{k}": v for k, v in machine.items()},
                "machine.fingerprint": request.machine,
                **{f"profile.{k}": v for k, v in profile_settings.to_dict().items()},
                "options": ",".join(options),
            }
        )
        run.set_tags({"cache_hit": str(hit).lower(), "tensorrt": tensorrt_available()[1] or "available"})
        run.log_metrics(
            {
                "latency.overhead_ms": artifact.overhead_ms,
                "latency.whole_graph_fp32_ms": artifact.whole_graph_fp32_ms,
                "latency.layers": artifact.layers,
            }
        )
        run.log_artifact(Path(artifact.table.path), "latency")
        run_id = run.run_id
    table_path = Path(artifact.table.path)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(table_path, out)
        table_path = Path(out)
    available, reason = tensorrt_available()
    return {
        "table_path": str(table_path),
        "cache_hit": hit,
        "run_id": run_id,
        "overhead_ms": artifact.overhead_ms,
        "whole_graph_fp32_ms": artifact.whole_graph_fp32_ms,
        "layers": artifact.layers,
        "options": artifact.options,
        "tensorrt": {"available": available, "skip_reason": reason},
    }
