"""Per-input-channel transforms of a quantized layer's input, and SVDQuant's low-rank branch.

A planned layer ``y = W x + b`` (Linear or Conv2d) may carry, in this order:

- **smoothing** (SmoothQuant): a positive scale ``s`` per input channel. The weight becomes
  ``W diag(s)`` (see :func:`scale_input_channels`) and the input ``x / s``: either folded upstream
  (the layer already receives ``x / s``) or, when it cannot be, an explicit multiply by ``1 / s``
  in the layer (:class:`InputTransform` with ``multiply``);
- a **shift** ``c`` per input channel, in the (smoothed) input's units: ``x_hat = x / s - c`` enters
  the symmetric input quantizer and the bias becomes ``b + W_eff c`` (:func:`shift_bias`, with
  ``W_eff`` the weight the layer really applies), so the float function is unchanged and every
  zero point stays 0 (TensorRT's form). For a convolution with padding the shift comes after an
  explicit pad: ``conv(pad(x) - c) = conv(pad(x)) - W c`` at every output position, whereas
  shift-then-zero-pad would put 0 instead of ``-c`` at the border;
- a **low-rank branch** (SVDQuant): ``W = L1 L2 + R``; only ``R`` goes through the weight
  quantizer and ``L1 (L2 x_hat)`` runs unquantized beside it (:class:`LowRankBranch`: for a KxK
  convolution ``L2`` is a KxK convolution to ``rank`` channels and ``L1`` a 1x1 convolution).

The modules keep float32 state (``keeps_float32``) and compute in the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

LOW_RANK_DTYPES = {"float16": torch.float16, "float32": torch.float32}
"""Value types of the low-rank factors: what the export stores (FLOAT16 or FLOAT)."""


def input_channels(layer: nn.Module) -> int:
    """Input channels of a Linear or Conv2d layer."""
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def channel_axis(layer: nn.Module) -> int:
    """Axis of the input channels in the layer's input: -1 for Linear, 1 for Conv2d."""
    return -1 if isinstance(layer, nn.Linear) else 1


def groups_of(layer: nn.Module) -> int:
    """The layer's convolution groups (1 for Linear)."""
    return layer.groups if isinstance(layer, nn.Conv2d) else 1


def weight_channel_view(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """View a weight ``[O, I / groups, *k]`` as ``[groups, O / groups, I / groups, prod(k)]``."""
    out, per_group = weight.shape[0], weight.shape[1]
    return weight.reshape(groups, out // groups, per_group, -1)


def weight_channel_absmax(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``max |W|`` over every weight that multiplies each input channel (shape ``[I]``)."""
    view = weight_channel_view(weight.detach().float(), groups)
    return view.abs().amax(dim=(1, 3)).reshape(-1)


def scale_input_channels(weight: torch.Tensor, scale: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``W diag(s)``: every weight of input channel ``j`` times ``s_j`` (same shape as ``weight``)."""
    view = weight_channel_view(weight, groups)
    factor = scale.to(weight.dtype).reshape(groups, 1, -1, 1)
    return (view * factor).reshape(weight.shape)


def shift_bias(weight: torch.Tensor, shift: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``W c`` per output channel: what a constant input ``c`` (per channel) adds at every position.

    For a convolution it sums over the kernel positions (the input was padded before the shift, so
    every position sees ``c`` everywhere).
    """
    view = weight_channel_view(weight, groups)  # [g, O/g, I/g, k]
    c = shift.to(weight.dtype).reshape(groups, 1, -1)
    return (view.sum(dim=3) * c).sum(dim=2).reshape(-1)


class InputTransform(nn.Module):
    """``x -> pad(x) * (1 / s) - c`` on a layer's input, each part optional.

    Buffers (saved with the quantizer scales): ``smooth`` (``s``, present when the layer is
    smoothed, folded or not) and ``shift`` (``c``). ``multiply`` says whether ``1 / s`` is applied
    here (False when it was folded upstream); ``pad`` is the explicit padding of a shifted
    convolution (``F.pad`` order), applied with ``pad_mode``.
    """

    keeps_float32 = True

    def __init__(
        self,
        channels: int,
        axis: int,
        shift: bool,
        smooth: bool,
        multiply: bool,
        pad: tuple[int, ...] | None = None,
        pad_mode: str = "constant",
    ) -> None:
        """Create an identity transform (``s = 1``, ``c = 0``) with the buffers the plan needs."""
        super().__init__()
        if multiply and not smooth:
            raise ValueError("multiply needs smoothing scales")
        self.axis = axis
        self.multiply = multiply
        self.pad = pad
        self.pad_mode = pad_mode
        self.alpha: float | None = None  # the plan's smoothing entry, kept for plan_from_model
        self.into: str | None = None
        if smooth:
            self.register_buffer("smooth", torch.ones(channels))
        else:
            self.smooth = None
        if shift:
            self.register_buffer("shift", torch.zeros(channels))
        else:
            self.shift = None

    def _channels(self, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        values = values.to(x.dtype)
        return values if self.axis == -1 else values.reshape(1, -1, *([1] * (x.dim() - 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pad, multiply by ``1 / s`` and subtract ``c``, as configured."""
        if self.pad is not None:
            x = F.pad(x, self.pad, mode=self.pad_mode)
        if self.multiply:
            assert self.smooth is not None
            x = x * self._channels(torch.reciprocal(self.smooth), x)
        if self.shift is not None:
            x = x - self._channels(self.shift, x)
        return x

    def extra_repr(self) -> str:
        """Which parts are on."""
        parts = [name for name, on in (("pad", self.pad), ("smooth", self.multiply), ("shift", self.shift)) if on]
        folded = ", smoothing folded upstream" if self.smooth is not None and not self.multiply else ""
        return f"{' -> '.join(parts) or 'identity'}{folded}"


class LowRankBranch(nn.Module):
    """``L1 (L2 x)``: the unquantized low-rank part of a weight ``W = L1 L2 + R``.

    Linear: ``down`` (``L2``) is ``[rank, I]`` and ``up`` (``L1``) ``[O, rank]``. Conv2d: ``down``
    is a KxK convolution ``[rank, I, kh, kw]`` with the layer's stride and dilation, ``up`` a 1x1
    convolution ``[O, rank, 1, 1]``. The values are those of ``dtype`` (float16: rounded to it)
    held in float32 buffers.
    """

    keeps_float32 = True

    def __init__(self, layer: nn.Module, rank: int, dtype: str = "float16") -> None:
        """Zero factors for ``layer`` (Linear, or Conv2d with ``groups == 1``)."""
        super().__init__()
        if dtype not in LOW_RANK_DTYPES:
            raise ValueError(f"low-rank dtype must be one of {', '.join(LOW_RANK_DTYPES)}, got {dtype!r}")
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            raise ValueError("a low-rank branch needs a convolution with groups == 1")
        self.rank, self.dtype = rank, dtype
        shape = tuple(layer.weight.shape)
        self.conv = isinstance(layer, nn.Conv2d)
        if self.conv:
            self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
            self.register_buffer("down", torch.zeros(rank, *shape[1:]))
            self.register_buffer("up", torch.zeros(shape[0], rank, 1, 1))
        else:
            self.register_buffer("down", torch.zeros(rank, shape[1]))
            self.register_buffer("up", torch.zeros(shape[0], rank))

    def set_factors(self, up: torch.Tensor, down: torch.Tensor) -> None:
        """Store ``L1`` ``[O, rank]`` and ``L2`` ``[rank, fan_in]``, rounded to the branch's dtype."""
        kind = LOW_RANK_DTYPES[self.dtype]
        self.up.copy_(up.to(kind).float().reshape(self.up.shape))
        self.down.copy_(down.to(kind).float().reshape(self.down.shape))

    def product(self) -> torch.Tensor:
        """``L1 L2`` shaped like the layer's weight (float32)."""
        out = self.up.shape[0]
        return (self.up.reshape(out, -1) @ self.down.reshape(self.rank, -1)).reshape(out, *self.down.shape[1:])

    def forward(self, x: torch.Tensor, padded: bool = False) -> torch.Tensor:
        """The branch's output for input ``x`` (``padded``: a convolution input already padded)."""
        down, up = self.down.to(x.dtype), self.up.to(x.dtype)
        if not self.conv:
            return F.linear(F.linear(x, down), up)
        padding = 0 if padded else self.padding
        return F.conv2d(F.conv2d(x, down, None, self.stride, padding, self.dilation), up)

    def extra_repr(self) -> str:
        """Rank and value type."""
        return f"rank={self.rank}, dtype={self.dtype}"


def fan_in(layer: nn.Module) -> int:
    """Inputs per output of a Linear or Conv2d (``I * kh * kw / groups``)."""
    return int(layer.weight[0].numel())


def max_rank(layer: nn.Module) -> int:
    """The largest useful rank of a layer's weight: ``min(out, fan_in)``."""
    return min(int(layer.weight.shape[0]), fan_in(layer))


def explicit_padding(layer: nn.Module) -> tuple[tuple[int, ...], str] | None:
    """``(pad, mode)`` for ``F.pad`` when a shifted convolution must pad before the shift, else None."""
    if not isinstance(layer, nn.Conv2d):
        return None
    pad = tuple(int(p) for p in layer._reversed_padding_repeated_twice)
    if not any(pad):
        return None
    return pad, "constant" if layer.padding_mode == "zeros" else layer.padding_mode


def make_input_transform(layer: nn.Module, shift: bool, smooth: bool, multiply: bool) -> InputTransform:
    """The :class:`InputTransform` a Linear / Conv2d needs for the given parts."""
    padding = explicit_padding(layer) if shift else None
    return InputTransform(
        input_channels(layer),
        channel_axis(layer),
        shift,
        smooth,
        multiply,
        padding[0] if padding else None,
        padding[1] if padding else "constant",
    )
