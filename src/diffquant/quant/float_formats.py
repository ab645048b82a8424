"""Low-bit floating-point formats (FP8, FP6, FP4) and their fake quant.

A format ``ExMy`` has a sign bit, ``x`` exponent bits with bias ``2**(x-1) - 1``, ``y`` mantissa
bits and subnormals; there are no infinities, and values beyond the largest finite magnitude
saturate to it (TensorRT's ``castToFp8(clip(x / s, -448, 448))`` and ONNX ``QuantizeLinear`` with
``saturate=1``). Rounding is to the nearest representable value, ties to the even mantissa.

========== ===== ======== ============================================================
name       bits  largest  notes
========== ===== ======== ============================================================
fp8_e4m3   8     448      OCP/NVIDIA E4M3 "fn" (S.1111.111 is NaN); TensorRT's FP8
fp8_e5m2   8     57344    E5M2 (IEEE-like; saturating here, no infinities produced)
fp6_e3m2   6     28       OCP MX FP6 E3M2
fp6_e2m3   6     7.5      OCP MX FP6 E2M3
fp4_e2m1   4     6        OCP MX / NVFP4 element; weights in blocks of 16 (NVFP4 layout)
========== ===== ======== ============================================================

Quantization is ``s * round_fmt(clamp(x / s, -max, max))`` with a float32 scale ``s`` (per
tensor, per channel, or per block): the same operations as the integer formats with the integer
grid replaced by the format's values. The exponent bias of the papers' per-tensor format search
(arXiv 2408.06995) is a power-of-two factor of the scale, so a free float32 scale subsumes it.

**NVFP4** (``fp4_e2m1`` weights): blocks of :data:`NVFP4_BLOCK` input channels, each block with an
FP8 E4M3 scale code, and one float32 global scale per tensor: the block's scale is
``code * global`` (computed in float32, as ONNX's ``DequantizeLinear`` of the codes computes it),
with ``global = absmax(W) / (6 * 448)`` and ``code = round_e4m3(absmax(block) / 6 / global)``
(NVIDIA's recipe; a zero block takes the smallest E4M3 code, so every scale is positive).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from types import MappingProxyType

import torch

from diffquant.quant.formats import SCALE_EPS, group_view

NVFP4_BLOCK = 16
"""Input channels per NVFP4 block (one FP8 E4M3 scale code each)."""


@dataclass(frozen=True)
class FloatFormat:
    """A signed floating-point format ``E<exponent_bits>M<mantissa_bits>`` with subnormals.

    Attributes:
        name: The spec name (``fp8_e4m3``, ...).
        exponent_bits: Exponent bits.
        mantissa_bits: Mantissa (fraction) bits.
        max_value: Largest finite magnitude; quantization saturates to it.
        torch_dtype: Name of the ``torch`` dtype whose cast (after clamping) rounds the same way,
            if torch has one (``float8_e4m3fn``, ``float8_e5m2``).
        block_size: Weights in blocks of this many input channels with FP8 scale codes (NVFP4).
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    max_value: float
    torch_dtype: str | None = None
    block_size: int | None = None

    @property
    def bits(self) -> int:
        """Storage bits of one value (sign + exponent + mantissa)."""
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def bias(self) -> int:
        """Exponent bias ``2**(e-1) - 1``."""
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def min_exponent(self) -> int:
        """Exponent of the smallest normal value (subnormals share its step)."""
        return 1 - self.bias

    @property
    def qmax(self) -> float:
        """Largest value (scales map ``absmax`` to it, like an integer format's ``qmax``)."""
        return self.max_value

    @property
    def qmin(self) -> float:
        """Smallest (most negative) value."""
        return -self.max_value

    @property
    def positive_levels(self) -> int:
        """Number of positive finite values (LSQ's ``Q_P``)."""
        return int((self.values() > 0).sum())

    def values(self) -> torch.Tensor:
        """Every finite value of the format, sorted ascending, each once (float64; for tests and checks)."""
        return enumerate_values(self.exponent_bits, self.mantissa_bits, self.max_value)

    def round(self, v: torch.Tensor) -> torch.Tensor:
        """Round ``v`` (already divided by its scale) to the nearest value, ties to even, saturating.

        Float32 and float64 inputs are exact: the binade's step is a power of two, so
        ``v / step`` and the product back are exact and ``torch.round`` rounds half to even.
        """
        return self._round_saturated(v.clamp(-self.max_value, self.max_value))

    def _round_saturated(self, v: torch.Tensor) -> torch.Tensor:
        """:meth:`round` of values already clamped to the format's range."""
        if self.torch_dtype is not None and v.dtype == torch.float32:
            return v.to(getattr(torch, self.torch_dtype)).to(torch.float32)
        _, exponent = torch.frexp(v)  # |v| = m * 2**exponent with m in [0.5, 1)
        binade = torch.clamp(exponent - 1, min=self.min_exponent)
        step = torch.ldexp(torch.ones_like(v), binade - self.mantissa_bits)
        return torch.round(v / step) * step

    def fake_quant_broadcast(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``s * round(clamp(x / s))`` with ``s`` broadcast against ``x``; clipped straight-through gradient."""
        if not (torch.is_grad_enabled() and (x.requires_grad or s.requires_grad)):
            v = x.div(s).clamp_(-self.max_value, self.max_value)  # inference: fewer temporaries
            return self._round_saturated(v).mul_(s)
        limit = self.max_value * s
        clipped = torch.maximum(torch.minimum(x, limit), -limit)
        rounded = self.round(clipped / s) * s
        return clipped + (rounded - clipped).detach()


def enumerate_values(exponent_bits: int, mantissa_bits: int, max_value: float) -> torch.Tensor:
    """All finite values of ``E<e>M<m>`` up to ``max_value``, decoded bit pattern by bit pattern.

    Exponent field 0 is subnormal (``0.m * 2**(1 - bias)``), otherwise ``1.m * 2**(field - bias)``;
    codes decoding above ``max_value`` (NaN/Inf patterns of E4M3/E5M2) are left out.
    """
    bias = 2 ** (exponent_bits - 1) - 1
    found = set()
    for field, mantissa in itertools.product(range(2**exponent_bits), range(2**mantissa_bits)):
        fraction = mantissa / 2**mantissa_bits
        value = fraction * 2.0 ** (1 - bias) if field == 0 else (1 + fraction) * 2.0 ** (field - bias)
        if value <= max_value:
            found |= {value, -value}
    return torch.tensor(sorted(found), dtype=torch.float64)


FLOAT_FORMATS = MappingProxyType(
    {
        "fp8_e4m3": FloatFormat("fp8_e4m3", 4, 3, 448.0, "float8_e4m3fn"),
        "fp8_e5m2": FloatFormat("fp8_e5m2", 5, 2, 57344.0, "float8_e5m2"),
        "fp6_e3m2": FloatFormat("fp6_e3m2", 3, 2, 28.0),
        "fp6_e2m3": FloatFormat("fp6_e2m3", 2, 3, 7.5),
        "fp4_e2m1": FloatFormat("fp4_e2m1", 2, 1, 6.0, block_size=NVFP4_BLOCK),
    }
)
"""The floating-point formats by spec name."""
E4M3 = FLOAT_FORMATS["fp8_e4m3"]
FP8_FORMATS = ("fp8_e4m3", "fp8_e5m2")
"""Formats an activation may take (ONNX ``QuantizeLinear`` has FP8 types, no FP6/FP4 activations)."""


def float_format(name: str) -> FloatFormat:
    """The format called ``name``.

    Raises:
        ValueError: Unknown name.
    """
    try:
        return FLOAT_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown float format {name!r}; choose one of {', '.join(FLOAT_FORMATS)}") from None


def nvfp4_scales(weight: torch.Tensor, block_size: int = NVFP4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4's two-level scales of a weight ``[O, I, *k]``: E4M3 block codes and a float32 global scale.

    Returns:
        ``(codes, global_scale)``: codes (float32 values on the E4M3 grid, at least its smallest
        subnormal) of shape ``[O, I // block_size, *k]``, and the scalar ``absmax / (6 * 448)``.
    """
    element = FLOAT_FORMATS["fp4_e2m1"]
    w = weight.detach().float()
    global_scale = torch.clamp(w.abs().max() / (element.max_value * E4M3.max_value), min=SCALE_EPS)
    block_absmax = group_view(w, block_size).abs().amax(dim=2)
    codes = E4M3.round(block_absmax / element.max_value / global_scale)
    smallest = 2.0 ** (E4M3.min_exponent - E4M3.mantissa_bits)
    return torch.clamp(codes, min=smallest), global_scale.reshape(())
