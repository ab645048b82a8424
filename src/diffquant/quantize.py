"""From spec to quantized model: build the plan, apply it, calibrate, save and restore."""

from __future__ import annotations

import copy
import fnmatch
import logging
from collections.abc import Iterable
from pathlib import Path

from diffquant.calibration import calibrate_activations
from diffquant.errors import SpecError
from diffquant.models.loading import DiffusionModel
from diffquant.outlier_tokens import precompute_fp_tokens
from diffquant.quant.modules import groups_allowed
from diffquant.quant.plan import (
    ActivationConfig,
    LayerConfig,
    LayerPlan,
    WeightConfig,
    apply_plan,
    load_quantizer_state,
    quantizable_layers,
    quantizer_state,
    resolve_globs,
    with_output_quantizers,
)
from diffquant.sampling import Trajectories
from diffquant.spec import CalibrationSpec, QuantizeSpec
from diffquant.storage import load_safetensors, save_safetensors

logger = logging.getLogger(__name__)


def plan_from_spec(
    model: DiffusionModel, quantize: QuantizeSpec, act_observer: str = "minmax", target: str = "tensorrt"
) -> LayerPlan:
    """Resolve the spec's uniform plan, its overrides and full-precision globs against ``model``.

    With ``per_group`` weights, layers whose input channels the group size does not divide stay
    per-channel at the same bits (the plan records which). With ``target`` ``onnxruntime``
    (``export.target``), the Conv2d layers that can become integer convolutions in onnxruntime
    also get output quantizers (:func:`for_target`).

    Raises:
        SpecError: If a glob matches no layer.
    """
    w = quantize.weight
    fallback: list[str] = []

    def formats(
        name: str, w_bits: int | None, a_bits: int | None
    ) -> tuple[WeightConfig | None, ActivationConfig | None]:
        act = ActivationConfig(a_bits, act_observer) if a_bits is not None else None
        if w_bits is None:
            return None, act
        if w.group_size is not None and not groups_allowed(model.unet.get_submodule(name), w.group_size):
            fallback.append(name)
            return WeightConfig(w_bits, "per_channel", w.observer), act
        return WeightConfig(w_bits, w.granularity, w.observer, w.group_size), act

    plan = LayerPlan()
    for name in quantizable_layers(model.unet):
        plan[name] = LayerConfig(*formats(name, w.bits, quantize.activation.bits))
    for i, override in enumerate(quantize.overrides):
        try:
            names = resolve_globs(plan, override.layers)
        except ValueError as error:
            raise SpecError(f"quantize.overrides.{i}.layers: {error}") from None
        for name in names:
            plan[name] = LayerConfig(*formats(name, override.weight_bits, override.activation_bits))
    keep = family_defaults(model, plan) if quantize.keep_full_precision is None else set()
    try:
        keep |= resolve_globs(plan, quantize.keep_full_precision or [])
    except ValueError as error:
        raise SpecError(f"quantize.keep_full_precision: {error}") from None
    for name in keep:
        plan[name] = LayerConfig(None, None)
    if fallback:
        logger.info("%d layers cannot take groups of %s and stay per-channel", len(set(fallback)), w.group_size)
    return for_target(model, plan, target)


def for_target(model: DiffusionModel, plan: LayerPlan, target: str) -> LayerPlan:
    """The plan for an export target: unchanged for ``tensorrt``, with output quantizers for ``onnxruntime``.

    Raises:
        SpecError: If ``target`` is neither.
    """
    if target == "tensorrt":
        return plan
    if target != "onnxruntime":
        raise SpecError(f"export.target must be 'tensorrt' or 'onnxruntime', got {target!r}")
    planned = with_output_quantizers(model.unet, plan)
    added = sum(1 for name, cfg in planned.items() if cfg.output is not None and plan[name].output is None)
    logger.info("export.target onnxruntime: %d Conv2d layers get output quantizers", added)
    return planned


def family_defaults(model: DiffusionModel, names: Iterable[str]) -> set[str]:
    """The layers among ``names`` that the model family keeps in float by default."""
    names = list(names)
    keep: set[str] = set()
    for pattern in model.family_info.keep_full_precision:
        keep |= {name for name in names if fnmatch.fnmatchcase(name, pattern)}
    return keep


def quantize_model(
    model: DiffusionModel, plan: LayerPlan, calib: Trajectories, calibration: CalibrationSpec
) -> DiffusionModel:
    """Return a fake-quantized copy of ``model`` with calibrated activation scales.

    Layers that keep leading tokens in float (``fp_tokens``) get their precomputed outputs from
    the FP ``model`` before calibration.
    """
    quantized = copy.deepcopy(model)
    apply_plan(quantized.unet, plan)
    if any(cfg.fp_tokens for cfg in plan.values()):
        precompute_fp_tokens(model, quantized.unet, calib.labels)
    calibrate_activations(quantized.unet, calib, quantized.conditional, calibration.batch_size, calibration.seed)
    return quantized


def save_quantized(model: DiffusionModel, plan: LayerPlan, out_dir: Path) -> tuple[Path, Path]:
    """Write ``plan.json`` and ``quantizer_scales.safetensors`` to ``out_dir``."""
    out_dir = Path(out_dir)
    plan_path = plan.save(out_dir / "plan.json")
    scales_path = save_safetensors(quantizer_state(model.unet), out_dir / "quantizer_scales.safetensors")
    return plan_path, scales_path


def load_quantized(
    model: DiffusionModel, plan_path: Path, scales_path: Path, weights_path: Path | None = None
) -> DiffusionModel:
    """Rebuild the quantized model from the FP model, a saved plan and saved scales.

    Args:
        model: The FP model.
        plan_path: The LayerPlan.
        scales_path: Quantizer scales (:func:`save_quantized`).
        weights_path: Fine-tuned denoiser weights (safetensors of the whole state dict), if any.
    """
    quantized = copy.deepcopy(model)
    apply_plan(quantized.unet, LayerPlan.load(plan_path))
    load_quantizer_state(quantized.unet, load_safetensors(scales_path))
    if weights_path is not None:
        quantized.unet.load_state_dict(load_safetensors(Path(weights_path)), strict=True)
    return quantized
