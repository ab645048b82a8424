"""Stages: select the calibration set, then quantize with the plan and calibrate activations."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from prefect import task

from diffquant.calibration import held_out_indices, pool_features, select, subset
from diffquant.errors import SpecError
from diffquant.outlier_tokens import apply_outlier_tokens, detect_outlier_tokens
from diffquant.quant.plan import LayerPlan, packed_weight_bytes
from diffquant.quantize import for_target, plan_from_spec, quantize_model, save_quantized
from diffquant.report import pca_projection, timestep_histogram
from diffquant.selection import SelectionParams
from diffquant.spec import spec_from_dict
from diffquant.storage import write_json
from tasks.common import load_trajectories, model_from_source, save_trajectories


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
    start = time.perf_counter()
    model = model_from_source(cfg.model.model_dump())
    module = cal.feature_module or model.family_info.feature_module
    features = pool_features(model.unet, pool, model.conditional, module)
    params = SelectionParams(
        normal_mean=cal.normal_mean,
        normal_std=cal.normal_std,
        num_train_timesteps=int(model.scheduler_config.get("num_train_timesteps", 1000)),
        radius=cal.radius,
        diversity_weight=cal.diversity_weight,
    )
    chosen = select(pool, cal.strategy, cal.size, cal.seed, features, params)
    seconds = time.perf_counter() - start
    sqnr = held_out_indices(len(pool), chosen, cfg.evaluate.sqnr_inputs, cal.seed)
    folder = Path(out_dir) / "calibration"
    values = torch.unique(pool.t)
    histogram = {int(v): int((pool.t[chosen] == v).sum()) for v in values}
    selection = {
        "strategy": cal.strategy,
        "seed": cal.seed,
        "size": cal.size,
        "pool_size": len(pool),
        "pool_path": pool_path,
        "params": params.__dict__,
        "timestep_histogram": histogram,
        "indices": chosen.tolist(),
        "sqnr_indices": sqnr.tolist(),
    }
    title = f"{cal.strategy}, size {cal.size}, seed {cal.seed}"
    return {
        "calibration_path": str(save_trajectories(subset(pool, chosen), folder / "calibration_set.safetensors")),
        "sqnr_path": str(save_trajectories(subset(pool, sqnr), folder / "sqnr_inputs.safetensors")),
        "selection_path": str(write_json(selection, folder / "selection.json")),
        "histogram_png": str(timestep_histogram(pool.t, pool.t[chosen], folder / "timestep_histogram.png", title)),
        "pca_png": str(pca_projection(features, chosen, pool.t, folder / "features_pca.png", title)),
        "size": int(chosen.numel()),
        "selection_seconds": seconds,
    }


@task(name="quantize")
def quantize_task(
    spec: dict[str, Any], calibration_path: str, out_dir: str, plan_path: str | None = None
) -> dict[str, Any]:
    """Quantize with the given plan (or the spec's uniform plan), calibrate, save plan + scales.

    With ``export.target: onnxruntime`` the plan gains output quantizers on the Conv2d layers
    that onnxruntime can run as integer convolutions (calibrated with the input quantizers).
    """
    cfg = spec_from_dict(spec)
    model = model_from_source(cfg.model.model_dump())
    if plan_path is not None:
        plan = for_target(model, LayerPlan.load(Path(plan_path)), cfg.export.target)
    else:
        plan = plan_from_spec(model, cfg.quantize, cfg.calibration.observer, cfg.export.target)
    calib = load_trajectories(calibration_path)
    try:
        outliers = detect_outlier_tokens(model, calib.labels, cfg.quantize.outlier_tokens)
    except ValueError as error:
        raise SpecError(f"quantize.outlier_tokens: {error}") from None
    plan = apply_outlier_tokens(plan, outliers)
    quantized = quantize_model(model, plan, calib, cfg.calibration)
    plan_path, scales_path = save_quantized(quantized, plan, Path(out_dir) / "plan")
    sizes = packed_weight_bytes(model.unet, plan)
    return {
        "plan_path": str(plan_path),
        "scales_path": str(scales_path),
        "layers": len(plan),
        "quantized_layers": len(plan.quantized_layers()),
        "fp32_bytes": sizes["fp32"],
        "packed_bytes": sizes["packed"],
        "outlier_tokens": outliers.to_dict(),
    }
