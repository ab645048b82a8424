"""The ``sensitivity`` subflow: per-layer sensitivity mapped over layers as Prefect tasks.

Layers are split into tasks of ``runtime.layers_per_task``; each task is cached on its inputs,
so a second run (another budget, a resumed crash) recomputes nothing it already has. The tasks
run on the task runner chosen by ``runtime``: Prefect's thread pool or prefect-dask's
DaskTaskRunner over a local cluster of worker processes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from diffquant.tasks.sensitivity import merge_sensitivity_task, sensitivity_layers_task, table_key
from prefect import flow
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from diffquant.spec import RuntimeSpec

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
    spec_key: dict[str, Any],
    spec: dict[str, Any],
    layers: list[str],
    calibration_path: str,
    calibration_sha256: str,
    code_version: str,
    cache_dir: str,
    layers_per_task: int = 4,
) -> dict[str, Any]:
    """Measure every layer's sensitivity in parallel tasks and merge them into one table.

    Args:
        spec_key: The spec parts the table depends on (part of every task's cache key).
        spec: The whole spec as data.
        layers: The layers to measure, in model order.
        calibration_path: The selected calibration set.
        calibration_sha256: Its hash.
        code_version: Version of the sensitivity code.
        cache_dir: Folder for cached tables.
        layers_per_task: Layers measured by one task.

    Returns:
        ``csv_path``, ``heatmap_path``, ``cache_hit`` (every task came from the cache),
        ``tasks`` and ``tasks_cached``.
    """
    args = (spec_key, spec, calibration_path, calibration_sha256, code_version)
    chunks = chunk(layers, layers_per_task)
    futures = [sensitivity_layers_task.submit(*args, part, cache_dir, len(part) - 1) for part in chunks]
    paths, cached = [], 0
    for part, future in zip(chunks, futures, strict=True):
        future.wait()
        state = future.state
        result = dict(state.result())
        if state.name == "Cached" and not Path(result["csv_path"]).is_file():
            logger.warning("cached sensitivity of %s is gone; measuring again", part[0])
            result = dict(
                sensitivity_layers_task.with_options(refresh_cache=True)(*args, part, cache_dir, len(part) - 1)
            )
        else:
            cached += state.name == "Cached"
        paths.append(result["csv_path"])
    folder = Path(cache_dir) / table_key(spec_key, calibration_sha256, code_version)
    merged = merge_sensitivity_task(paths, str(folder))
    return {**merged, "cache_hit": cached == len(chunks), "tasks": len(chunks), "tasks_cached": cached}
