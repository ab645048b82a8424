"""Fake-quantized layers: a quantizer module and drop-in Linear / Conv2d replacements."""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from diffquant.quant.float_formats import float_format, nvfp4_scales
from diffquant.quant.formats import (
    IntFormat,
    QuantFormat,
    broadcast_scale,
    fake_quant,
    fake_quant_grouped,
    group_view,
)
from diffquant.quant.lsq import lsq_fake_quant
from diffquant.quant.observers import ActivationObserver, weight_scale
from diffquant.quant.transforms import InputTransform, LowRankBranch, groups_of, shift_bias


def make_format(name: str, bits: int) -> QuantFormat:
    """The value grid of format ``name`` (``int`` at ``bits``, or a float format of that width).

    Raises:
        ValueError: Unknown format, or ``bits`` other than a float format's width.
    """
    if name == "int":
        return IntFormat(bits)
    fmt = float_format(name)
    if fmt.bits != bits:
        raise ValueError(f"format {name} stores {fmt.bits} bits per value, not {bits}")
    return fmt


class QuantizerMode(str, Enum):
    """What a :class:`FakeQuantizer` does in ``forward``."""

    OFF = "off"
    OBSERVE = "observe"
    QUANTIZE = "quantize"


class FakeQuantizer(nn.Module):
    """Fake-quantizes a tensor with a stored scale; can also observe ranges for calibration.

    The scale is a buffer, so it is saved with the model's state dict (as safetensors). An NVFP4
    weight quantizer (format ``fp4_e2m1``) keeps its FP8 block codes in ``scale`` and its float32
    global scale in the buffer ``global_scale``; a block's scale is ``scale * global_scale``.
    """

    keeps_float32 = True
    """Scales and statistics stay float32 when the model is cast to half precision (see :func:`diffquant.placement.place`)."""

    def __init__(
        self,
        bits: int,
        axis: int | None = None,
        observer: str = "minmax",
        channels: int = 1,
        group_size: int | None = None,
        weight_shape: tuple[int, ...] | None = None,
        fmt: str = "int",
    ) -> None:
        """Create an uncalibrated quantizer.

        Args:
            bits: Bit-width (2-8; a float format's own width).
            axis: Channel axis for per-channel scales, None for per-tensor.
            observer: Observer used by :meth:`calibrate_from` / observe mode.
            channels: Number of scales when per-channel.
            group_size: Group-wise weight scales over this many input channels (needs ``weight_shape``).
            weight_shape: Shape of the weight, for the group-wise scale shape ``[O, I // g, *k]``.
            fmt: ``int`` or a float format name (:mod:`diffquant.quant.float_formats`).
        """
        super().__init__()
        self.fmt = make_format(fmt, bits)
        self.format_name = fmt
        self.axis = axis
        self.observer_name = observer
        self.group_size = group_size
        if group_size is not None:
            if weight_shape is None or len(weight_shape) < 2 or weight_shape[1] % group_size:
                raise ValueError(f"group size {group_size} does not divide the input channels of {weight_shape}")
            shape: tuple[int, ...] = (weight_shape[0], weight_shape[1] // group_size, *weight_shape[2:])
        else:
            shape = (channels,) if axis is not None else ()
        self.register_buffer("scale", torch.ones(shape))
        if self.two_level:
            if group_size != self.fmt.block_size:
                raise ValueError(f"format {fmt} takes blocks of {self.fmt.block_size} input channels, not {group_size}")
            self.register_buffer("global_scale", torch.ones(()))
        self.learnable = False
        # the share of the whole batch one call holds (fine-tuning micro-batches set it): LSQ's gradient
        # scale then counts the whole batch's elements, so micro-batch gradients add up to the batch's
        self.batch_share = 1.0
        self.mode = QuantizerMode.OFF
        self._observer: ActivationObserver | None = None

    @property
    def bits(self) -> int:
        """Bit-width of the format."""
        return self.fmt.bits

    @property
    def two_level(self) -> bool:
        """Whether the scales are NVFP4's FP8 block codes times a float32 global scale."""
        return getattr(self.fmt, "block_size", None) is not None

    def effective_scale(self) -> torch.Tensor:
        """The scale the values are multiplied by (NVFP4: ``codes * global_scale``, in float32)."""
        return self.scale * self.global_scale if self.two_level else self.scale

    def calibrate_from(self, tensor: torch.Tensor) -> None:
        """Set the scale from a whole tensor at once (weights) and switch to quantize mode."""
        if self.two_level:
            assert self.group_size is not None
            codes, global_scale = nvfp4_scales(tensor, self.group_size)
            self.scale.copy_(codes)
            self.global_scale.copy_(global_scale)
        else:
            self.scale.copy_(weight_scale(tensor, self.fmt, self.observer_name, self.axis, group_size=self.group_size))
        self.mode = QuantizerMode.QUANTIZE

    def start_observing(self, seed: int = 0) -> None:
        """Enter observe mode: forward passes record statistics and return inputs unchanged."""
        self._observer = ActivationObserver(self.observer_name, seed=seed)
        self.mode = QuantizerMode.OBSERVE

    def finish_observing(self) -> None:
        """Compute the scale from observed statistics and switch to quantize mode."""
        if self._observer is None:
            raise RuntimeError("finish_observing() called before start_observing()")
        if self._observer.absmax.item() == 0.0 and not self._observer._values.numel():
            raise RuntimeError("quantizer observed no data; run calibration inputs through the model")
        self.scale.copy_(self._observer.scale(self.fmt))
        self._observer = None
        self.mode = QuantizerMode.QUANTIZE

    def make_learnable(self) -> nn.Parameter:
        """Turn the scale into a trainable parameter (LSQ); the state-dict key stays ``scale``.

        Raises:
            ValueError: For NVFP4 weights, whose block scales are FP8 codes.
        """
        if self.two_level:
            raise ValueError(f"{self.format_name} block scales are FP8 codes and cannot be learned")
        if not self.learnable:
            value = self.scale.detach().clone()
            del self._buffers["scale"]
            self.scale = nn.Parameter(value)
            self.learnable = True
        return self.scale

    def freeze(self) -> None:
        """Turn a learned scale back into a buffer (after fine-tuning)."""
        if self.learnable:
            value = self.scale.detach().clone()
            del self._parameters["scale"]
            self.register_buffer("scale", value)
            self.learnable = False

    def _broadcast_scale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x viewed for the scale, scale broadcast against it)``."""
        if self.group_size is not None:
            return group_view(x, self.group_size), self.scale.unsqueeze(2)
        return x, broadcast_scale(self.scale, x, self.axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Observe, fake-quantize or pass through ``x`` according to the mode.

        A learnable scale under autograd uses LSQ's gradients; the forward value is the same.
        """
        if self.mode is QuantizerMode.QUANTIZE and x.dtype is not torch.float32:
            # scales and the integer grid stay exact in float32 under a half-precision model
            return self.forward(x.float()).to(x.dtype)
        if self.mode is QuantizerMode.QUANTIZE and self.learnable and torch.is_grad_enabled():
            view, step = self._broadcast_scale(x)
            elements = round(view.numel() // self.scale.numel() / self.batch_share)
            return lsq_fake_quant(view, step.to(x.dtype), self.fmt, elements).reshape(x.shape)
        if self.mode is QuantizerMode.QUANTIZE:
            if self.group_size is not None:
                return fake_quant_grouped(x, self.effective_scale().to(x.dtype), self.fmt, self.group_size)
            return fake_quant(x, self.scale.to(x.dtype), self.fmt, self.axis)
        if self.mode is QuantizerMode.OBSERVE and self._observer is not None:
            self._observer.update(x)
        return x

    def extra_repr(self) -> str:
        """Describe the format for ``print(model)``."""
        group = f", group_size={self.group_size}" if self.group_size is not None else ""
        fmt = f", format={self.format_name}" if self.format_name != "int" else ""
        return f"bits={self.bits}{fmt}, axis={self.axis}{group}, observer={self.observer_name}, mode={self.mode.value}"


def groups_allowed(layer: nn.Module, group_size: int) -> bool:
    """Whether ``layer`` can take group-wise weight scales over ``group_size`` input channels.

    Linear layers need ``in_features`` divisible by ``g``; convolutions additionally need
    ``groups == 1`` (ONNX block-wise DequantizeLinear blocks axis 1 of the weight).
    """
    if isinstance(layer, nn.Conv2d):
        return layer.groups == 1 and layer.in_channels % group_size == 0
    if isinstance(layer, nn.Linear):
        return layer.in_features % group_size == 0
    return False


class _QuantMixin:
    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_quantizer: FakeQuantizer | None
    input_quantizer: FakeQuantizer | None
    output_quantizer: FakeQuantizer | None
    input_transform: InputTransform | None
    low_rank: LowRankBranch | None

    def _setup_quantizers(
        self,
        weight_bits: int | None,
        weight_observer: str,
        per_channel: bool,
        act_bits: int | None,
        act_observer: str,
        group_size: int | None = None,
        weight_format: str = "int",
        act_format: str = "int",
    ) -> None:
        shape = tuple(self.weight.shape)
        if group_size is not None and not groups_allowed(self, group_size):
            raise ValueError(f"{type(self).__name__} with weight {shape} cannot take groups of {group_size}")
        self.weight_quantizer = (
            FakeQuantizer(
                weight_bits, 0 if per_channel else None, weight_observer, shape[0], group_size, shape, weight_format
            )
            if weight_bits is not None
            else None
        )
        self.input_quantizer = (
            FakeQuantizer(act_bits, None, act_observer, fmt=act_format) if act_bits is not None else None
        )
        self.output_quantizer = None
        self.input_transform = None  # smoothing / shift (diffquant.quant.transforms), set by the plan
        self.low_rank = None
        if self.weight_quantizer is not None:
            self.weight_quantizer.calibrate_from(self.weight.detach())

    def add_adapter(self, rank: int, alpha: float | None = None, seed: int = 0) -> None:
        """Attach a QALoRA adapter: ``W + (alpha / rank) * B @ A`` is what gets fake-quantized.

        ``A`` starts small and random (seeded), ``B`` at zero, so the layer is unchanged until trained.
        """
        fan_in = self.weight[0].numel()
        generator = torch.Generator().manual_seed(seed)
        a = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
        self.lora_A = nn.Parameter(a.to(self.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.weight.shape[0], rank, dtype=self.weight.dtype))
        self.lora_scale = (alpha if alpha is not None else rank) / rank

    def has_adapter(self) -> bool:
        """Whether a QALoRA adapter is attached."""
        return getattr(self, "lora_A", None) is not None

    def adapter_delta(self) -> torch.Tensor:
        """The adapter's weight update, shaped like the weight."""
        return (self.lora_B @ self.lora_A).reshape(self.weight.shape) * self.lora_scale

    def merge_adapter(self) -> None:
        """Fold the adapter into the float weight and remove it (the layer computes exactly the same)."""
        if not self.has_adapter():
            return
        with torch.no_grad():
            merged = self.weight + self.adapter_delta()
            self.weight.copy_(merged)
        del self.lora_A, self.lora_B
        self.lora_A = None
        self.lora_B = None

    def _float_weight(self) -> torch.Tensor:
        weight = self.weight + self.adapter_delta() if self.has_adapter() else self.weight
        if self.low_rank is not None:
            weight = weight - self.low_rank.product().to(weight.dtype)
        return weight

    def weight_to_quantize(self) -> torch.Tensor:
        """The float weight the weight quantizer sees: ``W`` (+ adapter), less the low-rank part ``L1 L2``."""
        return self._float_weight()

    def _cache_key(self) -> tuple:
        quantizer = self.weight_quantizer
        key: tuple = (self.weight._version, self.weight.data_ptr())
        if quantizer is not None:
            key += (quantizer.scale._version, quantizer.mode)
            if quantizer.two_level:
                key += (quantizer.global_scale._version,)
        if self.has_adapter():
            key += (self.lora_A._version, self.lora_B._version, self.lora_A.data_ptr(), self.lora_B.data_ptr())
        if self.low_rank is not None:
            key += (self.low_rank.up._version, self.low_rank.down._version)
        return key

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the quantized layer uses it (fake-quantized, or as is when FP).

        With an adapter, ``W + delta`` is quantized. Without autograd the result is cached until
        the weight, the adapter or the scale changes in place.
        """
        quantizer = self.weight_quantizer
        if quantizer is None:
            return self._float_weight()
        if torch.is_grad_enabled():
            return quantizer(self._float_weight())
        key = self._cache_key()
        cached = getattr(self, "_weight_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, quantizer(self._float_weight()))
            self._weight_cache = cached
        return cached[1]

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer applies: the (fake-)quantized weight plus the low-rank part."""
        weight = self.quantized_weight()
        return weight if self.low_rank is None else weight + self.low_rank.product().to(weight.dtype)

    def effective_bias(self) -> torch.Tensor | None:
        """The bias with the input shift added back: ``b + W_eff c`` (``b`` itself without a shift)."""
        transform = self.input_transform
        if transform is None or transform.shift is None:
            return self.bias
        if torch.is_grad_enabled():
            extra = shift_bias(self.effective_weight(), transform.shift, groups_of(self))
        else:
            key = (*self._cache_key(), transform.shift._version)
            cached = getattr(self, "_shift_cache", None)
            if cached is None or cached[0] != key:
                cached = (key, shift_bias(self.effective_weight(), transform.shift, groups_of(self)))
                self._shift_cache = cached
            extra = cached[1]
        extra = extra.to(self.weight.dtype)
        return extra if self.bias is None else self.bias + extra

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_transform is None else self.input_transform(x)

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` with an optional weight quantizer and an optional input quantizer."""

    @classmethod
    def from_float(
        cls,
        layer: nn.Linear,
        weight_bits: int | None,
        act_bits: int | None,
        weight_observer: str = "minmax",
        act_observer: str = "minmax",
        per_channel: bool = True,
        group_size: int | None = None,
        weight_format: str = "int",
        act_format: str = "int",
    ) -> QuantLinear:
        """Build from a float ``nn.Linear``, sharing its parameters.

        Args:
            layer: The layer to replace.
            weight_bits: Weight bit-width, or None to keep the weight in float.
            act_bits: Input activation bit-width, or None to keep inputs in float.
            weight_observer: Observer for the weight scale.
            act_observer: Observer for the input scale (set during calibration).
            per_channel: Per-output-channel weight scales (else one per tensor).
            group_size: Group-wise weight scales over this many input features instead.
            weight_format: ``int`` or a float format of the weight.
            act_format: ``int`` or an FP8 format of the input.
        """
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = layer.in_features, layer.out_features
        new.weight, new.bias = layer.weight, layer.bias
        new._setup_quantizers(
            weight_bits, weight_observer, per_channel, act_bits, act_observer, group_size, weight_format, act_format
        )
        return new

    fp_tokens: int = 0

    def keep_tokens_in_float(self, count: int) -> None:
        """Serve the first ``count`` token positions from precomputed full-precision outputs.

        For inputs ``(N, L, in)`` whose leading tokens are the same for every input (a causal text
        encoder's BOS state): their rows come from the buffer ``fp_token_outputs`` (``(count, out)``,
        filled by :func:`diffquant.outlier_tokens.fp_token_outputs`), and only tokens
        ``count..L-1`` pass the input quantizer, so the outliers never set its range.
        """
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.fp_tokens = count
        self.register_buffer("fp_token_outputs", torch.zeros(count, self.out_features, dtype=self.weight.dtype))

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        x = self._transform(x)
        y = F.linear(self._quant_input(x), self.quantized_weight(), self.effective_bias())
        return y if self.low_rank is None else y + self.low_rank(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Linear over the quantized input and weight (leading tokens from FP outputs if set).

        With an input transform the input is smoothed / shifted first; a low-rank branch adds
        ``L1 L2 x`` on the unquantized (transformed) input.
        """
        if not self.fp_tokens:
            return self._linear(x)
        if x.dim() != 3 or x.shape[1] <= self.fp_tokens:
            raise ValueError(
                f"fp_tokens={self.fp_tokens} needs (N, L > {self.fp_tokens}, D) inputs, got {tuple(x.shape)}"
            )
        rest = self._linear(x[:, self.fp_tokens :])
        head = self.fp_token_outputs.to(rest.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return torch.cat([head, rest], dim=1)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with optional weight, input and output quantizers.

    The output quantizer (per tensor, calibrated like the input quantizer) exists for the
    onnxruntime export form: a quantized output lets onnxruntime fuse ``DQ -> Conv -> Q`` into
    one integer ``QLinearConv`` (see :mod:`export.onnx`).
    """

    @classmethod
    def from_float(
        cls,
        layer: nn.Conv2d,
        weight_bits: int | None,
        act_bits: int | None,
        weight_observer: str = "minmax",
        act_observer: str = "minmax",
        per_channel: bool = True,
        group_size: int | None = None,
        out_bits: int | None = None,
        out_observer: str = "minmax",
        weight_format: str = "int",
        act_format: str = "int",
    ) -> QuantConv2d:
        """Build from a float ``nn.Conv2d``, sharing its parameters.

        Args:
            layer: The layer to replace.
            weight_bits: Weight bit-width, or None to keep the weight in float.
            act_bits: Input activation bit-width, or None to keep inputs in float.
            weight_observer: Observer for the weight scale.
            act_observer: Observer for the input scale (set during calibration).
            per_channel: Per-output-channel weight scales (else one per tensor).
            group_size: Group-wise weight scales over this many input channels instead.
            out_bits: Output activation bit-width, or None to keep the output in float.
            out_observer: Observer for the output scale (set during calibration).
            weight_format: ``int`` or a float format of the weight.
            act_format: ``int`` or an FP8 format of the input.
        """
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for attr in (
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "transposed",
            "output_padding",
            "groups",
            "padding_mode",
        ):
            setattr(new, attr, getattr(layer, attr))
        new._reversed_padding_repeated_twice = layer._reversed_padding_repeated_twice
        new.weight, new.bias = layer.weight, layer.bias
        new._setup_quantizers(
            weight_bits, weight_observer, per_channel, act_bits, act_observer, group_size, weight_format, act_format
        )
        new.output_quantizer = FakeQuantizer(out_bits, None, out_observer) if out_bits is not None else None
        return new

    def integer_bias(self) -> bool:
        """Whether the bias is on the INT32 grid ``s_in * s_w`` (layers with an output quantizer).

        Such a layer becomes onnxruntime's integer ``QLinearConv``, which adds the bias as INT32 in
        units of ``s_in * s_w``; the fake-quant model rounds its bias the same way, so both compute
        the same thing.
        """
        return (
            self.output_quantizer is not None
            and self.effective_bias() is not None
            and self.input_quantizer is not None
            and self.weight_quantizer is not None
            and self.weight_quantizer.group_size is None
        )

    def _bias_on_grid(self) -> bool:
        # only once the input scale is calibrated (while observing, the float bias is used)
        return self.integer_bias() and self.input_quantizer.mode is QuantizerMode.QUANTIZE

    def bias_scale(self) -> torch.Tensor:
        """The INT32 bias scale ``s_in * s_w`` (float32; per output channel or per tensor)."""
        assert self.input_quantizer is not None and self.weight_quantizer is not None
        return self.input_quantizer.scale.float().reshape(()) * self.weight_quantizer.scale.float()

    def bias_integers(self) -> torch.Tensor:
        """``round(b / (s_in * s_w))`` clamped to INT32, as float32 values (see :meth:`integer_bias`).

        ``b`` is the effective bias (with the input shift added back).
        """
        bias = self.effective_bias()
        assert bias is not None
        limit = torch.iinfo(torch.int32)
        return torch.clamp(torch.round(bias.float() / self.bias_scale()), limit.min, limit.max)

    def quantized_bias(self) -> torch.Tensor | None:
        """The bias as the layer uses it: on the INT32 grid when :meth:`integer_bias`, else as is.

        The grid needs the input scale, so during calibration (input quantizer not yet in quantize
        mode) the float bias is used.

        Under autograd the rounding passes gradients straight through to the float bias.
        """
        bias = self.effective_bias()
        if not self._bias_on_grid():
            return bias
        assert bias is not None
        rounded = (self.bias_integers() * self.bias_scale()).to(bias.dtype)
        return bias + (rounded - bias).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolution over the quantized input, weight and bias; the output quantized when planned.

        With an input transform the input is smoothed / shifted first (after an explicit pad when
        shifted: the convolution then runs without padding); a low-rank branch adds its output.
        """
        x = self._transform(x)
        padded = self.input_transform is not None and self.input_transform.pad is not None
        weight, bias, quantized = self.quantized_weight(), self.quantized_bias(), self._quant_input(x)
        if padded:
            y = F.conv2d(quantized, weight, bias, self.stride, 0, self.dilation, self.groups)
        else:
            y = self._conv_forward(quantized, weight, bias)
        if self.low_rank is not None:
            y = y + self.low_rank(x, padded)
        return y if self.output_quantizer is None else self.output_quantizer(y)
