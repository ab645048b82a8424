"""Where SmoothQuant's ``1 / s`` goes, and the weight transforms that smoothing makes.

A smoothed layer's weight becomes ``W diag(s)`` and its input must become ``x / s``. The division
costs nothing when the input is the output of

- a norm with a per-channel affine (GroupNorm, or LayerNorm over the last axis): ``gamma / s``,
  ``beta / s``;
- a Linear or Conv2d: its output rows (weight rows and bias) ``/ s``;
- the value projection of an attention block, for the block's output projection (``to_v`` for
  ``to_out.0``, ``v_proj`` for ``out_proj``): attention mixes tokens channel by channel, so
  value channel ``j`` is channel ``j`` of the output projection's input.

Every layer reading that output shares one ``s`` (a group, e.g. ``to_q/to_k/to_v`` after one norm),
and all of them must be smoothed; the producers are found from the float model's tensors
(:mod:`diffquant.outliers.stats`). A fold is then checked on the float model: the denoiser's output
on a calibration batch must not move (relative max difference below :data:`FOLD_TOLERANCE`);
a fold that changes it (another reader of the same output, a residual, a processor that is not
the standard one) is undone and its layers multiply by ``1 / s`` themselves instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffquant.outliers.stats import Observation, replay
from diffquant.quant.plan import LayerPlan
from diffquant.quant.transforms import groups_of, input_channels, scale_input_channels

logger = logging.getLogger(__name__)

FOLD_TOLERANCE = 1e-4
"""Largest change of the float denoiser's output a fold may make, relative to the output's max (float32)."""
HALF_FOLD_TOLERANCE = 1e-2
"""The same for a model held in float16 / bfloat16."""
CHECK_BATCH = 4
"""Inputs of the recorded calibration call on which a fold is checked."""
NORMS = (nn.GroupNorm, nn.LayerNorm)
ATTENTION_VALUE_OUTPUT = (("to_v", "to_out.0"), ("v_proj", "out_proj"))
"""(value projection, output projection) children of an attention block."""


@dataclass(frozen=True)
class SmoothGroup:
    """Layers smoothed with one shared ``s``, and the module ``1 / s`` is folded into (None: each multiplies)."""

    members: tuple[str, ...]
    into: str | None = None


def _fold_target_ok(module: nn.Module, channels: int) -> bool:
    """Whether ``module``'s output channels can absorb ``1 / s`` (a per-channel affine, or output rows)."""
    if isinstance(module, nn.GroupNorm):
        return module.affine and module.num_channels == channels
    if isinstance(module, nn.LayerNorm):
        return module.weight is not None and tuple(module.normalized_shape) == (channels,)
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return int(module.weight.shape[0]) == channels
    return False


def _value_projections(unet: nn.Module) -> dict[str, str]:
    """``{output projection: value projection}`` of every attention block with both as Linear layers."""
    pairs: dict[str, str] = {}
    for name, module in unet.named_modules():
        for value, output in ATTENTION_VALUE_OUTPUT:
            try:
                v, o = module.get_submodule(value), module.get_submodule(output)
            except AttributeError:
                continue
            if isinstance(v, nn.Linear) and isinstance(o, nn.Linear) and v.out_features == o.in_features:
                prefix = f"{name}." if name else ""
                pairs[prefix + output] = prefix + value
    return pairs


def smoothing_groups(
    unet: nn.Module, plan: LayerPlan, observation: Observation, fold: bool = True
) -> list[SmoothGroup]:
    """Group the plan's smoothed layers by the module their ``1 / s`` can be folded into.

    Args:
        unet: The float denoiser.
        plan: The plan (layers with ``smooth`` are grouped).
        observation: Producers of every Linear / Conv2d input (:func:`~diffquant.outliers.stats.observe_inputs`).
        fold: Look for folds at all (False: every layer multiplies by ``1 / s`` itself).
    """
    smoothed = [name for name, cfg in plan.items() if cfg.smooth is not None]
    if not fold:
        return [SmoothGroup((name,)) for name in smoothed]
    readers: dict[str, list[str]] = {}
    for name, producer in observation.producers.items():
        if producer is not None:
            readers.setdefault(producer, []).append(name)
    grouped: set[str] = set()
    groups: list[SmoothGroup] = []
    for producer, names in readers.items():
        module = unet.get_submodule(producer)
        channels = input_channels(unet.get_submodule(names[0]))
        cfg = plan.get(producer)
        usable = _fold_target_ok(module, channels) and not (cfg is not None and cfg.fp_tokens)
        if usable and all(name in plan and plan[name].smooth is not None for name in names):
            groups.append(SmoothGroup(tuple(sorted(names, key=smoothed.index)), producer))
            grouped |= set(names)
    values = _value_projections(unet)
    for name in smoothed:
        if name in grouped:
            continue
        value = values.get(name)
        if value is not None and observation.producers.get(name) is None and not _fp_tokens(plan, value):
            groups.append(SmoothGroup((name,), value))
        else:
            groups.append(SmoothGroup((name,)))
    order = {name: i for i, name in enumerate(smoothed)}
    return sorted(groups, key=lambda group: order[group.members[0]])


def _fp_tokens(plan: LayerPlan, name: str) -> bool:
    cfg = plan.get(name)
    return cfg is not None and cfg.fp_tokens > 0


def fold_into(module: nn.Module, scale: torch.Tensor) -> None:
    """Divide ``module``'s output channels by ``scale``: a norm's affine, or a layer's weight rows and bias."""
    with torch.no_grad():
        weight = module.weight
        s = scale.to(device=weight.device, dtype=weight.dtype)
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
            weight.copy_(weight / s)
        else:
            weight.copy_(weight / s.reshape(-1, *([1] * (weight.dim() - 1))))
        if module.bias is not None:
            module.bias.copy_(module.bias / s)


def apply_weight_transforms(unet: nn.Module, plan: LayerPlan, scales: Mapping[str, torch.Tensor]) -> None:
    """Make the weight changes the plan's smoothing implies, in place (float model or quantized one).

    Every smoothed layer's weight becomes ``W diag(s)``; then each fold target (``smooth.into``)
    divides its output channels by ``s`` once. The same function, in the same order, runs at
    quantization and when a saved model is loaded, so the weights agree bit for bit.

    Raises:
        ValueError: If layers folded into one module have different scales.
    """
    with torch.no_grad():
        for name, cfg in plan.items():
            if cfg.smooth is None:
                continue
            layer = unet.get_submodule(name)
            layer.weight.copy_(
                scale_input_channels(layer.weight, scales[name].to(layer.weight.device), groups_of(layer))
            )
    folded: dict[str, torch.Tensor] = {}
    for name, cfg in plan.items():
        if cfg.smooth is None or cfg.smooth.into is None:
            continue
        into, scale = cfg.smooth.into, scales[name]
        if into in folded:
            if not torch.equal(folded[into].cpu(), scale.cpu()):
                raise ValueError(f"layers folded into {into} have different smoothing scales")
            continue
        fold_into(unet.get_submodule(into), scale)
        folded[into] = scale


def _tolerance(unet: nn.Module) -> float:
    dtype = next((p.dtype for p in unet.parameters() if p.is_floating_point()), torch.float32)
    return FOLD_TOLERANCE if dtype == torch.float32 else HALF_FOLD_TOLERANCE


def _changed(reference: torch.Tensor, output: torch.Tensor, tolerance: float) -> bool:
    scale = float(reference.abs().max().clamp_min(1e-6))
    return not bool(torch.isfinite(output).all()) or float((output - reference).abs().max()) > tolerance * scale


def _snapshot(unet: nn.Module, groups: list[SmoothGroup]) -> dict[str, torch.Tensor]:
    names = {name for group in groups for name in (*group.members, group.into) if name is not None}
    state = {}
    for name in names:
        for key, value in unet.get_submodule(name).named_parameters(recurse=False):
            state[f"{name}.{key}"] = value.detach().clone()
    return state


def _restore(unet: nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for key, value in state.items():
            owner, attribute = key.rsplit(".", 1)
            getattr(unet.get_submodule(owner), attribute).copy_(value)


def _group_plan(plan: LayerPlan, groups: list[SmoothGroup]) -> LayerPlan:
    from dataclasses import replace

    out = LayerPlan()
    for group in groups:
        for name in group.members:
            cfg = plan[name]
            assert cfg.smooth is not None
            out[name] = replace(cfg, smooth=replace(cfg.smooth, into=group.into))
    return out


def _small(call: tuple[tuple[Any, ...], dict[str, Any]]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The recorded call cut to its first :data:`CHECK_BATCH` items (every tensor with the batch's leading size)."""
    args, kwargs = call
    batch = args[0].shape[0] if args and torch.is_tensor(args[0]) and args[0].dim() else None

    def cut(value: Any) -> Any:
        if batch is not None and torch.is_tensor(value) and value.dim() and value.shape[0] == batch:
            return value[:CHECK_BATCH]
        return value

    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def check_folds(
    unet: nn.Module,
    plan: LayerPlan,
    groups: list[SmoothGroup],
    scales: Mapping[str, torch.Tensor],
    call: tuple[tuple[Any, ...], dict[str, Any]],
) -> list[SmoothGroup]:
    """Keep the folds that leave the float denoiser's output unchanged; the others multiply instead.

    The folds into norms and value projections are applied to ``unet`` (float) together and its
    output on the first :data:`CHECK_BATCH` items of the recorded call compared with the unfolded
    output; where it moved, they are split in halves until each bad fold is found. Folds into a
    layer's output rows (which often also feed a residual) are checked one by one, then all kept
    folds together. ``unet`` is restored before returning.

    Returns:
        ``groups`` with ``into`` set to None where the fold changed the output.
    """
    folds = [group for group in groups if group.into is not None]
    if not folds:
        return groups
    tolerance = _tolerance(unet)
    call = _small(call)
    reference = replay(unet, call)
    state = _snapshot(unet, folds)

    def unchanged(candidates: list[SmoothGroup]) -> bool:
        _restore(unet, state)
        apply_weight_transforms(unet, _group_plan(plan, candidates), scales)
        return not _changed(reference, replay(unet, call), tolerance)

    def passing(candidates: list[SmoothGroup]) -> list[SmoothGroup]:
        if unchanged(candidates):
            return candidates
        if len(candidates) == 1:
            group = candidates[0]
            logger.info("smoothing of %s cannot fold into %s: the float output moves", group.members, group.into)
            return []
        half = len(candidates) // 2
        return passing(candidates[:half]) + passing(candidates[half:])

    # norms and value projections almost always fold; a layer's output often also feeds a residual
    values = _value_projections(unet)
    likely = [g for g in folds if isinstance(unet.get_submodule(g.into), NORMS) or values.get(g.members[0]) == g.into]
    try:
        kept = (passing(likely) if likely else []) + [g for g in folds if g not in likely and passing([g])]
        if len(kept) > 1 and kept != likely and not unchanged(kept):
            kept = []  # each fold alone is exact but not all of them together: fold nothing
    finally:
        _restore(unet, state)
    return [group if group.into is None or group in kept else SmoothGroup(group.members) for group in groups]
