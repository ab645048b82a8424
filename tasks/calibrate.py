"""Stages: select the calibration set, then quantize with the plan and calibrate activations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from diffquant.calibration import held_out_indices, select, subset
from diffquant.quant.plan import packed_weight_bytes
from diffquant.quantize import plan_from_spec, quantize_model, save_quantized
from diffquant.spec import spec_from_dict
from diffquant.storage import write_json
from tasks.common import load_trajectories, model_from_source, save_trajectories


@task(name="select-calibration")
def select_calibration_task(pool_path: str, spec: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """Select the calibration set and a disjoint SQNR set; record both index lists."""
    cfg = spec_from_dict(spec)
    pool = load_trajectories(pool_path)
    chosen = select(pool, cfg.calibration.strategy, cfg.calibration.size, cfg.calibration.seed)
    sqnr = held_out_indices(len(pool), chosen, cfg.evaluate.sqnr_inputs, cfg.calibration.seed)
    folder = Path(out_dir) / "calibration"
    selection = {
        "strategy": cfg.calibration.strategy,
        "seed": cfg.calibration.seed,
        "pool_size": len(pool),
        "indices": chosen.tolist(),
        "sqnr_indices": sqnr.tolist(),
    }
    return {
        "calibration_path": str(save_trajectories(subset(pool, chosen), folder / "calibration_set.safetensors")),
        "sqnr_path": str(save_trajectories(subset(pool, sqnr), folder / "sqnr_inputs.safetensors")),
        "selection_path": str(write_json(selection, folder / "selection.json")),
        "size": int(chosen.numel()),
    }


@task(name="quantize")
def quantize_task(spec: dict[str, Any], calibration_path: str, out_dir: str) -> dict[str, Any]:
    """Build the plan, quantize weights, calibrate activations and save plan + scales."""
    cfg = spec_from_dict(spec)
    model = model_from_source(cfg.model.model_dump())
    plan = plan_from_spec(model, cfg.quantize, cfg.calibration.observer)
    quantized = quantize_model(model, plan, load_trajectories(calibration_path), cfg.calibration)
    plan_path, scales_path = save_quantized(quantized, plan, Path(out_dir) / "plan")
    sizes = packed_weight_bytes(model.unet, plan)
    return {
        "plan_path": str(plan_path),
        "scales_path": str(scales_path),
        "layers": len(plan),
        "quantized_layers": len(plan.quantized_layers()),
        "fp32_bytes": sizes["fp32"],
        "packed_bytes": sizes["packed"],
    }
