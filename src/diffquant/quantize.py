"""From spec to quantized model: build the plan, apply it, calibrate, save and restore."""

from __future__ import annotations

import copy
from pathlib import Path

from diffquant.calibration import calibrate_activations
from diffquant.errors import SpecError
from diffquant.models.loading import DiffusionModel
from diffquant.quant.plan import (
    ActivationConfig,
    LayerConfig,
    LayerPlan,
    WeightConfig,
    apply_plan,
    load_quantizer_state,
    quantizer_state,
    resolve_globs,
    uniform_plan,
)
from diffquant.sampling import Trajectories
from diffquant.spec import CalibrationSpec, QuantizeSpec
from diffquant.storage import load_safetensors, save_safetensors


def plan_from_spec(model: DiffusionModel, quantize: QuantizeSpec, act_observer: str = "minmax") -> LayerPlan:
    """Resolve the spec's uniform plan, its overrides and full-precision globs against ``model``.

    Raises:
        SpecError: If a glob matches no layer.
    """
    w = quantize.weight

    def formats(w_bits: int | None, a_bits: int | None) -> tuple[WeightConfig | None, ActivationConfig | None]:
        weight = WeightConfig(w_bits, w.granularity, w.observer) if w_bits is not None else None
        return weight, ActivationConfig(a_bits, act_observer) if a_bits is not None else None

    plan = uniform_plan(model.unet, *formats(w.bits, quantize.activation.bits))
    for i, override in enumerate(quantize.overrides):
        try:
            names = resolve_globs(plan, override.layers)
        except ValueError as error:
            raise SpecError(f"quantize.overrides.{i}.layers: {error}") from None
        weight, act = formats(override.weight_bits, override.activation_bits)
        for name in names:
            plan[name] = LayerConfig(weight, act)
    try:
        keep = resolve_globs(plan, quantize.keep_full_precision)
    except ValueError as error:
        raise SpecError(f"quantize.keep_full_precision: {error}") from None
    for name in keep:
        plan[name] = LayerConfig(None, None)
    return plan


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
