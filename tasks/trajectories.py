"""Stage: collect full-precision trajectories (the calibration candidate pool), cached by Prefect.

The cache key is the :class:`~diffquant.tasks.artifacts.PoolRequest` (model, weights hash,
sampler, trajectories, seed, labels, prompts hash, pool code version) plus the task's source.
Selection keys (strategy, size) are not part of it, so every strategy reuses one pool.
"""

from __future__ import annotations

from pathlib import Path

import torch
from prefect import task

from diffquant.calibration.pool import collect_pool
from diffquant.errors import spec_section
from diffquant.tasks.artifacts import FileRef, PoolArtifact, PoolRequest, request_cache_policy
from diffquant.tasks.common import model_from_source, save_trajectories


@task(name="collect-trajectories", cache_policy=request_cache_policy(), persist_result=True)
def collect_trajectories_task(request: PoolRequest, cache_dir: str) -> PoolArtifact:
    """Sample FP trajectories and store every denoiser input under ``cache_dir`` (named by the request key)."""
    model = model_from_source(request.model)
    labels = torch.tensor(request.labels) if request.labels else None
    with spec_section("sampler"):
        pool = collect_pool(model, request.trajectories, request.sampler, request.seed, labels)
    path = save_trajectories(pool, Path(cache_dir) / f"pool-{request.key()}.safetensors")
    return PoolArtifact(pool=FileRef.of(path), size=len(pool))
