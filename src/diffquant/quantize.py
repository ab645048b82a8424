"""From spec to quantized model: build the plan, apply it, calibrate, save and restore."""

from __future__ import annotations

import copy
from pathlib import Path

from diffquant.calibration import calibrate_activations
from diffquant.errors import SpecError
from diffquant.models.loading import DiffusionModel
from diffquant.quant.plan import (
    ActivationConfig,
    LayerPlan,
    WeightConfig,
    apply_plan,
    load_quantizer_state,
    quantizer_state,
    uniform_plan,
)
from diffquant.sampling import Trajectories
from diffquant.spec import CalibrationSpec, QuantizeSpec
from diffquant.storage import load_safetensors, save_safetensors


def plan_from_spec(model: DiffusionModel, quantize: QuantizeSpec, act_observer: str = "minmax") -> LayerPlan:
    """Resolve the spec's uniform plan (and its full-precision globs) against ``model``.

    Raises:
        SpecError: If a keep_full_precision glob matches no layer.
    """
    w = quantize.weight
    weight = WeightConfig(w.bits, w.granularity, w.observer) if w.bits is not None else None
    act = ActivationConfig(quantize.activation.bits, act_observer) if quantize.activation.bits is not None else None
    try:
        return uniform_plan(model.unet, weight, act, quantize.keep_full_precision)
    except ValueError as error:
        raise SpecError(f"quantize.keep_full_precision: {error}") from None


def quantize_model(
    model: DiffusionModel, plan: LayerPlan, calib: Trajectories, calibration: CalibrationSpec
) -> DiffusionModel:
    """Return a fake-quantized copy of ``model`` with calibrated activation scales."""
    quantized = copy.deepcopy(model)
    apply_plan(quantized.unet, plan)
    calibrate_activations(quantized.unet, calib, quantized.conditional, calibration.batch_size, calibration.seed)
    return quantized


def save_quantized(model: DiffusionModel, plan: LayerPlan, out_dir: Path) -> tuple[Path, Path]:
    """Write ``plan.json`` and ``quantizer_scales.safetensors`` to ``out_dir``."""
    out_dir = Path(out_dir)
    plan_path = plan.save(out_dir / "plan.json")
    scales_path = save_safetensors(quantizer_state(model.unet), out_dir / "quantizer_scales.safetensors")
    return plan_path, scales_path


def load_quantized(model: DiffusionModel, plan_path: Path, scales_path: Path) -> DiffusionModel:
    """Rebuild the quantized model from the FP model, a saved plan and saved scales."""
    quantized = copy.deepcopy(model)
    apply_plan(quantized.unet, LayerPlan.load(plan_path))
    load_quantizer_state(quantized.unet, load_safetensors(scales_path))
    return quantized
