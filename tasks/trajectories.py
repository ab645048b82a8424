"""Stage: collect full-precision trajectories (the calibration candidate pool), cached by Prefect.

The cache key is the task's inputs and source: the model's weights hash, the sampler spec, the
pool-relevant part of the calibration spec (trajectories, seed, labels) and the pool code version.
Selection keys (strategy, size) are not part of it, so every strategy reuses one pool.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from diffquant.tasks.common import model_from_source, save_trajectories
from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from diffquant.calibration.pool import collect_pool


def pool_key(weights_sha256: str, sampler: dict[str, Any], pool_spec: dict[str, Any], code_version: str) -> str:
    """Stable identity of a pool (names the cached file)."""
    data = json.dumps([weights_sha256, sampler, pool_spec, code_version], sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:20]


@task(name="collect-trajectories", cache_policy=INPUTS + TASK_SOURCE, persist_result=True)
def collect_trajectories_task(
    source: dict[str, Any],
    weights_sha256: str,
    sampler: dict[str, Any],
    pool_spec: dict[str, Any],
    code_version: str,
    cache_dir: str,
) -> dict[str, Any]:
    """Sample FP trajectories and store every denoiser input under ``cache_dir``.

    Args:
        source: The spec's ``model`` section.
        weights_sha256: Hash of the model weights (part of the cache key).
        sampler: The spec's ``sampler`` section.
        pool_spec: ``trajectories``, ``seed`` and ``labels`` (list of ints or None).
        code_version: Version of the pool-collection code (part of the cache key).
        cache_dir: Folder for cached pools.

    Returns:
        ``pool_path`` and ``pool_size``.
    """
    model = model_from_source(source)
    labels = torch.tensor(pool_spec["labels"]) if pool_spec.get("labels") else None
    pool = collect_pool(model, pool_spec["trajectories"], sampler["steps"], pool_spec["seed"], labels)
    name = f"pool-{pool_key(weights_sha256, sampler, pool_spec, code_version)}.safetensors"
    path = save_trajectories(pool, Path(cache_dir) / name)
    return {"pool_path": str(path), "pool_size": len(pool)}
