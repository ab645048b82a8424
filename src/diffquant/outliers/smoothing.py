"""SmoothQuant's per-channel scales, and the per-layer search of alpha against the layer's output error.

``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` for input channel ``j``: ``max|X_j|`` over every
calibration input (all timesteps; of ``X - c`` when the layer is also shifted) and ``max|W_j|``
over every weight that multiplies channel ``j`` (over all layers of a group that shares ``s``).
Channels that are always zero, or whose weights are all zero, keep ``s = 1``.

The search (deepcompressor's, with ``beta = 1 - alpha``) tries ``alpha = k / grid`` for
``k = 0..grid`` and no smoothing at all, builds each candidate layer exactly as it will be quantized
(the plan's weight and input formats, shift and low-rank branch included), and keeps the candidate
with the smallest mean squared output error against the float layer on a sample of its calibration
inputs, summed over the group.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from diffquant.outliers.folding import SmoothGroup
from diffquant.outliers.low_rank import low_rank_factors
from diffquant.outliers.stats import InputStats
from diffquant.quant.formats import scale_from_absmax
from diffquant.quant.modules import QuantizerMode
from diffquant.quant.plan import LayerConfig, LayerPlan, SmoothConfig, apply_plan
from diffquant.quant.transforms import groups_of, scale_input_channels, weight_channel_absmax

SCALE_FLOOR = 1e-5
"""Smallest smoothing scale (and floor of the statistics it is computed from)."""


def activation_absmax(stats: InputStats, shifted: bool) -> torch.Tensor:
    """``max |X_j|`` per channel, or ``max |X_j - c_j|`` (half the range) when the layer is shifted."""
    return (stats.hi - stats.lo) / 2 if shifted else stats.absmax


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``max|X|^alpha / max|W|^(1 - alpha)`` per channel (1 where either is zero), float32 on the CPU."""
    act, weight = act_absmax.float().cpu(), weight_absmax.float().cpu()
    alive = (act > 0) & (weight > 0)
    scale = act.clamp_min(SCALE_FLOOR).pow(alpha) / weight.clamp_min(SCALE_FLOOR).pow(1.0 - alpha)
    return torch.where(alive, scale.clamp_min(SCALE_FLOOR), torch.ones_like(scale))


def group_scales(
    unet: nn.Module, plan: LayerPlan, group: SmoothGroup, stats: dict[str, InputStats], alpha: float
) -> torch.Tensor:
    """The shared ``s`` of a group at ``alpha``: activation and weight maxima taken over all its layers."""
    act = torch.stack([activation_absmax(stats[name], plan[name].shift) for name in group.members]).amax(dim=0)
    weights = []
    for name in group.members:
        layer = unet.get_submodule(name)
        weights.append(weight_channel_absmax(layer.weight, groups_of(layer)).cpu())
    return smoothing_scales(act, torch.stack(weights).amax(dim=0), alpha)


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer


def trial_layer(layer: nn.Module, cfg: LayerConfig, stats: InputStats, scale: torch.Tensor | None) -> nn.Module:
    """A quantized copy of ``layer`` as the plan would make it with smoothing scale ``scale`` (None: none).

    Its input scale comes from the full calibration range for the min-max observer, else from the
    observer run over the kept input sample.
    """
    holder = _Holder(copy.deepcopy(layer))
    if scale is not None:
        with torch.no_grad():
            weight = holder.layer.weight
            weight.copy_(scale_input_channels(weight, scale.to(weight.device), groups_of(layer)))
    trial = replace(cfg, fp_tokens=0, output=None, smooth=SmoothConfig(0.0) if scale is not None else None)
    apply_plan(holder, LayerPlan({"layer": trial}))
    quantized = holder.layer
    transform = quantized.input_transform
    c = stats.midpoint if cfg.shift else None
    with torch.no_grad():
        if transform is not None and transform.smooth is not None and scale is not None:
            transform.smooth.copy_(scale)
        if transform is not None and transform.shift is not None and c is not None:
            transform.shift.copy_(c / scale if scale is not None else c)
        if quantized.low_rank is not None and cfg.low_rank is not None:
            up, down = low_rank_factors(quantized.weight, cfg.low_rank.rank, cfg.low_rank.dtype)
            quantized.low_rank.set_factors(up, down)
            quantized.weight_quantizer.calibrate_from(quantized.weight_to_quantize().detach())
    _calibrate_input(quantized, cfg, stats, scale)
    return quantized


def _calibrate_input(quantized: nn.Module, cfg: LayerConfig, stats: InputStats, scale: torch.Tensor | None) -> None:
    quantizer = quantized.input_quantizer
    assert quantizer is not None and cfg.activation is not None
    if cfg.activation.observer == "minmax":
        absmax = activation_absmax(stats, cfg.shift)
        if scale is not None:
            absmax = absmax / scale
        with torch.no_grad():
            quantizer.scale.copy_(scale_from_absmax(absmax.max(), quantizer.fmt).reshape(()))
        quantizer.mode = QuantizerMode.QUANTIZE
        return
    assert stats.samples is not None
    quantizer.start_observing()
    with torch.no_grad():
        quantized(stats.samples.to(quantized.weight.device))
    quantizer.finish_observing()


def output_error(
    layer: nn.Module, quantized: nn.Module, samples: torch.Tensor, reference: torch.Tensor | None = None
) -> float:
    """Mean squared difference of the quantized and float layer's outputs on ``samples`` (``reference``: the float ones)."""
    with torch.no_grad():
        x = samples.to(layer.weight.device, layer.weight.dtype)
        if reference is None:
            reference = layer(x)
        return float((quantized(x).float() - reference.float()).pow(2).mean())


def search_alpha(
    unet: nn.Module, plan: LayerPlan, group: SmoothGroup, stats: dict[str, InputStats], grid: int
) -> float | None:
    """The alpha (or None: no smoothing) with the least summed output error over the group's layers."""
    references = {}
    for name in group.members:
        layer, samples = unet.get_submodule(name), stats[name].samples
        assert samples is not None
        with torch.no_grad():
            references[name] = layer(samples.to(layer.weight.device, layer.weight.dtype))
    best: tuple[float, float | None] = (float("inf"), None)
    for alpha in [None, *(k / grid for k in range(grid + 1))]:
        scale = None if alpha is None else group_scales(unet, plan, group, stats, alpha)
        error = 0.0
        for name in group.members:
            layer, samples = unet.get_submodule(name), stats[name].samples
            assert samples is not None
            trial = trial_layer(layer, plan[name], stats[name], scale)
            error += output_error(layer, trial, samples, references[name])
        if error < best[0]:
            best = (error, alpha)
    return best[1]
