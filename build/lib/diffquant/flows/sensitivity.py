"""The ``sensitivity`` subflow: per-layer sensitivity mapped over layers as Prefect tasks.

Layers are split into tasks of ``runtime.layers_per_task``; each task is cached on its request
and layers, so a second run (another budget, a resumed crash) recomputes nothing it already has.
The tasks run on the task runner chosen by ``runtime``: Prefect's thread pool or prefect-dask's
DaskTaskRunner over a local cluster of worker processes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from diffquant.spec import CompressionSpec, RuntimeSpec
from diffquant.tasks.artifacts import CalibrationArtifact, FileRef, SensitivityArtifact, SensitivityRequest
from diffquant.tasks.sensitivity import merge_sensitivity_task, sensitivity_layers_task

logger = logging.getLogger(__name__)


def task_runner_for(runtime: RuntimeSpec) -> TaskRunner:
    """The task runner ``runtime`` asks for.

    ``dask`` starts a ``distributed.LocalCluster`` of ``workers`` processes with one thread each
    (Dask sets OMP/MKL threads to 1 in its workers, so processes do not oversubscribe cores).
    """
    if runtime.runner == "dask":
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": runtime.workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": ":0",
            },
        )
    return ThreadPoolTaskRunner(max_workers=runtime.workers)


def chunk(layers: list[str], size: int) -> list[list[str]]:
    """Split ``layers`` into consecutive lists of at most ``size``."""
    return [layers[i : i + size] for i in range(0, len(layers), size)]


@flow(name="sensitivity", log_prints=False)
def sensitivity_flow(
    request: SensitivityRequest,
    spec: CompressionSpec,
    layers: list[str],
    calibration: CalibrationArtifact,
    cache_dir: str,
) -> SensitivityArtifact:
    """Measure every layer's sensitivity in parallel tasks and merge them into one table.

    A cached part whose file is gone or changed (sha256) is measured again.

    Args:
        request: What the rows depend on (part of every task's cache key).
        spec: The whole spec.
        layers: The layers to measure, in model order.
        calibration: The selected calibration set.
        cache_dir: Folder for cached tables.
    """
    chunks = chunk(layers, spec.runtime.layers_per_task)
    args = (request, spec, calibration)
    futures = [sensitivity_layers_task.submit(*args, part, cache_dir, len(part) - 1) for part in chunks]
    parts: list[FileRef] = []
    cached = 0
    for part, future in zip(chunks, futures, strict=True):
        future.wait()
        state = future.state
        result = state.result()
        if state.name == "Cached" and not result.intact():
            logger.warning("cached sensitivity of %s is gone or changed; measuring again", part[0])
            result = sensitivity_layers_task.with_options(refresh_cache=True)(*args, part, cache_dir, len(part) - 1)
        else:
            cached += state.name == "Cached"
        parts.append(result)
    csv, heatmap = merge_sensitivity_task(parts, str(Path(cache_dir) / request.key()))
    return SensitivityArtifact(
        csv=csv, heatmap_png=heatmap, cache_hit=cached == len(chunks), tasks=len(chunks), tasks_cached=cached
    )
