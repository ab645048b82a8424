"""Stage: collect full-precision trajectories (the calibration candidate pool)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from diffquant.calibration import collect_pool
from tasks.common import model_from_source, save_trajectories


@task(name="collect-trajectories")
def collect_trajectories_task(
    source: dict[str, Any], sampler: dict[str, Any], calibration: dict[str, Any], out_dir: str
) -> dict[str, Any]:
    """Sample FP trajectories and store every denoiser input as ``pool.safetensors``."""
    model = model_from_source(source)
    pool = collect_pool(model, calibration["trajectories"], sampler["steps"], calibration["seed"])
    path = save_trajectories(pool, Path(out_dir) / "calibration" / "pool.safetensors")
    return {"pool_path": str(path), "pool_size": len(pool)}
