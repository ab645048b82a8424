"""Stages: per-layer sensitivity (mapped over layers, cached by Prefect) and bit allocation into a LayerPlan."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from diffquant.tasks.common import load_trajectories, model_from_source
from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from diffquant.errors import spec_section
from diffquant.mixed_precision.allocate import allocate_plan, measure_allocation_sensitivity
from diffquant.mixed_precision.sensitivity import SensitivityTable
from diffquant.models.reference import load_classifier
from diffquant.quantize import weight_observer
from diffquant.report import sensitivity_heatmap
from diffquant.spec import spec_from_dict
from diffquant.storage import write_json


@task(
    name="sensitivity-layers",
    task_run_name="sensitivity {layers[0]} (+{extra})",
    cache_policy=(INPUTS - "spec" - "calibration_path" - "extra") + TASK_SOURCE,
    persist_result=True,
)
def sensitivity_layers_task(
    spec_key: dict[str, Any],
    spec: dict[str, Any],
    calibration_path: str,
    calibration_sha256: str,
    code_version: str,
    layers: list[str],
    cache_dir: str,
    extra: int = 0,
) -> dict[str, Any]:
    """Measure the sensitivity rows of some layers; cached on what the rows depend on.

    The cache key leaves out ``spec`` and ``calibration_path`` (they change with every run and
    budget); ``spec_key``, ``calibration_sha256``, ``code_version`` and ``layers`` carry what the
    rows depend on, so a killed run resumes with the layers it had finished.

    Args:
        spec_key: The spec parts the table depends on (model hash, options, observers, content).
        spec: The whole spec as data.
        calibration_path: The selected calibration set.
        calibration_sha256: Its hash (part of the cache key).
        code_version: Version of the sensitivity code (part of the cache key).
        layers: The layers this task measures.
        cache_dir: Folder of the table (``<cache_dir>/<key>/layers/<hash>.csv``).
        extra: Number of layers after the first (only for the task run's name).

    Returns:
        ``csv_path`` of this task's rows.
    """
    cfg = spec_from_dict(spec)
    model = model_from_source(cfg.model.model_dump())
    classifier = load_classifier() if model.digits_compatible else None
    assert cfg.allocation is not None
    with spec_section("allocation"):
        table = measure_allocation_sensitivity(
            model,
            load_trajectories(calibration_path),
            cfg.allocation,
            weight_observer=weight_observer(cfg.quantize),
            activation_observer=cfg.calibration.observer,
            steps=cfg.sampler.steps,
            seed=cfg.evaluate.seed,
            classifier=classifier,
            layers=layers,
            description=f"Sensitivity {layers[0]}",
        )
    folder = Path(cache_dir) / table_key(spec_key, calibration_sha256, code_version)
    name = hashlib.sha256(json.dumps(layers).encode()).hexdigest()[:20]
    return {"csv_path": str(table.save_csv(folder / "layers" / f"{name}.csv"))}


@task(name="sensitivity-merge")
def merge_sensitivity_task(csv_paths: list[str], folder: str) -> dict[str, Any]:
    """Concatenate the per-task tables (in layer order) into one CSV and draw the heatmap."""
    rows = [row for path in csv_paths for row in SensitivityTable.load_csv(Path(path)).rows]
    table = SensitivityTable(rows)
    csv_path = table.save_csv(Path(folder) / "sensitivity.csv")
    heatmap = sensitivity_heatmap(table.rows, Path(folder) / "sensitivity_heatmap.png")
    return {"csv_path": str(csv_path), "heatmap_path": str(heatmap)}


def table_key(spec_key: dict[str, Any], calibration_sha256: str, code_version: str) -> str:
    """Folder name of a sensitivity table: a hash of what it depends on."""
    key = json.dumps([spec_key, calibration_sha256, code_version], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:20]


@task(name="allocate")
def allocate_task(spec: dict[str, Any], calibration_path: str, csv_path: str, out_dir: str) -> dict[str, Any]:
    """Solve the allocation program; write the LayerPlan and the solver's answer."""
    cfg = spec_from_dict(spec)
    model = model_from_source(cfg.model.model_dump())
    assert cfg.allocation is not None
    with spec_section("allocation"):
        plan, result = allocate_plan(
            model,
            load_trajectories(calibration_path),
            cfg.allocation,
            SensitivityTable.load_csv(Path(csv_path)),
            weight_observer=weight_observer(cfg.quantize),
            activation_observer=cfg.calibration.observer,
        )
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
