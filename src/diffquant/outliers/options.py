"""Which layers of a plan take the outlier methods a quantize config asks for.

- ``activation.shift: channel``: every layer with a quantized input;
- ``smooth``: the layers its ``layers`` globs match (None: all) that have a quantized input;
- ``low_rank``: the layers its ``layers`` globs match (None: all) that have a quantized weight,
  Linear or Conv2d with ``groups == 1``; a rank above ``min(out, in)`` of a chosen layer is refused.
  A layer with a branch takes no output quantizer (onnxruntime form): the branch's sum cannot be
  fused into ``QLinearConv``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from torch import nn

from diffquant.errors import ConfigError
from diffquant.quant.plan import LayerPlan, LowRankConfig, SmoothConfig, resolve_globs
from diffquant.quant.transforms import max_rank

logger = logging.getLogger(__name__)


def wants_methods(config: Any) -> bool:
    """Whether a quantize config turns on any outlier method."""
    return config.activation.shift != "none" or config.smooth is not None or config.low_rank is not None


def _chosen(plan: LayerPlan, patterns: list[str] | None, key: str) -> set[str]:
    if patterns is None:
        return set(plan)
    try:
        return resolve_globs(plan, patterns)
    except ValueError as error:
        raise ConfigError(key, str(error)) from None


def _low_rank_layers(unet: nn.Module, plan: LayerPlan, config: Any) -> set[str]:
    """The layers that get a branch; refuses ranks too large for a chosen layer."""
    low_rank = config.low_rank
    chosen = _chosen(plan, low_rank.layers, "low_rank.layers")
    out: set[str] = set()
    for name in sorted(chosen):
        if plan[name].weight is None:
            continue
        layer = unet.get_submodule(name)
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            if low_rank.layers is not None:
                raise ConfigError("low_rank.layers", f"layer {name} is a grouped convolution, which takes no branch")
            continue
        if low_rank.rank > max_rank(layer):
            raise ConfigError(
                "low_rank.rank",
                f"rank {low_rank.rank} is larger than min(out, in) = {max_rank(layer)} of layer {name}; "
                "lower the rank or leave the layer out of low_rank.layers",
            )
        out.add(name)
    return out


def add_outlier_methods(unet: nn.Module, plan: LayerPlan, config: Any) -> LayerPlan:
    """A copy of ``plan`` whose layers carry the shift / smoothing / low-rank branch ``config`` asks for.

    Args:
        unet: The float denoiser the plan is for.
        plan: The resolved plan (uniform or allocated).
        config: A :class:`diffquant.spec.QuantizeSpec`.

    Raises:
        ConfigError: A glob that matches no layer, a rank larger than a chosen layer's
            ``min(out, in)``, a grouped convolution named for a branch, or GPTQ rounding with any
            method (not supported yet).
    """
    if not wants_methods(config):
        return plan
    if config.weight is not None and config.weight.rounding == "gptq":
        raise ConfigError(
            "weight.rounding",
            "gptq cannot be combined with activation.shift, smooth or low_rank yet; use rounding nearest",
        )
    shift = config.activation.shift == "channel"
    smoothed = _chosen(plan, config.smooth.layers, "smooth.layers") if config.smooth is not None else set()
    branched = _low_rank_layers(unet, plan, config) if config.low_rank is not None else set()
    out = LayerPlan()
    dropped = 0
    for name, cfg in plan.items():
        if cfg.activation is not None:
            cfg = replace(cfg, shift=cfg.shift or shift)
            if name in smoothed:
                cfg = replace(cfg, smooth=SmoothConfig(config.smooth.alpha))
        if name in branched:
            dropped += cfg.output is not None
            cfg = replace(cfg, low_rank=LowRankConfig(config.low_rank.rank, config.low_rank.dtype), output=None)
        out[name] = cfg
    if dropped:
        logger.info("%d layers with a low-rank branch keep a float output (no output quantizer)", dropped)
    return out
