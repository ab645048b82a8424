"""Stages: per-layer sensitivity (mapped over layers, cached by Prefect) and bit allocation into a LayerPlan."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import task

from diffquant.errors import ConfigError, spec_section
from diffquant.mixed_precision.allocate import allocate_plan, family_float_layers, measure_allocation_sensitivity
from diffquant.mixed_precision.sensitivity import SensitivityTable
from diffquant.models.reference import load_classifier
from diffquant.ptq import weight_observer, weight_rounding
from diffquant.report import sensitivity_heatmap
from diffquant.spec import CompressionSpec
from diffquant.storage import write_json
from diffquant.tasks.artifacts import (
    AllocationArtifact,
    CalibrationArtifact,
    FileRef,
    SensitivityRequest,
    request_cache_policy,
)
from diffquant.tasks.common import load_trajectories, model_from_source

QUANTIZE_KEYS = ("weight.", "outlier_tokens")
"""Keys of the core's errors in sensitivity that are ``quantize`` settings (GPTQ rows, outlier tokens)."""


@contextmanager
def allocation_sections() -> Iterator[None]:
    """Re-raise the core's :class:`ConfigError` naming its spec key: ``quantize.<key>`` or ``allocation.<key>``."""
    try:
        yield
    except ConfigError as error:
        raise error.in_section("quantize" if error.key.startswith(QUANTIZE_KEYS) else "allocation") from None


@task(
    name="sensitivity-layers",
    task_run_name="sensitivity {layers[0]} (+{extra})",
    cache_policy=request_cache_policy(),
    persist_result=True,
)
def sensitivity_layers_task(
    request: SensitivityRequest,
    spec: CompressionSpec,
    calibration: CalibrationArtifact,
    layers: list[str],
    cache_dir: str,
    extra: int = 0,
) -> FileRef:
    """Measure the sensitivity rows of some layers; cached on the request and the layers.

    ``spec`` and ``calibration`` are not part of the cache key (they change with every run and
    budget); the request carries what the rows depend on, so a killed run resumes with the layers
    it had finished.

    Args:
        request: What the rows depend on (model hash, options, observers, metrics, calibration hash).
        spec: The whole spec (its ``allocation`` section configures the measurement).
        calibration: The selected calibration set.
        layers: The layers this task measures.
        cache_dir: Folder of the table (``<cache_dir>/<request key>/layers/<hash>.csv``).
        extra: Number of layers after the first (only for the task run's name).
    """
    assert spec.allocation is not None
    model = model_from_source(spec.model, spec.runtime)
    classifier = load_classifier() if model.digits_compatible else None
    with allocation_sections():
        table = measure_allocation_sensitivity(
            model,
            load_trajectories(calibration.calibration.path),
            spec.allocation,
            weight_observer=request.weight_observer,
            activation_observer=request.activation_observer,
            steps=request.sampler,
            seed=request.seed,
            classifier=classifier,
            layers=layers,
            description=f"Sensitivity {layers[0]}",
            weight_rounding=request.weight_rounding,
            outlier_tokens=request.outlier_tokens,
            batch_size=spec.forward_batch,
            sample_batch_size=spec.sampling_batch,
        )
    name = hashlib.sha256(json.dumps(layers).encode()).hexdigest()[:20]
    return FileRef.of(table.save_csv(Path(cache_dir) / request.key() / "layers" / f"{name}.csv"))


@task(name="sensitivity-merge")
def merge_sensitivity_task(parts: list[FileRef], folder: str) -> tuple[FileRef, str]:
    """Concatenate the per-task tables (in layer order) into one CSV and draw the heatmap."""
    rows = [row for part in parts for row in SensitivityTable.load_csv(Path(part.path)).rows]
    table = SensitivityTable(rows)
    csv_path = table.save_csv(Path(folder) / "sensitivity.csv")
    heatmap = sensitivity_heatmap(table.rows, Path(folder) / "sensitivity_heatmap.png")
    return FileRef.of(csv_path), str(heatmap)


@task(name="allocate")
def allocate_task(
    spec: CompressionSpec, calibration: CalibrationArtifact, sensitivity: FileRef, out_dir: str
) -> AllocationArtifact:
    """Solve the allocation program; write the LayerPlan and the solver's answer."""
    assert spec.allocation is not None
    model = model_from_source(spec.model, spec.runtime)
    with spec_section("allocation"):
        plan, result = allocate_plan(
            model,
            load_trajectories(calibration.calibration.path),
            spec.allocation,
            SensitivityTable.load_csv(Path(sensitivity.path)),
            weight_observer=weight_observer(spec.quantize),
            activation_observer=spec.calibration.observer,
            device_class=spec.export.device,
            weight_rounding=weight_rounding(spec.quantize),
        )
    folder = Path(out_dir) / "plan"
    answer = {
        "objective": result.objective,
        "usage": result.usage,
        "status": result.status,
        "budget": spec.allocation.budget.as_dict(),
        "cost": spec.allocation.cost,
        "quantize_family_fp_layers": spec.allocation.quantize_family_fp_layers,
        "family_fp_layers": sorted(family_float_layers(model, spec.allocation, list(plan))),
        "weight_rounding": weight_rounding(spec.quantize),
        "choice": result.choice,
        "device_class": spec.export.device.name,
        "removed_options": result.removed,
        "notes": result.notes,
        "unavailable": result.unavailable,
    }
    return AllocationArtifact(
        plan=FileRef.of(plan.save(folder / "allocated_plan.json")),
        answer=FileRef.of(write_json(answer, folder / "allocation.json")),
        usage=result.usage,
        objective=result.objective,
    )
