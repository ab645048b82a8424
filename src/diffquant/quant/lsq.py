"""Learned step size quantization (LSQ, Esser et al. 2020).

The forward value equals :func:`diffquant.quant.formats.fake_quant` with the same scale; the
backward pass gives the input the straight-through gradient inside the range (0 where clamped)
and gives the step size LSQ's gradient ``round(x/s) - x/s`` inside and ``qmin``/``qmax`` outside,
multiplied by the gradient scale ``g = 1 / sqrt(N * qmax)`` (N: elements per scale).
"""

from __future__ import annotations

import math

import torch

from diffquant.quant.formats import IntFormat


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``scale``."""
    y = x * scale
    return (x - y).detach() + y


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round`` with a straight-through (identity) gradient."""
    return (x.round() - x).detach() + x


def lsq_fake_quant(x: torch.Tensor, step: torch.Tensor, fmt: IntFormat, elements_per_scale: int) -> torch.Tensor:
    """Fake-quantize ``x`` with a learnable step (``step`` must already broadcast against ``x``).

    Args:
        x: Values to quantize.
        step: Positive step sizes, broadcastable to ``x``.
        fmt: Integer format.
        elements_per_scale: N in LSQ's gradient scale ``1 / sqrt(N * qmax)``.
    """
    g = 1.0 / math.sqrt(max(elements_per_scale, 1) * fmt.qmax)
    s = grad_scale(step, g)
    q = torch.clamp(x / s, fmt.qmin, fmt.qmax)
    return round_ste(q) * s
