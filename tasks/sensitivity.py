"""Stages: per-layer sensitivity (cached by Prefect) and bit allocation into a LayerPlan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from diffquant.mixed_precision import allocate, sensitivity_for_spec
from diffquant.models.reference import load_classifier
from diffquant.report import sensitivity_heatmap
from diffquant.sensitivity import SensitivityTable
from diffquant.spec import spec_from_dict
from diffquant.storage import write_json
from tasks.common import load_trajectories, model_from_source


@task(name="sensitivity", cache_policy=(INPUTS - "spec" - "calibration_path") + TASK_SOURCE, persist_result=True)
def sensitivity_task(
    spec_key: dict[str, Any],
    spec: dict[str, Any],
    calibration_path: str,
    calibration_sha256: str,
    code_version: str,
    cache_dir: str,
) -> dict[str, Any]:
    """Measure the sensitivity table; cached on the model, calibration set, options and code version.

    The cache key leaves out ``spec`` and ``calibration_path`` (they change with every run and
    budget); ``spec_key`` and ``calibration_sha256`` carry what the table depends on.

    Args:
        spec_key: The spec parts the table depends on (model hash, options, observers, content).
        spec: The whole spec as data.
        calibration_path: The selected calibration set.
        calibration_sha256: Its hash (part of the cache key).
        code_version: Version of the sensitivity code (part of the cache key).
        cache_dir: Folder for cached tables.

    Returns:
        ``csv_path`` and ``heatmap_path``.
    """
    import hashlib
    import json

    cfg = spec_from_dict(spec)
    model = model_from_source(cfg.model.model_dump())
    classifier = load_classifier() if model.digits_compatible else None
    table = sensitivity_for_spec(model, load_trajectories(calibration_path), cfg, classifier)
    key = hashlib.sha256(json.dumps([spec_key, calibration_sha256, code_version], sort_keys=True).encode())
    folder = Path(cache_dir) / key.hexdigest()[:20]
    csv_path = table.save_csv(folder / "sensitivity.csv")
    heatmap = sensitivity_heatmap(table.rows, folder / "sensitivity_heatmap.png")
    return {"csv_path": str(csv_path), "heatmap_path": str(heatmap)}


@task(name="allocate")
def allocate_task(spec: dict[str, Any], calibration_path: str, csv_path: str, out_dir: str) -> dict[str, Any]:
    """Solve the allocation program; write the LayerPlan and the solver's answer."""
    cfg = spec_from_dict(spec)
    model = model_from_source(cfg.model.model_dump())
    plan, result = allocate(model, load_trajectories(calibration_path), cfg, SensitivityTable.load_csv(Path(csv_path)))
    folder = Path(out_dir) / "plan"
    plan_path = plan.save(folder / "allocated_plan.json")
    answer = {
        "objective": result.objective,
        "usage": result.usage,
        "status": result.status,
        "budget": cfg.allocation.budget.as_dict() if cfg.allocation else {},
        "choice": result.choice,
    }
    return {
        "plan_path": str(plan_path),
        "allocation_path": str(write_json(answer, folder / "allocation.json")),
        "usage": result.usage,
        "objective": result.objective,
    }
