"""The outlier methods end to end: statistics, smoothing (and its folds), low-rank split, shift.

:func:`calibrate_transforms` runs on the float denoiser before the plan is applied:

1. one pass of the calibration data records every shifted / smoothed layer's per-channel input
   range (and, for the alpha search, a sample of its inputs) and the producer of every layer's
   input (:mod:`diffquant.outliers.stats`);
2. smoothed layers are grouped by where ``1 / s`` can be folded, ``s`` is computed per group
   (fixed alpha, or searched), and folds that would change the float output fall back to an
   explicit multiply (:mod:`diffquant.outliers.folding`);
3. the weights are transformed (``W diag(s)`` and the folds), the low-rank factors are taken from
   the transformed weights, and the shift becomes ``c / s`` (the transformed input's units).

The float model's weights stay transformed (they are the plan's weights); layers smoothed by an
explicit multiply compute ``x / s`` only once :func:`install_transforms` has given the quantized
layers their buffers. :func:`restore_transforms` redoes the weight transforms from saved buffers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from diffquant.outliers.folding import SmoothGroup, apply_weight_transforms, check_folds, smoothing_groups
from diffquant.outliers.low_rank import low_rank_factors
from diffquant.outliers.smoothing import group_scales, search_alpha
from diffquant.outliers.stats import InputStats, observe_inputs
from diffquant.quant.modules import QuantConv2d, QuantLinear
from diffquant.quant.plan import LayerPlan

logger = logging.getLogger(__name__)


@dataclass
class TransformTensors:
    """Calibrated tensors of the outlier methods, per layer (float32, CPU).

    Attributes:
        smooth: ``s`` of every smoothed layer.
        shift: ``c`` of every shifted layer, in the units of its transformed input (``c_raw / s``).
        low_rank: ``(L1, L2)`` of every layer with a branch.
    """

    smooth: dict[str, torch.Tensor] = field(default_factory=dict)
    shift: dict[str, torch.Tensor] = field(default_factory=dict)
    low_rank: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def _decide_groups(
    unet: nn.Module,
    plan: LayerPlan,
    groups: list[SmoothGroup],
    stats: dict[str, InputStats],
    search_grid: int | None,
) -> tuple[LayerPlan, dict[str, torch.Tensor]]:
    """Alpha and ``s`` per group; a group whose search prefers no smoothing loses it."""
    plan = LayerPlan(plan)
    scales: dict[str, torch.Tensor] = {}
    for group in groups:
        alpha = plan[group.members[0]].smooth.alpha  # type: ignore[union-attr]
        if search_grid is not None:
            alpha = search_alpha(unet, plan, group, stats, search_grid)
        for name in group.members:
            cfg = plan[name]
            assert cfg.smooth is not None
            plan[name] = (
                replace(cfg, smooth=None) if alpha is None else replace(cfg, smooth=replace(cfg.smooth, alpha=alpha))
            )
        if alpha is not None:
            scale = group_scales(unet, plan, group, stats, alpha)
            scales.update(dict.fromkeys(group.members, scale))
    return plan, scales


def _with_groups(plan: LayerPlan, groups: list[SmoothGroup]) -> LayerPlan:
    out = LayerPlan(plan)
    for group in groups:
        for name in group.members:
            cfg = out[name]
            if cfg.smooth is not None:
                out[name] = replace(cfg, smooth=replace(cfg.smooth, into=group.into))
    return out


def calibrate_transforms(
    unet: nn.Module,
    plan: LayerPlan,
    run: Callable[[nn.Module], Any],
    *,
    fold: bool = True,
    search_grid: int | None = None,
    seed: int = 0,
) -> tuple[LayerPlan, TransformTensors]:
    """Calibrate the plan's shifts, smoothing and low-rank branches on the float ``unet``.

    Args:
        unet: The float denoiser; its weights are transformed in place (see the module docstring).
        plan: The plan with ``shift`` / ``smooth`` / ``low_rank`` entries (:mod:`diffquant.outliers.options`).
        run: Runs the calibration data through a module.
        fold: Look for folds of ``1 / s`` (False: keep the plan's ``smooth.into`` as it is).
        search_grid: Search alpha per group over ``k / search_grid`` (None: the plan's alpha).
        seed: Seed of the input sample kept for the search.

    Returns:
        The plan with each layer's alpha and fold target decided (smoothing dropped where the
        search preferred none), and the tensors for :func:`install_transforms`.
    """
    observed = [name for name, cfg in plan.items() if cfg.shift or cfg.smooth is not None]
    skip = {name: plan[name].fp_tokens for name in observed if plan[name].fp_tokens}
    observation = observe_inputs(unet, observed, run, skip, keep_samples=search_grid is not None, seed=seed)
    stats = observation.stats
    if fold:
        groups = smoothing_groups(unet, plan, observation, fold=True)
    else:
        groups = _given_groups(plan)
    plan, scales = _decide_groups(unet, plan, groups, stats, search_grid)
    groups = [group for group in groups if plan[group.members[0]].smooth is not None]
    if fold and observation.first_call is not None:
        groups = check_folds(unet, _with_groups(plan, groups), groups, scales, observation.first_call)
    plan = _with_groups(plan, groups)
    apply_weight_transforms(unet, plan, scales)
    tensors = TransformTensors(smooth=scales)
    for name, cfg in plan.items():
        if cfg.shift:
            shift = stats[name].midpoint
            tensors.shift[name] = shift / scales[name] if name in scales else shift
        if cfg.low_rank is not None:
            weight = unet.get_submodule(name).weight
            tensors.low_rank[name] = low_rank_factors(weight, cfg.low_rank.rank, cfg.low_rank.dtype)
    folded = sum(1 for cfg in plan.values() if cfg.smooth is not None and cfg.smooth.into is not None)
    logger.info(
        "outlier methods: %d shifted, %d smoothed (%d folded), %d low-rank layers",
        len(tensors.shift),
        len(scales),
        folded,
        len(tensors.low_rank),
    )
    return plan, tensors


def _given_groups(plan: LayerPlan) -> list[SmoothGroup]:
    """The groups a plan already states: layers folded into one module share it; the rest multiply."""
    by_target: dict[str, list[str]] = {}
    groups: list[SmoothGroup] = []
    for name, cfg in plan.items():
        if cfg.smooth is None:
            continue
        if cfg.smooth.into is None:
            groups.append(SmoothGroup((name,)))
        else:
            by_target.setdefault(cfg.smooth.into, []).append(name)
    groups += [SmoothGroup(tuple(names), into) for into, names in by_target.items()]
    return groups


def install_transforms(unet: nn.Module, tensors: TransformTensors) -> None:
    """Give the quantized layers (after ``apply_plan``) their calibrated buffers.

    A layer with a low-rank branch has its weight quantizer recalibrated on ``W - L1 L2``.
    """
    with torch.no_grad():
        for name, module in unet.named_modules():
            if not isinstance(module, (QuantLinear, QuantConv2d)):
                continue
            transform = module.input_transform
            if transform is not None and transform.smooth is not None:
                transform.smooth.copy_(tensors.smooth[name])
            if transform is not None and transform.shift is not None:
                transform.shift.copy_(tensors.shift[name])
            if module.low_rank is not None:
                set_branch_factors(module, *tensors.low_rank[name])


def set_branch_factors(module: QuantLinear | QuantConv2d, up: torch.Tensor, down: torch.Tensor) -> None:
    """Give a quantized layer's branch its factors and recalibrate its weight quantizer on the residual ``W - L1 L2``."""
    assert module.low_rank is not None and module.weight_quantizer is not None
    with torch.no_grad():
        module.low_rank.set_factors(up, down)
        module.weight_quantizer.calibrate_from(module.weight_to_quantize().detach())


def restore_transforms(unet: nn.Module, plan: LayerPlan) -> None:
    """Redo the plan's weight transforms on a quantized model whose buffers were loaded from a saved state."""
    scales = {}
    for name, cfg in plan.items():
        if cfg.smooth is not None:
            transform = unet.get_submodule(name).input_transform
            assert transform is not None and transform.smooth is not None
            scales[name] = transform.smooth.detach().clone()
    apply_weight_transforms(unet, plan, scales)
