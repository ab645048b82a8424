"""Stage: collect full-precision trajectories (the calibration candidate pool), cached by Prefect.

The pool is streamed to its file as it is sampled (never one tensor in memory).

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
from diffquant.spec import RuntimeSpec
from diffquant.tasks.artifacts import FileRef, PoolArtifact, PoolRequest, request_cache_policy
from diffquant.tasks.common import model_from_source


@task(name="collect-trajectories", cache_policy=request_cache_policy(), persist_result=True)
def collect_trajectories_task(
    request: PoolRequest, cache_dir: str, runtime: RuntimeSpec | None = None, batch_size: int = 1000
) -> PoolArtifact:
    """Sample FP trajectories and stream every denoiser input to ``cache_dir`` (named by the request key).

    ``runtime`` places the model (device, dtype) and ``batch_size`` bounds a forward (the
    spec's sampling batch); neither is part of the cache key.
    """
    model = model_from_source(request.model, runtime)
    labels = torch.tensor(request.labels) if request.labels else None
    path = Path(cache_dir) / f"pool-{request.key()}.safetensors"
    with spec_section("sampler"):
        pool = collect_pool(
            model, request.trajectories, request.sampler, request.seed, labels, batch_size=batch_size, out=path
        )
    return PoolArtifact(pool=FileRef.of(path), size=len(pool))
