"""Stages: select the calibration set, then quantize with the plan and calibrate activations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffquant.tasks.common import load_trajectories, model_from_source, save_trajectories
from prefect import task

from diffquant.calibration.selection import select_calibration
from diffquant.errors import spec_section
from diffquant.quant.plan import LayerPlan
from diffquant.quantize import quantize, save_quantized
from diffquant.report import pca_projection, timestep_histogram
from diffquant.spec import spec_from_dict
from diffquant.storage import write_json


@task(name="select-calibration")
def select_calibration_task(pool_path: str, spec: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """Select the calibration set and a disjoint SQNR set; record indices, histogram and PCA plot.

    Returns:
        Paths of the selected set, the SQNR inputs, ``selection.json`` and the two PNGs, the size,
        ``selection_seconds`` (features + selection) and the per-timestep counts.
    """
    cfg = spec_from_dict(spec)
    cal = cfg.calibration
    pool = load_trajectories(pool_path)
    model = model_from_source(cfg.model.model_dump())
    with spec_section("calibration"):
        chosen = select_calibration(pool, model, cal, sqnr_inputs=cfg.evaluate.sqnr_inputs, with_features=True)
    folder = Path(out_dir) / "calibration"
    values = torch.unique(pool.t)
    histogram = {int(v): int((pool.t[chosen.indices] == v).sum()) for v in values}
    selection = {
        "strategy": cal.strategy,
        "seed": cal.seed,
        "size": cal.size,
        "pool_size": len(pool),
        "pool_path": pool_path,
        "params": chosen.params.__dict__,
        "timestep_histogram": histogram,
        "indices": chosen.indices.tolist(),
        "sqnr_indices": chosen.sqnr_indices.tolist(),
    }
    title = f"{cal.strategy}, size {cal.size}, seed {cal.seed}"
    assert chosen.features is not None
    return {
        "calibration_path": str(save_trajectories(chosen.calibration, folder / "calibration_set.safetensors")),
        "sqnr_path": str(save_trajectories(chosen.sqnr, folder / "sqnr_inputs.safetensors")),
        "selection_path": str(write_json(selection, folder / "selection.json")),
        "histogram_png": str(
            timestep_histogram(pool.t, pool.t[chosen.indices], folder / "timestep_histogram.png", title)
        ),
        "pca_png": str(pca_projection(chosen.features, chosen.indices, pool.t, folder / "features_pca.png", title)),
        "size": int(chosen.indices.numel()),
        "selection_seconds": chosen.seconds,
    }


@task(name="quantize")
def quantize_task(
    spec: dict[str, Any], calibration_path: str, out_dir: str, plan_path: str | None = None
) -> dict[str, Any]:
    """Quantize with the given plan (or the spec's uniform plan), calibrate, save plan + scales.

    The policy (family defaults, group fallback, outlier tokens, output quantizers for
    ``export.target: onnxruntime``) is :func:`diffquant.quantize`'s.
    """
    cfg = spec_from_dict(spec)
    model = model_from_source(cfg.model.model_dump())
    plan = LayerPlan.load(Path(plan_path)) if plan_path is not None else None
    with spec_section("quantize"):
        result = quantize(
            model,
            cfg.quantize,
            load_trajectories(calibration_path),
            calibration=cfg.calibration,
            plan=plan,
            target=cfg.export.target,
        )
    plan_path, scales_path = save_quantized(model, result.plan, Path(out_dir) / "plan")
    return {
        "plan_path": str(plan_path),
        "scales_path": str(scales_path),
        "layers": len(result.plan),
        "quantized_layers": len(result.plan.quantized_layers()),
        "fp32_bytes": result.fp32_bytes,
        "packed_bytes": result.packed_bytes,
        "outlier_tokens": result.outlier_tokens.to_dict(),
    }
