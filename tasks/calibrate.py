"""Stages: select the calibration set, then quantize with the plan and calibrate activations."""

from __future__ import annotations

from pathlib import Path

import torch
from prefect import task

from diffquant.calibration.selection import select_calibration
from diffquant.errors import spec_section
from diffquant.ptq import quantize, save_quantized
from diffquant.quant.plan import LayerPlan
from diffquant.report import pca_projection, timestep_histogram
from diffquant.spec import CompressionSpec
from diffquant.storage import write_json
from diffquant.tasks.artifacts import AllocationArtifact, CalibrationArtifact, FileRef, PoolArtifact, QuantizeArtifact
from diffquant.tasks.common import load_trajectories, model_from_source, save_trajectories


@task(name="select-calibration")
def select_calibration_task(pool: PoolArtifact, spec: CompressionSpec, out_dir: str) -> CalibrationArtifact:
    """Select the calibration set and a disjoint SQNR set; record indices, histogram and PCA plot.

    The pool is memory-mapped: the feature pass reads it a batch at a time.
    """
    cal = spec.calibration
    inputs = load_trajectories(pool.pool.path, mapped=True)
    model = model_from_source(spec.model, spec.runtime)
    with spec_section("calibration"):
        chosen = select_calibration(
            inputs,
            model,
            cal,
            sqnr_inputs=spec.evaluate.sqnr_inputs,
            with_features=True,
            batch_size=spec.forward_batch,
        )
    folder = Path(out_dir) / "calibration"
    histogram = {int(v): int((inputs.t[chosen.indices] == v).sum()) for v in torch.unique(inputs.t)}
    selection = {
        "strategy": cal.strategy,
        "seed": cal.seed,
        "size": cal.size,
        "pool_size": len(inputs),
        "pool_path": pool.pool.path,
        "params": chosen.params.__dict__,
        "timestep_histogram": histogram,
        "indices": chosen.indices.tolist(),
        "sqnr_indices": chosen.sqnr_indices.tolist(),
    }
    title = f"{cal.strategy}, size {cal.size}, seed {cal.seed}"
    assert chosen.features is not None
    return CalibrationArtifact(
        calibration=FileRef.of(save_trajectories(chosen.calibration, folder / "calibration_set.safetensors")),
        sqnr=FileRef.of(save_trajectories(chosen.sqnr, folder / "sqnr_inputs.safetensors")),
        selection=FileRef.of(write_json(selection, folder / "selection.json")),
        histogram_png=str(
            timestep_histogram(inputs.t, inputs.t[chosen.indices], folder / "timestep_histogram.png", title)
        ),
        pca_png=str(pca_projection(chosen.features, chosen.indices, inputs.t, folder / "features_pca.png", title)),
        size=int(chosen.indices.numel()),
        seconds=chosen.seconds,
    )


@task(name="quantize")
def quantize_task(
    spec: CompressionSpec, calibration: CalibrationArtifact, out_dir: str, allocation: AllocationArtifact | None = None
) -> QuantizeArtifact:
    """Quantize with the allocated plan (or the spec's uniform plan), calibrate, save plan + scales.

    The policy (family defaults, group fallback, outlier tokens, output quantizers for
    ``export.target: onnxruntime``) is :func:`diffquant.ptq`'s.
    """
    model = model_from_source(spec.model, spec.runtime)
    plan = LayerPlan.load(Path(allocation.plan.path)) if allocation is not None else None
    with spec_section("quantize"):
        result = quantize(
            model,
            spec.quantize,
            load_trajectories(calibration.calibration.path),
            calibration=spec.calibration.model_copy(update={"batch_size": spec.forward_batch}),
            plan=plan,
            target=spec.export.target,
            device_class=spec.export.device_class,
        )
    plan_path, scales_path = save_quantized(model, result.plan, Path(out_dir) / "plan")
    return QuantizeArtifact(
        plan=FileRef.of(plan_path),
        scales=FileRef.of(scales_path),
        layers=len(result.plan),
        quantized_layers=len(result.plan.quantized_layers()),
        fp32_bytes=result.fp32_bytes,
        packed_bytes=result.packed_bytes,
        deployed_bytes=result.deployed_bytes,
        outlier_tokens=result.outlier_tokens.to_dict(),
    )
