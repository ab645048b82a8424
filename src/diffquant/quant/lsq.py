"""Learned step size quantization (LSQ, Esser et al. 2020).

The forward value equals :func:`diffquant.quant.formats.fake_quant` with the same scale; the
backward pass gives the input the straight-through gradient inside the range (0 where clamped)
and gives the step size LSQ's gradient ``round(x/s) - x/s`` inside and ``qmin``/``qmax`` outside,
multiplied by the gradient scale ``g = 1 / sqrt(N * Q_P)`` (N: elements per scale, Q_P the
format's positive levels: ``qmax`` for integers). For a floating-point format the rounding is onto
its grid (:meth:`~diffquant.quant.float_formats.FloatFormat.round`), with the same gradients.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from diffquant.quant.formats import IntFormat, QuantFormat


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Exactly ``x`` in the forward pass; multiplies the gradient by ``scale``.

    (The common ``(x - x*g).detach() + x*g`` trick can change ``x`` in its last bit.)
    """
    return _GradScale.apply(x, scale)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Exactly ``round(x)`` forward, with a straight-through (identity) gradient."""
    return _RoundSTE.apply(x)


class _GridRoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fmt: Any) -> torch.Tensor:
        return fmt.round(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _round_to_grid_ste(x: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Exactly ``x`` rounded onto ``fmt``'s grid (integers or float values), with an identity gradient."""
    if isinstance(fmt, IntFormat):
        return round_ste(x)
    return _GridRoundSTE.apply(x, fmt)


def lsq_fake_quant(x: torch.Tensor, step: torch.Tensor, fmt: QuantFormat, elements_per_scale: int) -> torch.Tensor:
    """Fake-quantize ``x`` with a learnable step (``step`` must already broadcast against ``x``).

    Args:
        x: Values to quantize.
        step: Positive step sizes, broadcastable to ``x``.
        fmt: Integer or floating-point format.
        elements_per_scale: N in LSQ's gradient scale ``1 / sqrt(N * Q_P)``.
    """
    g = 1.0 / math.sqrt(max(elements_per_scale, 1) * fmt.positive_levels)
    s = grad_scale(step, g)
    q = torch.clamp(x / s, fmt.qmin, fmt.qmax)
    return _round_to_grid_ste(q, fmt) * s
