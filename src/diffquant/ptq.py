"""Post-training quantization of a denoiser: the plan, its policy, calibration, save and restore.

Every decision ``diffquant compress`` makes about a uniform or allocated plan lives here, so the
library call :func:`quantize` and the pipeline give byte-identical plans and scales:

- the uniform plan from ``quantize`` (overrides, then full-precision globs);
- the model family's full-precision layers when ``keep_full_precision`` is left unset;
- the group-size fallback: layers whose input channels the group size does not divide stay
  per-channel at the same bits;
- output quantizers for ``target="onnxruntime"`` (integer convolutions in onnxruntime);
- outlier tokens (MixDQ's BOS-aware quantization) for text-conditioned models;
- the outlier methods (per-channel input shift, SmoothQuant with its folds, SVDQuant's low-rank
  branch; :mod:`diffquant.outliers`), calibrated on the float model before range calibration.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from diffquant.calibration.ranges import ForwardLoop, calibrate_activations
from diffquant.devices import DeviceClass, plan_problems, resolve_device_class
from diffquant.errors import ConfigError
from diffquant.mixed_precision.allocate import allocate_plan, measure_allocation_sensitivity
from diffquant.mixed_precision.sensitivity import SensitivityTable
from diffquant.mixed_precision.solver import Allocation
from diffquant.models.families import FAMILIES, Family, matching_layers
from diffquant.models.loading import DiffusionModel
from diffquant.outlier_tokens import (
    OutlierTokens,
    apply_outlier_tokens,
    detect_outlier_tokens,
    fill_fp_tokens,
    fp_token_outputs,
)
from diffquant.outliers.calibrate import calibrate_transforms, install_transforms, restore_transforms
from diffquant.outliers.options import add_outlier_methods, wants_methods
from diffquant.quant.config import format_problem
from diffquant.quant.float_formats import FLOAT_FORMATS, NVFP4_BLOCK
from diffquant.quant.gptq import gptq_layers, gptq_solve, gptq_weight_state, install_gptq, load_gptq_weight_state
from diffquant.quant.modules import groups_allowed
from diffquant.quant.plan import (
    ActivationConfig,
    LayerConfig,
    LayerPlan,
    WeightConfig,
    apply_plan,
    deployed_weight_bytes,
    load_quantizer_state,
    packed_weight_bytes,
    quantizable_layers,
    quantizer_state,
    resolve_globs,
    with_output_quantizers,
)
from diffquant.sampling import Trajectories, denoiser_outputs
from diffquant.spec import (
    AllocationSpec,
    BudgetSpec,
    CalibrationSpec,
    LayerOverride,
    QuantizeSpec,
    SamplerSpec,
    SmoothSpec,
)
from diffquant.storage import load_safetensors, save_safetensors

logger = logging.getLogger(__name__)

ExportTarget = Literal["tensorrt", "onnxruntime"]
CalibrationData = Trajectories | ForwardLoop
"""A calibration set (from :func:`diffquant.select_calibration`) or a callable ``forward_loop(module)``."""


@dataclass
class QuantizeResult:
    """What :func:`quantize` did.

    Attributes:
        module: The quantized denoiser (the module passed in, changed in place).
        plan: The plan that was applied (after family defaults, fallbacks, target and outlier tokens).
        outlier_tokens: What outlier-token detection found (count 0 for non-text models).
        fp32_bytes: Parameter bytes of the float module.
        packed_bytes: Parameter bytes with quantized weights bit-packed (scales included).
        calibrated: Number of activation quantizers calibrated.
        deployed_bytes: Parameter bytes as the export for the device class stores them (INT2, INT4
            or INT8 integers, scales and zero points; :func:`diffquant.quant.plan.deployed_weight_bytes`).
    """

    module: nn.Module
    plan: LayerPlan
    outlier_tokens: OutlierTokens = field(default_factory=lambda: OutlierTokens(0, "off"))
    fp32_bytes: int = 0
    packed_bytes: int = 0
    calibrated: int = 0
    deployed_bytes: int = 0


def _denoiser(model: DiffusionModel | nn.Module, family: str | None) -> tuple[nn.Module, Family | None]:
    """The module to quantize and its family (from the model, the ``family`` name or the class name)."""
    if isinstance(model, DiffusionModel):
        return model.unet, model.family_info
    if family is not None:
        if family not in FAMILIES:
            raise ConfigError("family", f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
        return model, FAMILIES[family]
    name = type(model).__name__
    found = next((f for f in FAMILIES.values() if name in f.classes), None)
    if found is None:
        logger.info("%s is not a known diffusers denoiser class: no family full-precision defaults", name)
    return model, found


def family_defaults(family: Family | None, names: Iterable[str]) -> set[str]:
    """The layers among ``names`` that the model family keeps in float by default."""
    return matching_layers(family.keep_full_precision, list(names)) if family is not None else set()


def plan_from_spec(
    model: DiffusionModel | nn.Module,
    quantize: QuantizeSpec,
    act_observer: str = "minmax",
    target: ExportTarget = "tensorrt",
    family: str | None = None,
) -> LayerPlan:
    """Resolve the uniform plan, its overrides and full-precision globs against ``model``.

    With ``per_group`` weights, layers whose input channels the group size does not divide stay
    per-channel at the same bits. With ``target`` ``onnxruntime``, the Conv2d layers that can
    become integer convolutions in onnxruntime also get output quantizers (:func:`for_target`).

    Args:
        model: A loaded model, or a bare denoiser module.
        quantize: The uniform plan (``weight: None`` keeps weights in float).
        act_observer: Range observer of the input quantizers.
        target: Export form the plan is for.
        family: Model family of a bare module (default: detected from its class).

    Raises:
        ConfigError: If a glob matches no layer (the key names the field of ``quantize``).
    """
    unet, family_info = _denoiser(model, family)
    w = quantize.weight
    a_format = quantize.activation.format
    fallback: list[str] = []

    def formats(
        name: str, w_bits: int | None, a_bits: int | None
    ) -> tuple[WeightConfig | None, ActivationConfig | None]:
        act = ActivationConfig(a_bits, act_observer, a_format) if a_bits is not None else None
        if w_bits is None or w is None:
            return None, act
        if w.group_size is not None and not groups_allowed(unet.get_submodule(name), w.group_size):
            fallback.append(name)
            return WeightConfig(w_bits, "per_channel", w.observer, rounding=w.rounding), act
        return WeightConfig(w_bits, w.granularity, w.observer, w.group_size, rounding=w.rounding, format=w.format), act

    plan = LayerPlan()
    for name in quantizable_layers(unet):
        plan[name] = LayerConfig(*formats(name, w.bits if w else None, quantize.activation.bits))
    for i, override in enumerate(quantize.overrides):
        _check_override_formats(i, override, quantize)
        try:
            names = resolve_globs(plan, override.layers)
        except ValueError as error:
            raise ConfigError(f"overrides.{i}.layers", str(error)) from None
        for name in names:
            plan[name] = LayerConfig(*formats(name, override.weight_bits, override.activation_bits))
    keep = family_defaults(family_info, plan) if quantize.keep_full_precision is None else set()
    try:
        keep |= resolve_globs(plan, quantize.keep_full_precision or [])
    except ValueError as error:
        raise ConfigError("keep_full_precision", str(error)) from None
    for name in keep:
        plan[name] = LayerConfig(None, None)
    if w is not None and w.is_float:
        _check_float_blocks(unet, plan, fallback)
    if fallback:
        logger.info("%d layers cannot take groups of %s and stay per-channel", len(set(fallback)), w and w.group_size)
    return for_target(unet, plan, target)


def _check_override_formats(index: int, override: LayerOverride, quantize: QuantizeSpec) -> None:
    """An override's bits must fit the uniform plan's float formats, which its layers keep.

    Raises:
        ConfigError (``overrides.N.weight_bits`` / ``overrides.N.activation_bits``).
    """
    parts = (
        ("weight_bits", override.weight_bits, quantize.weight.format if quantize.weight else "int"),
        ("activation_bits", override.activation_bits, quantize.activation.format),
    )
    for key, bits, fmt in parts:
        if format_problem(fmt, bits) is not None:
            width = FLOAT_FORMATS[fmt].bits
            raise ConfigError(
                f"overrides.{index}.{key}",
                f"its layers keep the uniform format {fmt}, which stores {width} bits; set {key} to {width} or null",
            )


def _check_float_blocks(unet: nn.Module, plan: LayerPlan, fallback: list[str]) -> None:
    """NVFP4 weights need whole blocks: a planned layer whose input count the block does not divide is refused.

    Raises:
        ConfigError (``weight``): Naming the first such layer, its input count and what to do.
    """
    for name in dict.fromkeys(fallback):
        if not plan[name].is_full_precision and plan[name].weight is not None:
            layer = unet.get_submodule(name)
            inputs = layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features
            raise ConfigError(
                "weight",
                f"layer {name} has {inputs} input channels, not a multiple of {NVFP4_BLOCK}: format fp4_e2m1 "
                "(NVFP4) stores whole blocks of 16; keep the layer in float (keep_full_precision) or pick another format",
            )


def for_target(unet: DiffusionModel | nn.Module, plan: LayerPlan, target: ExportTarget) -> LayerPlan:
    """The plan for an export target: unchanged for ``tensorrt``, with output quantizers for ``onnxruntime``.

    Raises:
        ConfigError: If ``target`` is neither.
    """
    if isinstance(unet, DiffusionModel):
        unet = unet.unet
    if target == "tensorrt":
        return plan
    if target != "onnxruntime":
        raise ConfigError("target", f"must be 'tensorrt' or 'onnxruntime', got {target!r}")
    planned = with_output_quantizers(unet, plan)
    added = sum(1 for name, cfg in planned.items() if cfg.output is not None and plan[name].output is None)
    logger.info("export target onnxruntime: %d Conv2d layers get output quantizers", added)
    return planned


def check_outlier_methods(model: DiffusionModel | nn.Module, config: QuantizeSpec, family: str | None = None) -> None:
    """Refuse outlier-method settings the model cannot take (globs, ranks), without running it.

    The CLI calls this before a run starts, so ``quantize.low_rank.rank`` larger than a layer's
    ``min(out, in)`` fails in one line before anything is written.

    Raises:
        ConfigError: As :func:`diffquant.outliers.options.add_outlier_methods` (and bad globs).
    """
    if not wants_methods(config):
        return
    unet, _ = _denoiser(model, family)
    add_outlier_methods(unet, plan_from_spec(model, config, family=family), config)


class _ConditionRecorder:
    """Records the condition (third positional argument) of every call of the wrapped denoiser."""

    def __init__(self) -> None:
        self.conditions: list[torch.Tensor] = []

    def __call__(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        if len(args) > 2 and torch.is_tensor(args[2]):
            self.conditions.append(args[2].detach())


def _conditions(unet: nn.Module, data: CalibrationData) -> torch.Tensor | None:
    """The conditions the calibration data feeds the denoiser (one FP pass for a forward loop)."""
    if isinstance(data, Trajectories):
        return data.labels
    recorder = _ConditionRecorder()
    handle = unet.register_forward_pre_hook(recorder)
    try:
        with torch.no_grad():
            data(unet)
    finally:
        handle.remove()
    return torch.cat(recorder.conditions) if recorder.conditions else None


def _outlier_tokens(
    model: DiffusionModel | nn.Module, mode: str | int, conditions: torch.Tensor | None, batch_size: int
) -> OutlierTokens:
    if not isinstance(model, DiffusionModel) or model.condition != "text" or mode == "off" or conditions is None:
        return OutlierTokens(0, str(mode))
    try:
        return detect_outlier_tokens(model, conditions, mode, batch_size=batch_size)
    except ValueError as error:
        raise ConfigError("outlier_tokens", str(error)) from None


def _runner(data: CalibrationData, conditional: bool, batch_size: int) -> ForwardLoop:
    """A callable running the calibration data through a module (a forward loop as it is)."""
    if isinstance(data, Trajectories):
        return lambda module: denoiser_outputs(module, data, conditional, batch_size)
    return data


def apply_and_calibrate(
    unet: nn.Module,
    plan: LayerPlan,
    data: CalibrationData,
    conditional: bool = True,
    calibration: CalibrationSpec | None = None,
    conditions: torch.Tensor | None = None,
    smooth: SmoothSpec | None = None,
) -> tuple[int, LayerPlan]:
    """Apply ``plan`` to ``unet`` in place and calibrate its activation scales on ``data``.

    Layers that keep leading tokens in float (``fp_tokens``) get their precomputed outputs from
    the float ``unet`` before the plan replaces its layers. Layers whose weight rounding is
    ``gptq`` get their GPTQ weights and scales from Hessians of the float ``unet`` on ``data``
    (:mod:`diffquant.quant.gptq`), before activation calibration. Layers with a shift, smoothing
    or a low-rank branch get them from the float ``unet`` on ``data``
    (:func:`diffquant.outliers.calibrate.calibrate_transforms`): with ``smooth`` given, fold
    targets are found (``smooth.fold``) and alpha is searched (``smooth.search``); without it,
    the plan's alpha and fold targets are used as they are.

    Raises:
        ConfigError: If a GPTQ layer sees too few calibration inputs for its Hessian.

    Returns:
        The number of activation quantizers calibrated, and the plan as applied (fold targets and
        searched alphas decided).
    """
    calibration = calibration or CalibrationSpec()
    if conditions is None and isinstance(data, Trajectories):
        conditions = data.labels
    run = _runner(data, conditional, calibration.batch_size)
    solutions = gptq_solve(unet, plan, run) if gptq_layers(plan) else {}
    fp_outputs = fp_token_outputs(unet, plan, conditions) if conditions is not None else {}
    tensors = None
    if plan.has_transforms:
        search = smooth.grid if smooth is not None and smooth.search else None
        fold = smooth is not None and smooth.fold
        plan, tensors = calibrate_transforms(unet, plan, run, fold=fold, search_grid=search, seed=calibration.seed)
    apply_plan(unet, plan)
    if tensors is not None:
        install_transforms(unet, tensors)
    install_gptq(unet, solutions)
    fill_fp_tokens(unet, fp_outputs)
    calibrated = calibrate_activations(unet, data, conditional, calibration.batch_size, calibration.seed)
    return calibrated, plan


def quantize(
    model: DiffusionModel | nn.Module,
    config: QuantizeSpec | None = None,
    forward_loop: CalibrationData | None = None,
    *,
    calibration: CalibrationSpec | None = None,
    plan: LayerPlan | None = None,
    target: ExportTarget = "tensorrt",
    family: str | None = None,
    device_class: str | DeviceClass | None = None,
) -> QuantizeResult:
    """Quantize a denoiser in place: fake-quant layers with calibrated scales, and its plan.

    Args:
        model: A loaded model (:func:`diffquant.load_model`) or a bare denoiser module such as
            ``pipe.unet`` (family detected from its class, or given by ``family``).
        config: The uniform plan and its options (default: W8A8 per-channel weights, min-max
            ranges, the family's full-precision layers); its ``outlier_tokens`` applies to
            ``plan`` too.
        forward_loop: Calibration data: a calibration set (:func:`diffquant.select_calibration`)
            or a callable that runs the module over the caller's data, as in ModelOpt.
        calibration: Observer, batch size and seed of range calibration (``observer`` is the
            input quantizers' range observer).
        plan: An allocated plan (:func:`diffquant.auto_quantize`) to apply instead of the uniform one.
        target: Export form: ``tensorrt`` (default) or ``onnxruntime`` (adds output quantizers).
        family: Model family of a bare module (``unet2d``, ``dit``, ``text-unet``, ``sdxl``, ``pixart``).
        device_class: The device class the plan is for (:mod:`diffquant.devices`; None: the
            target's default, ``tensorrt`` -> ``orin``); a plan it cannot run is refused before
            calibration. Its storage types give ``deployed_bytes``.

    Returns:
        The quantized module, its plan, what outlier-token detection found and the sizes.

    Raises:
        ConfigError: A glob that matches nothing, an impossible forced outlier-token count,
            no calibration data, too few calibration inputs for a GPTQ layer's Hessian
            (``weight.rounding``), or a layer the device class cannot run (``weight``, naming
            the layer and the class).

    Example:
        >>> import diffquant
        >>> model = diffquant.load_model("digits-unet")
        >>> pool = diffquant.collect_pool(model, trajectories=8)
        >>> data = diffquant.select_calibration(pool, model, diffquant.CalibrationSpec(size=64)).calibration
        >>> result = diffquant.quantize(model, diffquant.QuantizeSpec(), data)
        >>> len(result.plan.quantized_layers()) > 0
        True
    """
    config = config or QuantizeSpec()
    calibration = calibration or CalibrationSpec()
    if forward_loop is None:
        raise ConfigError("forward_loop", "calibration data is required (a calibration set or a callable)")
    unet, _ = _denoiser(model, family)
    conditional = model.conditional if isinstance(model, DiffusionModel) else True
    if plan is None:
        plan = plan_from_spec(model, config, calibration.observer, target, family)
    else:
        plan = for_target(unet, plan, target)
    device = check_device_plan(unet, plan, device_class, target)
    text = isinstance(model, DiffusionModel) and model.condition == "text"
    conditions = _conditions(unet, forward_loop) if text and config.outlier_tokens != "off" else None
    outliers = _outlier_tokens(model, config.outlier_tokens, conditions, calibration.batch_size)
    plan = add_outlier_methods(unet, apply_outlier_tokens(plan, outliers), config)
    fp32_bytes = packed_weight_bytes(unet, plan)["fp32"]
    calibrated, plan = apply_and_calibrate(
        unet, plan, forward_loop, conditional, calibration, conditions, smooth=config.smooth
    )
    packed = packed_weight_bytes(unet, plan)["packed"]
    deployed = deployed_weight_bytes(unet, plan, device)
    return QuantizeResult(unet, plan, outliers, fp32_bytes, packed, calibrated, deployed)


def check_device_plan(
    unet: nn.Module, plan: LayerPlan, device_class: str | DeviceClass | None = None, target: ExportTarget = "tensorrt"
) -> DeviceClass:
    """Refuse a plan the device class (None: the target's default) cannot run, naming the first layer.

    Returns:
        The device class, resolved.

    Raises:
        ConfigError (``weight``): A layer the class cannot run (formats, groups, FP4 on a convolution).
    """
    device = resolve_device_class(device_class, target)
    modules = dict(unet.named_modules())
    kinds = {name: "conv" if isinstance(modules[name], nn.Conv2d) else "linear" for name in plan if name in modules}
    problems = plan_problems(device, plan, kinds)
    if problems:
        layer, reason = problems[0]
        more = f" (and {len(problems) - 1} more layers)" if len(problems) > 1 else ""
        raise ConfigError("weight", f"layer {layer} cannot run on {device.name}: {reason}{more}")
    return device


@dataclass
class AutoQuantizeResult:
    """What :func:`auto_quantize` did.

    Attributes:
        module: The quantized denoiser (changed in place).
        plan: The allocated plan as applied.
        allocation: The integer program's answer (choice per layer, objective, budget usage).
        sensitivity: The per-layer x per-option sensitivity table it was solved on.
        quantized: The quantization step's result (sizes, outlier tokens).
    """

    module: nn.Module
    plan: LayerPlan
    allocation: Allocation
    sensitivity: SensitivityTable
    quantized: QuantizeResult


def weight_observer(config: QuantizeSpec) -> str:
    """The weight range observer of a quantize config (min-max when weights stay float)."""
    return config.weight.observer if config.weight is not None else "minmax"


def weight_rounding(config: QuantizeSpec) -> str:
    """The weight rounding of a quantize config (``nearest`` when weights stay float)."""
    return config.weight.rounding if config.weight is not None else "nearest"


def auto_quantize(
    model: DiffusionModel,
    config: AllocationSpec,
    forward_loop: Trajectories,
    budget: BudgetSpec | None = None,
    *,
    quantize_config: QuantizeSpec | None = None,
    calibration: CalibrationSpec | None = None,
    steps: int | SamplerSpec = 50,
    seed: int = 0,
    classifier: nn.Module | None = None,
    target: ExportTarget = "tensorrt",
    sensitivity: SensitivityTable | None = None,
    device_class: str | None = None,
) -> AutoQuantizeResult:
    """Mixed precision: measure per-layer sensitivity, solve the integer program, quantize in place.

    The sensitivity is measured in the form the plan is applied: with GPTQ weights when
    ``quantize_config.weight.rounding`` is ``gptq`` (and the plan is applied with GPTQ), with text
    models' outlier tokens in float (``quantize_config.outlier_tokens``); the family's
    full-precision layers stay in float unless ``config.quantize_family_fp_layers``.

    Args:
        model: A loaded float model (:func:`diffquant.load_model`).
        config: Candidates, objective, ties, pins (and the budget, unless ``budget`` is given).
        forward_loop: The calibration set (sensitivity needs denoiser inputs, not a callable).
        budget: Overrides ``config.budget``, e.g. ``BudgetSpec(avg_weight_bits=4.0)``.
        quantize_config: Weight observer and rounding, and outlier-token mode (default :class:`QuantizeSpec`).
        calibration: Activation observer, batch size and seed of range calibration.
        steps: Sampler (or DDIM step count) of the final-sample probes.
        seed: Evaluation seed; probes draw their noise from ``seed + 1``.
        classifier: Evaluation classifier (``content_metric: classifier_kl`` needs it).
        target: Export form the plan is for.
        sensitivity: A table measured before for the same model, data and config (skips the measurement).
        device_class: The device class the plan is for (``orin``, ..., ``cpu``; :mod:`diffquant.devices`);
            only options it runs are offered. None: the target's default (``tensorrt`` -> ``orin``,
            ``onnxruntime`` -> ``cpu``), as ``export.device_class`` in a spec.

    Raises:
        ConfigError: Bad globs, pins or latency table, or a device class that does not run ``target``.
        diffquant.mixed_precision.solver.AllocationInfeasibleError: When the budget cannot be met.

    Example:
        >>> result = diffquant.auto_quantize(model, diffquant.AllocationSpec(), data,
        ...                                  diffquant.BudgetSpec(avg_weight_bits=4.0))
        >>> result.allocation.usage["avg_weight_bits"] <= 4.0
        True
    """
    if budget is not None:
        config = config.model_copy(update={"budget": budget})
        config = AllocationSpec.model_validate(config.model_dump())
    quantize_config = quantize_config or QuantizeSpec()
    calibration = calibration or CalibrationSpec()
    observers = {"weight_observer": weight_observer(quantize_config), "activation_observer": calibration.observer}
    rounding = weight_rounding(quantize_config)
    if sensitivity is None:
        sensitivity = measure_allocation_sensitivity(
            model,
            forward_loop,
            config,
            steps=steps,
            seed=seed,
            classifier=classifier,
            weight_rounding=rounding,
            outlier_tokens=quantize_config.outlier_tokens,
            batch_size=calibration.batch_size,
            **observers,
        )
    device = resolve_device_class(device_class, target)
    plan, allocation = allocate_plan(
        model, forward_loop, config, sensitivity, **observers, device_class=device, weight_rounding=rounding
    )
    result = quantize(
        model, quantize_config, forward_loop, calibration=calibration, plan=plan, target=target, device_class=device
    )
    return AutoQuantizeResult(result.module, result.plan, allocation, sensitivity, result)


def quantize_model(
    model: DiffusionModel, plan: LayerPlan, calib: Trajectories, calibration: CalibrationSpec
) -> DiffusionModel:
    """Return a fake-quantized copy of ``model`` with ``plan`` applied and calibrated (``model`` is kept).

    A plan with outlier methods is taken as it is (its alphas and fold targets).
    """
    quantized = copy.deepcopy(model)
    apply_and_calibrate(quantized.unet, plan, calib, model.conditional, calibration)
    return quantized


def save_quantized(model: DiffusionModel | nn.Module, plan: LayerPlan, out_dir: Path) -> tuple[Path, Path]:
    """Write ``plan.json`` and ``quantizer_scales.safetensors`` to ``out_dir``.

    The scales file also holds ``<layer>.weight`` of the GPTQ layers (their float weights were
    replaced) and the outlier methods' tensors (``s``, ``c``, ``L1``, ``L2``), from which
    :func:`load_quantized` redoes the weight transforms.

    Example:
        >>> plan_path, scales_path = diffquant.save_quantized(model, result.plan, Path("out"))
    """
    unet = model.unet if isinstance(model, DiffusionModel) else model
    out_dir = Path(out_dir)
    plan_path = plan.save(out_dir / "plan.json")
    state = quantizer_state(unet) | gptq_weight_state(unet, plan)
    scales_path = save_safetensors(state, out_dir / "quantizer_scales.safetensors")
    return plan_path, scales_path


def load_quantized(
    model: DiffusionModel,
    plan_path: Path,
    scales_path: Path,
    weights_path: Path | None = None,
    *,
    inplace: bool = False,
) -> DiffusionModel:
    """Rebuild the quantized model from the FP model, a saved plan and saved scales.

    Args:
        model: The FP model.
        plan_path: The LayerPlan.
        scales_path: Quantizer scales (:func:`save_quantized`).
        weights_path: Fine-tuned denoiser weights (safetensors of the whole state dict), if any.
        inplace: Quantize ``model`` itself (no float copy stays behind, e.g. on the device);
            False leaves it float and returns a copy.

    Example:
        >>> quantized = diffquant.load_quantized(diffquant.load_model("digits-unet"), plan_path, scales_path)
    """
    quantized = model if inplace else copy.deepcopy(model)
    plan = LayerPlan.load(plan_path)
    apply_plan(quantized.unet, plan)
    state = load_gptq_weight_state(quantized.unet, plan, load_safetensors(scales_path))
    load_quantizer_state(quantized.unet, state)
    restore_transforms(quantized.unet, plan)
    if weights_path is not None:
        quantized.unet.load_state_dict(load_safetensors(Path(weights_path)), strict=True)
    return quantized
