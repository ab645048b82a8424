"""ONNX export of a (fake-quantized) denoiser in TensorRT's explicit-quantization (Q/DQ) form.

The exported graph takes ``sample`` (N, C, H, W float32), ``timestep`` (N, int64) and, for
class-conditional models, ``class_labels`` (N, int64) or, for text-conditioned models, ``input_ids``
(N, L, int64: the text encoder runs inside the graph), and returns ``noise_pred`` (N, C, H, W).
The batch dimension is dynamic.

How each planned layer (a Conv2d or Linear named in the :class:`LayerPlan`) is written:

- **Weights** are stored as integer initializers followed by one ``DequantizeLinear``; no float
  copy of a quantized weight is kept, so the file is really small. Zero points are 0, scales are
  float32 initializers. Weights of 2-4 bits are stored as ``INT4``, weights of 5-8 bits as
  ``INT8`` (the smallest ONNX integer type that holds them), and 2-bit weights as ``INT2`` where
  the device class's runtime dequantizes INT2 (``cpu``: onnxruntime; never TensorRT): the rule is
  :meth:`diffquant.devices.DeviceClass.storage_bits`, which ``allocation.cost: deployed`` counts
  too. INT2 exists from opset 25, so an export that stores an INT2 weight is declared at opset
  ``max(opset, 25)``. The integers are the fake-quant
  model's ``clamp(round(w / s), -2**(b-1), 2**(b-1) - 1)``, so a 3-bit weight stored in INT4 only
  takes values in ``[-4, 3]`` and a 6-bit weight stored in INT8 only ``[-32, 31]``: the b-bit
  clamp is preserved in the values, and the dequantized weight is bit-identical to PyTorch's.
  Per-channel scales lie on the output-channel axis: axis 0 for Conv weights ``[O, I, kh, kw]``;
  Linear layers are exported as ``MatMul(x, W^T) + bias`` with the weight stored transposed
  ``[I, O]``, so their output axis is 1. Group-wise scales use ``DequantizeLinear``'s
  ``block_size`` (opset 21): blocks along axis 1 (input channels) for Conv, axis 0 for the
  transposed Linear weight.
- **Input activations** get ``QuantizeLinear -> DequantizeLinear`` with a per-tensor float32
  scale and an INT8 zero point of 0. ``QuantizeLinear`` saturates to the *type's* range, so an
  activation at b < 8 bits gets a ``Clip(x, qmin*s, qmax*s)`` in front of the INT8 Q/DQ with the
  same scale: the result equals the b-bit fake quant ``clamp(round(x/s), qmin, qmax) * s``.
  (onnxruntime's CPU provider also runs INT4 activation Q/DQ, but TensorRT takes INT4 only as
  weight-only ``DequantizeLinear``, so the Clip form is the portable one.)
- Full-precision layers stay float (plain Conv / MatMul on float initializers).

The graph is traced with the legacy (TorchScript) exporter, which TensorRT tooling uses, at opset
``min(opset, 20)`` and then declared at ``opset``: opset 21 only widened types (INT4/UINT4) of
the operators the tracer emits (Cast, Reshape, Transpose, Pad, ...), it changed no semantics.

Every planned layer's compute node is named ``<fqn>/Conv`` or ``<fqn>/MatMul``; its quantizers
are ``<fqn>/weight_quantizer/DequantizeLinear`` and ``<fqn>/input_quantizer/{Clip,QuantizeLinear,
DequantizeLinear}``. The model's ``metadata_props`` hold ``diffquant.layers`` (JSON: layer FQN to
compute node name and kind) so that :mod:`export.rules` can find each layer.

Models whose initializers exceed ``external_data_threshold`` bytes are saved with their tensors in
one external data file ``<name>.onnx.data`` beside the ``.onnx``.

**The onnxruntime form** (``target="onnxruntime"``, ``export.target: onnxruntime``): onnxruntime's
CPU optimizer fuses ``DQ -> Conv -> Q`` into an integer ``QLinearConv`` only when the Conv's
output is quantized too and its bias comes from an INT32 ``DequantizeLinear``; otherwise every
Conv stays a float Conv behind a weight ``DequantizeLinear`` that runs on every call (slower than
FP32). In this form:

- activation Q/DQ (inputs and outputs) use ``UINT8`` with zero point 128: the same grid as the
  symmetric INT8 fake quant with zero point 0, shifted by 128 (``clamp(round(x/s), -128, 127) + 128``
  equals ``saturate_u8(round(x/s) + 128)``), and what onnxruntime's x86 kernels run fastest
  (u8 activations, s8 weights);
- a Conv2d layer whose plan has an ``output`` quantizer gets ``<fqn>/output_quantizer/
  {Clip,QuantizeLinear,DequantizeLinear}`` after its Conv, and its bias is stored as INT32
  ``round(b / (s_in * s_w))`` (per output channel) behind ``<fqn>/bias_quantizer/DequantizeLinear``
  with scale ``s_in * s_w``. The PyTorch model keeps a float bias; the rounding moves it by at
  most half of ``s_in * s_w`` (about 1e-6 here), far below the parity tolerance;
- weights are written as in the TensorRT form.

The model's ``metadata_props`` hold ``diffquant.target`` (``tensorrt`` or ``onnxruntime``).

**Floating-point formats** (FP8 / FP6 / FP4 weights, FP8 activations) are lowered by
:mod:`export.onnx_float`: FP8 initializers and Q/DQ (opset 19+), FP4 weights in TensorRT's NVFP4
two-DQ form (``FLOAT4E2M1`` from opset 23, E2M1 values in ``FLOAT8E4M3FN`` below it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F  # noqa: N812
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from diffquant.devices import DeviceClass, resolve_device_class
from diffquant.errors import ExportError
from diffquant.export.onnx_float import (
    FP4_TYPE_OPSET,
    FP8_OPSET,
    float4_type,
    lower_float_activation,
    lower_float_weight,
)
from diffquant.models.loading import DiffusionModel
from diffquant.quant.formats import IntFormat, group_view
from diffquant.quant.modules import FakeQuantizer, QuantConv2d, QuantizerMode, QuantLinear
from diffquant.quant.plan import (
    QUANTIZABLE,
    ActivationConfig,
    LayerConfig,
    LayerPlan,
    LowRankConfig,
    SmoothConfig,
    WeightConfig,
)
from diffquant.quant.transforms import InputTransform, LowRankBranch

logger = logging.getLogger(__name__)

INPUT_NAMES = ("sample", "timestep")
CONDITION_INPUTS = {"class": "class_labels", "text": "input_ids"}
OUTPUT_NAME = "noise_pred"
LAYERS_METADATA_KEY = "diffquant.layers"
TARGET_METADATA_KEY = "diffquant.target"
TARGETS = ("tensorrt", "onnxruntime")
ORT_ACTIVATION_ZERO_POINT = 128
ONNXRUNTIME_FORM_REASON = (
    "the export is in the onnxruntime form (UINT8 activations, zero point 128), which TensorRT does not take; "
    "use export.target: tensorrt for an engine"
)
TRANSFORM_ROLES = {"pad": "Pad", "smooth": "Mul", "shift": "Sub"}
"""Marks of a layer's input transform and the operator each constant feeds."""
LOW_RANK_ROLES = {"lowrank_down": "down", "lowrank_up": "up"}
"""Marks of a low-rank branch's factors (``L2`` down to ``rank`` channels, ``L1`` back up)."""
DEFAULT_OPSET = 21
MIN_OPSET = 13
BLOCKED_OPSET = 21
INT2_OPSET = 25  # the first opset whose DequantizeLinear takes INT2
TRACE_MAX_OPSET = 20  # the legacy exporter's symbolic functions stop at 20
INT2_IR_VERSION = 13  # the IR version that added INT2 tensors (onnx 1.20)
DEFAULT_EXTERNAL_DATA_THRESHOLD = 100 * 1024 * 1024
_MARK_DOMAIN = "diffquant.export"


STORAGE_TYPES = {2: TensorProto.INT2, 4: TensorProto.INT4, 8: TensorProto.INT8}
"""ONNX integer type of each storage width (:meth:`diffquant.devices.DeviceClass.storage_bits`)."""


def storage_type(bits: int, device: DeviceClass | None = None) -> int:
    """ONNX integer type that stores a ``bits``-bit weight on ``device``: INT2, INT4 or INT8.

    ``device`` None: the TensorRT classes' rule (INT4 for 2-4 bits, INT8 for 5-8).
    """
    IntFormat(bits)
    if device is None:
        return TensorProto.INT4 if bits <= 4 else TensorProto.INT8
    return STORAGE_TYPES[device.storage_bits(bits)]


def export_opset(plan: LayerPlan, device: DeviceClass, opset: int) -> int:
    """The opset an export of ``plan`` for ``device`` declares: ``opset``, raised to 25 when a weight is stored as INT2."""
    int2 = any(
        c.weight is not None and not c.weight.is_float and device.storage_bits(c.weight.bits) == 2
        for c in plan.values()
    )
    return max(opset, INT2_OPSET) if int2 else opset


@dataclass(frozen=True)
class ExportInfo:
    """Where an export was written and what it holds."""

    path: Path
    external_data: Path | None
    opset: int
    quantized_layers: int
    weight_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (paths as strings)."""
        return {
            "path": str(self.path),
            "external_data": str(self.external_data) if self.external_data else None,
            "opset": self.opset,
            "quantized_layers": self.quantized_layers,
            "weight_bytes": self.weight_bytes,
        }


class _Mark(torch.autograd.Function):
    """Identity in PyTorch; a ``diffquant.export::Mark`` node in the exported graph."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: str, role: str) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def symbolic(g: Any, x: Any, layer: str, role: str) -> Any:
        return g.op(f"{_MARK_DOMAIN}::Mark", x, layer_s=layer, role_s=role).setType(x.type())


def _mark(x: torch.Tensor, layer: str, role: str) -> torch.Tensor:
    return _Mark.apply(x, layer, role)


class _ExportTransform(nn.Module):
    """A layer's input transform with export marks: explicit ``Pad``, ``Mul`` by ``1 / s``, ``Sub`` of ``c``.

    The constants are computed as the PyTorch layer computes them (``1 / s`` by ``torch.reciprocal``
    in float32), so onnxruntime multiplies and subtracts the same numbers.
    """

    def __init__(self, transform: InputTransform, name: str) -> None:
        super().__init__()
        self.name = name
        self.pad, self.pad_mode = transform.pad, transform.pad_mode
        shape = (-1,) if transform.axis == -1 else (1, -1, 1, 1)
        self.inv = None
        if transform.multiply:
            assert transform.smooth is not None
            inv = torch.reciprocal(transform.smooth.detach().float()).reshape(shape)
            self.inv = nn.Parameter(inv, requires_grad=False)
        self.shift = None
        if transform.shift is not None:
            self.shift = nn.Parameter(transform.shift.detach().float().reshape(shape).clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = _mark(F.pad(x, self.pad, mode=self.pad_mode), self.name, "pad")
        if self.inv is not None:
            x = x * _mark(self.inv, self.name, "smooth")
        if self.shift is not None:
            x = x - _mark(self.shift, self.name, "shift")
        return x


class _ExportLowRank(nn.Module):
    """A low-rank branch with export marks on its two factors (lowered to FLOAT16 initializers + Cast)."""

    def __init__(self, branch: LowRankBranch, name: str) -> None:
        super().__init__()
        self.name, self.conv = name, branch.conv
        down, up = branch.down.detach().float().clone(), branch.up.detach().float().clone()
        if self.conv:
            self.stride, self.padding, self.dilation = branch.stride, branch.padding, branch.dilation
        else:
            down, up = down.t().contiguous(), up.t().contiguous()
        self.down = nn.Parameter(down, requires_grad=False)
        self.up = nn.Parameter(up, requires_grad=False)

    def forward(self, x: torch.Tensor, padded: bool = False) -> torch.Tensor:
        down, up = _mark(self.down, self.name, "lowrank_down"), _mark(self.up, self.name, "lowrank_up")
        if not self.conv:
            return torch.matmul(torch.matmul(x, down), up)
        padding = 0 if padded else self.padding
        return F.conv2d(F.conv2d(x, down, None, self.stride, padding, self.dilation), up)


def _export_parts(layer: nn.Module, name: str) -> tuple[_ExportTransform | None, _ExportLowRank | None, Any]:
    """The layer's marked input transform and low-rank branch (None: absent), and its bias with the shift added back."""
    transform = getattr(layer, "input_transform", None)
    branch = getattr(layer, "low_rank", None)
    bias = layer.effective_bias() if isinstance(layer, (QuantLinear, QuantConv2d)) else layer.bias
    return (
        _ExportTransform(transform, name) if transform is not None else None,
        _ExportLowRank(branch, name) if branch is not None else None,
        None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False),
    )


class _ExportConv(nn.Module):
    """A Conv2d whose input, weight (and, in the onnxruntime form, bias and output) carry export marks.

    Numerically the float layer: marks are identities in PyTorch. An input transform (pad,
    smoothing, shift) runs before the input mark, a low-rank branch reads the transformed input
    beside the quantized convolution, and the bias includes the shift's ``W c``.
    """

    def __init__(
        self, layer: nn.Conv2d, name: str, mark_input: bool, mark_output: bool = False, mark_bias: bool = False
    ) -> None:
        super().__init__()
        self.name, self.mark_input = name, mark_input
        self.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        self.transform, self.low_rank, self.bias = _export_parts(layer, name)
        self.mark_output, self.mark_bias = mark_output, mark_bias and self.bias is not None
        self.stride, self.padding, self.dilation, self.groups = (
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
        )
        self.padding_mode = layer.padding_mode
        self.pad = layer._reversed_padding_repeated_twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = self.transform is not None and self.transform.pad is not None
        if self.transform is not None:
            x = self.transform(x)
        branch_input = x
        if self.mark_input:
            x = _mark(x, self.name, "input")
        w = _mark(self.weight, self.name, "weight")
        b = _mark(self.bias, self.name, "bias") if self.mark_bias else self.bias
        if padded:
            y = F.conv2d(x, w, b, self.stride, 0, self.dilation, self.groups)
        elif self.padding_mode != "zeros":
            x = F.pad(x, self.pad, mode=self.padding_mode)
            y = F.conv2d(x, w, b, self.stride, 0, self.dilation, self.groups)
        else:
            y = F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)
        if self.low_rank is not None:
            y = y + self.low_rank(branch_input, padded)
        return _mark(y, self.name, "output") if self.mark_output else y


class _ExportLinear(nn.Module):
    """A Linear exported as ``MatMul(x, W^T) + b`` with the transposed weight as the initializer.

    A layer that keeps leading tokens in float (``fp_tokens``) becomes
    ``Concat(Expand(FP outputs), MatMul(Q/DQ(x[:, k:]), W^T) + b)`` along the token axis. An input
    transform and a low-rank branch are written as for :class:`_ExportConv`.
    """

    def __init__(self, layer: nn.Linear, name: str, mark_input: bool) -> None:
        super().__init__()
        self.name, self.mark_input = name, mark_input
        self.weight_t = nn.Parameter(layer.weight.detach().t().contiguous(), requires_grad=False)
        self.transform, self.low_rank, self.bias = _export_parts(layer, name)
        self.fp_tokens = int(getattr(layer, "fp_tokens", 0))
        if self.fp_tokens:
            self.register_buffer("fp_token_outputs", layer.fp_token_outputs.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head = None
        if self.fp_tokens:
            head = self.fp_token_outputs.unsqueeze(0).expand(x.shape[0], -1, -1)
            x = x[:, self.fp_tokens :]
        if self.transform is not None:
            x = self.transform(x)
        branch_input = x
        if self.mark_input:
            x = _mark(x, self.name, "input")
        y = torch.matmul(x, _mark(self.weight_t, self.name, "weight"))
        y = y if self.bias is None else y + self.bias
        if self.low_rank is not None:
            y = y + self.low_rank(branch_input)
        return y if head is None else torch.cat([head, y], dim=1)


class _Denoiser(nn.Module):
    """``(sample, timestep[, condition]) -> noise prediction`` over a denoiser."""

    def __init__(self, unet: nn.Module, conditional: bool) -> None:
        super().__init__()
        self.unet, self.conditional = unet, conditional

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor | None = None):
        return self.unet(sample, timestep, condition if self.conditional else None).sample


def _weight_config(quantizer: FakeQuantizer) -> WeightConfig:
    fmt = quantizer.format_name
    if quantizer.group_size is not None:
        return WeightConfig(quantizer.bits, "per_group", quantizer.observer_name, quantizer.group_size, format=fmt)
    return WeightConfig(
        quantizer.bits,
        "per_channel" if quantizer.axis is not None else "per_tensor",
        quantizer.observer_name,
        format=fmt,
    )


def _activation_config(quantizer: FakeQuantizer | None) -> ActivationConfig | None:
    if quantizer is None:
        return None
    return ActivationConfig(quantizer.bits, quantizer.observer_name, quantizer.format_name)


def plan_from_model(unet: nn.Module) -> LayerPlan:
    """The plan a (fake-quantized) denoiser carries: its quantizers, and every other layer in float.

    Args:
        unet: The denoiser, with ``QuantLinear`` / ``QuantConv2d`` layers where quantized.
    """
    plan = LayerPlan()
    for name, module in unet.named_modules():
        if isinstance(module, (QuantLinear, QuantConv2d)):
            wq, aq, oq = module.weight_quantizer, module.input_quantizer, module.output_quantizer
            transform, branch = module.input_transform, module.low_rank
            smooth = None
            if transform is not None and transform.smooth is not None:
                smooth = SmoothConfig(transform.alpha if transform.alpha is not None else 0.0, transform.into)
            plan[name] = LayerConfig(
                _weight_config(wq) if wq is not None else None,
                _activation_config(aq),
                output=_activation_config(oq),
                shift=transform is not None and transform.shift is not None,
                smooth=smooth,
                low_rank=LowRankConfig(branch.rank, branch.dtype) if branch is not None else None,
            )
        elif isinstance(module, QUANTIZABLE):
            plan[name] = LayerConfig(None, None)
    return plan


def _check_matches(unet: nn.Module, plan: LayerPlan) -> None:
    """Raise :class:`ExportError` unless the model's quantizers are exactly the plan's."""
    carried = plan_from_model(unet)
    for name, cfg in plan.items():
        if name not in carried:
            raise ExportError(
                f"plan layer {name!r} is not a Linear/Conv2d of the model; export with the plan it was quantized with"
            )
        own = carried[name]
        w_own = own.weight and (own.weight.bits, own.weight.granularity, own.weight.group_size, own.weight.format)
        w_plan = cfg.weight and (cfg.weight.bits, cfg.weight.granularity, cfg.weight.group_size, cfg.weight.format)
        a_own = own.activation and (own.activation.bits, own.activation.format)
        a_plan = cfg.activation and (cfg.activation.bits, cfg.activation.format)
        o_own = own.output and own.output.bits
        o_plan = cfg.output and cfg.output.bits
        if w_own != w_plan or a_own != a_plan or o_own != o_plan:
            output = f", output {o_own}" if o_own or o_plan else ""
            output_plan = f", output {o_plan}" if o_own or o_plan else ""
            raise ExportError(
                f"layer {name!r}: the model has weight {w_own}, activation {a_own}{output} but the plan says weight "
                f"{w_plan}, activation {a_plan}{output_plan}; export the model quantized with this plan"
            )
        t_own, t_plan = _transform_key(own), _transform_key(cfg)
        if t_own != t_plan:
            raise ExportError(
                f"layer {name!r}: the model has outlier transforms {t_own} but the plan says {t_plan}; "
                "export the model quantized with this plan"
            )
    extra = [n for n, c in carried.items() if n not in plan and not c.is_full_precision]
    if extra:
        raise ExportError(
            f"layer {extra[0]!r} is quantized in the model but not in the plan; pass the model's own plan"
        )


def _transform_key(cfg: LayerConfig) -> dict[str, Any]:
    """What export needs to agree on about a layer's outlier transforms."""
    key: dict[str, Any] = {}
    if cfg.shift:
        key["shift"] = "channel"
    if cfg.smooth is not None:
        key["smooth"] = "folded" if cfg.smooth.into is not None else "multiply"
    if cfg.low_rank is not None:
        key["low_rank"] = (cfg.low_rank.rank, cfg.low_rank.dtype)
    return key


def _quantizer_ready(name: str, quantizer: FakeQuantizer, role: str) -> None:
    if quantizer.mode is not QuantizerMode.QUANTIZE:
        raise ExportError(
            f"layer {name!r}: {role} quantizer is not calibrated (mode {quantizer.mode.value}); calibrate before export"
        )
    if not torch.isfinite(quantizer.scale).all() or (quantizer.scale <= 0).any():
        raise ExportError(f"layer {name!r}: {role} scale is not positive and finite; recalibrate before export")


def _pack(values: np.ndarray, bits: int) -> bytes:
    """Pack signed ``bits``-bit integers (2 or 4) ``8 / bits`` per byte, the first element in the lowest bits (ONNX layout)."""
    per_byte = 8 // bits
    flat = values.astype(np.int8).reshape(-1)
    if flat.size % per_byte:
        flat = np.concatenate([flat, np.zeros(per_byte - flat.size % per_byte, np.int8)])
    fields = (flat.view(np.uint8) & ((1 << bits) - 1)).reshape(-1, per_byte)
    packed = np.zeros(fields.shape[0], np.uint8)
    for k in range(per_byte):
        packed |= (fields[:, k] << (bits * k)).astype(np.uint8)
    return packed.tobytes()


_PACKED_BITS = {TensorProto.INT4: 4, TensorProto.INT2: 2}


def _int_tensor(name: str, values: np.ndarray, data_type: int) -> TensorProto:
    if data_type in _PACKED_BITS:
        packed = _pack(values, _PACKED_BITS[data_type])
        return helper.make_tensor(name, data_type, list(values.shape), packed, raw=True)
    return numpy_helper.from_array(values.astype(np.int8), name)


def _quantized_weight(layer: QuantLinear | QuantConv2d) -> tuple[np.ndarray, np.ndarray, int | None, int | None]:
    """Integers, scales, axis and block size of ``layer``'s weight in the exported layout.

    The integers are computed with the same operations as the fake quant (divide, round half to
    even, clamp), so dequantizing them reproduces PyTorch's weight bit for bit.
    """
    quantizer = layer.weight_quantizer
    assert quantizer is not None
    w = layer.weight_to_quantize().detach().float()
    scale = quantizer.scale.detach().float()
    fmt = quantizer.fmt
    linear = isinstance(layer, QuantLinear)
    if quantizer.group_size is not None:
        g = quantizer.group_size
        q = torch.clamp(torch.round(group_view(w, g) / scale.unsqueeze(2)), fmt.qmin, fmt.qmax).reshape(w.shape)
        if linear:
            return q.t().numpy(), scale.t().contiguous().numpy(), 0, g
        return q.numpy(), scale.numpy(), 1, g
    if quantizer.axis is None:
        q = torch.clamp(torch.round(w / scale.reshape(())), fmt.qmin, fmt.qmax)
        return (q.t() if linear else q).numpy(), scale.reshape(()).numpy(), None, None
    shape = [-1] + [1] * (w.dim() - 1)
    q = torch.clamp(torch.round(w / scale.reshape(shape)), fmt.qmin, fmt.qmax)
    if linear:
        return q.t().numpy(), scale.numpy(), 1, None
    return q.numpy(), scale.numpy(), 0, None


class _Graph:
    """Index of a graph's producers, consumers and initializers for rewriting."""

    def __init__(self, graph: onnx.GraphProto, opset: int = DEFAULT_OPSET) -> None:
        self.graph, self.opset = graph, opset
        self.inits = {t.name: t for t in graph.initializer}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.removed: set[tuple[str, ...]] = set()
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def add_init(self, tensor: TensorProto) -> str:
        if tensor.name in self.inits:
            raise ExportError(f"initializer name {tensor.name!r} is taken; rename the layer before export")
        self.graph.initializer.append(tensor)
        self.inits[tensor.name] = tensor
        return tensor.name

    def drop_init_if_unused(self, name: str, removed: onnx.NodeProto) -> None:
        self.removed.add(tuple(removed.output))
        users = [n for n in self.consumers.get(name, []) if tuple(n.output) not in self.removed]
        if name in self.inits and not users and name not in {o.name for o in self.graph.output}:
            self.graph.initializer.remove(self.inits.pop(name))


def _float_scalar(name: str, value: float) -> TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=np.float32), name)


def _activation_zero_point(name: str, target: str) -> TensorProto:
    """The activation zero point: INT8 0 (TensorRT form) or UINT8 128 (onnxruntime form)."""
    if target == "onnxruntime":
        return numpy_helper.from_array(np.array(ORT_ACTIVATION_ZERO_POINT, dtype=np.uint8), name)
    return numpy_helper.from_array(np.array(0, dtype=np.int8), name)


def _activation_qdq(
    index: _Graph, name: str, role: str, quantizer: FakeQuantizer, source: str, out: str, suffix: str, target: str
) -> list[onnx.NodeProto]:
    """``[Clip ->] QuantizeLinear -> DequantizeLinear`` for the ``role`` (input/output) quantizer of ``name``."""
    _quantizer_ready(name, quantizer, role)
    if quantizer.format_name != "int":
        return lower_float_activation(
            index.add_init, index.inits.__contains__, quantizer, name, role, source, out, suffix
        )
    scale = float(quantizer.scale.reshape(-1)[0])
    fmt = quantizer.fmt
    prefix = f"{name}/{role}_quantizer"
    s_name, z_name = f"{name}.{role}_scale", f"{name}.{role}_zero_point"
    lo, hi = f"{name}.{role}_clip_min", f"{name}.{role}_clip_max"
    if s_name not in index.inits:
        index.add_init(_float_scalar(s_name, scale))
        index.add_init(_activation_zero_point(z_name, target))
        if fmt.bits < 8:
            index.add_init(_float_scalar(lo, fmt.qmin * scale))
            index.add_init(_float_scalar(hi, fmt.qmax * scale))
    nodes = []
    q_in = source
    if fmt.bits < 8:
        q_in = f"{prefix}/Clip{suffix}_output_0"
        nodes.append(helper.make_node("Clip", [source, lo, hi], [q_in], name=f"{prefix}/Clip{suffix}"))
    quantized = f"{prefix}/QuantizeLinear{suffix}_output_0"
    nodes.append(
        helper.make_node("QuantizeLinear", [q_in, s_name, z_name], [quantized], name=f"{prefix}/QuantizeLinear{suffix}")
    )
    nodes.append(
        helper.make_node(
            "DequantizeLinear", [quantized, s_name, z_name], [out], name=f"{prefix}/DequantizeLinear{suffix}"
        )
    )
    return nodes


def quantized_bias(layer: QuantConv2d) -> tuple[np.ndarray, np.ndarray]:
    """``(int32 bias, float32 scale)`` of ``layer``'s bias for onnxruntime's integer convolution.

    The scale is ``s_in * s_w`` (what ``QLinearConv`` accumulates in); the integers are the fake
    quant's own ``round(b / scale)`` (:meth:`QuantConv2d.bias_integers`), so the dequantized bias
    is PyTorch's bit for bit.
    """
    if not layer.integer_bias():
        raise ExportError("an INT32 bias needs a Conv2d with bias and input, weight and output quantizers")
    with torch.no_grad():
        return layer.bias_integers().numpy().astype(np.int32), layer.bias_scale().numpy().astype(np.float32)


def _lower_weight(
    index: _Graph,
    node: onnx.NodeProto,
    module: nn.Module,
    cfg: LayerConfig,
    name: str,
    suffix: str,
    call: int,
    layers: dict[str, dict[str, Any]],
    device: DeviceClass,
) -> list[onnx.NodeProto]:
    """Lower a weight Mark: name the compute node, then a DequantizeLinear of the stored integers (or nothing)."""
    source, out = node.input[0], node.output[0]
    users = index.consumers.get(out, [])
    if len(users) != 1 or users[0].op_type not in ("Conv", "MatMul"):
        raise ExportError(f"layer {name!r}: its weight feeds {[u.op_type for u in users]}, not one Conv/MatMul")
    compute = users[0]
    compute.name = f"{name}/{compute.op_type}{suffix}"
    entry = layers.setdefault(name, {})
    entry.setdefault("node", compute.name)
    entry.setdefault("kind", "conv" if compute.op_type == "Conv" else "linear")
    if cfg.weight is None:
        compute.input[1] = source
        return []
    assert isinstance(module, (QuantLinear, QuantConv2d)) and module.weight_quantizer is not None
    _quantizer_ready(name, module.weight_quantizer, "weight")
    if cfg.weight.is_float:
        index.drop_init_if_unused(source, node)
        return lower_float_weight(index.add_init, module, name, out, suffix, not call, index.opset)
    q, scale, axis, block = _quantized_weight(module)
    data_type = storage_type(cfg.weight.bits, device)
    q_name, s_name, z_name = f"{name}.weight_quantized", f"{name}.weight_scale", f"{name}.weight_zero_point"
    if not call:
        index.add_init(_int_tensor(q_name, q, data_type))
        index.add_init(numpy_helper.from_array(scale.astype(np.float32), s_name))
        index.add_init(_int_tensor(z_name, np.zeros(scale.shape, np.int8), data_type))
    index.drop_init_if_unused(source, node)
    kwargs: dict[str, int] = {}
    if axis is not None:
        kwargs["axis"] = axis
    if block is not None:
        kwargs["block_size"] = block
    prefix = f"{name}/weight_quantizer"
    return [
        helper.make_node(
            "DequantizeLinear", [q_name, s_name, z_name], [out], name=f"{prefix}/DequantizeLinear{suffix}", **kwargs
        )
    ]


def _lower_bias(
    index: _Graph, node: onnx.NodeProto, module: nn.Module, name: str, suffix: str, call: int
) -> onnx.NodeProto:
    """Lower a bias Mark (onnxruntime form): the INT32 bias on the grid ``s_in * s_w``, dequantized."""
    assert isinstance(module, QuantConv2d)
    for part in ("input", "weight"):
        quantizer = getattr(module, f"{part}_quantizer")
        assert quantizer is not None
        _quantizer_ready(name, quantizer, part)
    q_name, s_name = f"{name}.bias_quantized", f"{name}.bias_scale"
    if not call:
        q, scale = quantized_bias(module)
        index.add_init(numpy_helper.from_array(q, q_name))
        index.add_init(numpy_helper.from_array(scale, s_name))
    index.drop_init_if_unused(node.input[0], node)
    axis_kwargs = {"axis": 0} if module.weight_quantizer.axis is not None else {}
    return helper.make_node(
        "DequantizeLinear",
        [q_name, s_name],
        [node.output[0]],
        name=f"{name}/bias_quantizer/DequantizeLinear{suffix}",
        **axis_kwargs,
    )


def _rewire(index: _Graph, old: str, new: str) -> None:
    """Make every consumer of tensor ``old`` read ``new`` instead (a removed identity)."""
    for user in index.consumers.get(old, []):
        for i, name in enumerate(user.input):
            if name == old:
                user.input[i] = new
    index.consumers.setdefault(new, []).extend(index.consumers.pop(old, []))


def _constant(index: _Graph, source: str, name: str, what: str) -> np.ndarray:
    """The value of a traced constant: an initializer, or an ``Identity`` of one (the exporter shares equal values)."""
    seen = 0
    while source not in index.inits and seen < 8:
        producer = next((n for n in index.graph.node if source in n.output), None)
        if producer is None or producer.op_type != "Identity":
            break
        source, seen = producer.input[0], seen + 1
    if source not in index.inits:
        raise ExportError(f"layer {name!r}: its {what} constant was not traced as an initializer")
    return numpy_helper.to_array(index.inits[source])


def _prune_identities(graph: onnx.GraphProto) -> None:
    """Drop ``Identity`` nodes nothing reads any more (shared constants whose readers were lowered), then unread initializers."""
    outputs = {o.name for o in graph.output} | {i.name for i in graph.input}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Identity" and not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input} | outputs
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)


def _lower_transform(index: _Graph, node: onnx.NodeProto, name: str, role: str, suffix: str, call: int) -> None:
    """Lower a transform Mark: name its ``Pad`` / ``Mul`` / ``Sub`` ``<fqn>/input_transform/<Op>``, store its constant.

    ``smooth`` and ``shift`` constants become the initializers ``<fqn>.input_smooth`` (``1 / s``) and
    ``<fqn>.input_shift`` (``c``), in float32.
    """
    source, out = node.input[0], node.output[0]
    prefix = f"{name}/input_transform"
    if role == "pad":
        producer = next((n for n in index.graph.node if source in n.output), None)
        if producer is not None:
            producer.name = f"{prefix}/{producer.op_type}{suffix}"
        _rewire(index, out, source)
        return
    users = index.consumers.get(out, [])
    expected = TRANSFORM_ROLES[role]
    if len(users) != 1 or users[0].op_type != expected:
        raise ExportError(f"layer {name!r}: its {role} constant feeds {[u.op_type for u in users]}, not one {expected}")
    constant = f"{name}.input_{role}"
    if not call:
        index.add_init(numpy_helper.from_array(_constant(index, source, name, role), constant))
    index.drop_init_if_unused(source, node)
    users[0].name = f"{prefix}/{expected}{suffix}"
    _rewire(index, out, constant)


def _lower_low_rank(
    index: _Graph,
    node: onnx.NodeProto,
    branch: LowRankBranch,
    name: str,
    role: str,
    suffix: str,
    call: int,
    layers: dict[str, dict[str, Any]],
) -> list[onnx.NodeProto]:
    """Lower a low-rank factor Mark: the factor as a FLOAT16 initializer and a ``Cast`` (FLOAT: the initializer).

    The factor's MatMul / Conv is named ``<fqn>/low_rank/<down|up>/<Op>`` and listed in the
    layer's ``low_rank`` metadata.
    """
    source, out = node.input[0], node.output[0]
    part = LOW_RANK_ROLES[role]
    users = index.consumers.get(out, [])
    if len(users) != 1 or users[0].op_type not in ("Conv", "MatMul"):
        raise ExportError(f"layer {name!r}: its low-rank {part} factor feeds {[u.op_type for u in users]}")
    prefix = f"{name}/low_rank/{part}"
    users[0].name = f"{prefix}/{users[0].op_type}{suffix}"
    layers.setdefault(name, {}).setdefault("low_rank", {}).setdefault(part, users[0].name)
    stored = f"{name}.low_rank_{part}"
    half = branch.dtype == "float16"
    if not call:
        values = _constant(index, source, name, part)
        index.add_init(numpy_helper.from_array(values.astype(np.float16 if half else np.float32), stored))
    index.drop_init_if_unused(source, node)
    if not half:
        _rewire(index, out, stored)
        return []
    return [helper.make_node("Cast", [stored], [out], name=f"{prefix}/Cast{suffix}", to=TensorProto.FLOAT)]


def _lower_marks(
    model: onnx.ModelProto, unet: nn.Module, plan: LayerPlan, target: str, device: DeviceClass
) -> dict[str, dict[str, Any]]:
    """Replace every Mark node by its Q/DQ lowering (or by nothing); name the compute nodes.

    Weights are stored in ``device``'s storage type (:func:`storage_type`).

    A layer called more than once (DiT's output layer reuses block 0's timestep embedder) gets
    one set of initializers and numbered nodes (``<fqn>/MatMul``, ``<fqn>/MatMul_1``, ...).

    Returns:
        ``{layer_fqn: {"node": compute node name, "kind": "conv" | "linear"}}``.
    """
    graph = model.graph
    opset = next((e.version for e in model.opset_import if e.domain in ("", "ai.onnx")), DEFAULT_OPSET)
    index = _Graph(graph, opset)
    layers: dict[str, dict[str, Any]] = {}
    calls: dict[tuple[str, str], int] = {}
    new_nodes: list[onnx.NodeProto] = []
    for node in list(graph.node):
        if node.domain != _MARK_DOMAIN:
            new_nodes.append(node)
            continue
        attrs = {a.name: a.s.decode() for a in node.attribute}
        name, role = attrs["layer"], attrs["role"]
        module = unet.get_submodule(name)
        cfg = plan[name]
        source, out = node.input[0], node.output[0]
        calls[(name, role)] = call = calls.get((name, role), -1) + 1
        suffix = f"_{call}" if call else ""
        if role == "weight":
            new_nodes.extend(_lower_weight(index, node, module, cfg, name, suffix, call, layers, device))
        elif role == "bias":
            new_nodes.append(_lower_bias(index, node, module, name, suffix, call))
        elif role in TRANSFORM_ROLES:
            _lower_transform(index, node, name, role, suffix, call)
        elif role in LOW_RANK_ROLES:
            assert isinstance(module, (QuantLinear, QuantConv2d)) and module.low_rank is not None
            new_nodes.extend(_lower_low_rank(index, node, module.low_rank, name, role, suffix, call, layers))
        else:
            assert isinstance(module, (QuantLinear, QuantConv2d))
            quantizer = module.input_quantizer if role == "input" else module.output_quantizer
            assert quantizer is not None
            new_nodes.extend(_activation_qdq(index, name, role, quantizer, source, out, suffix, target))
    del graph.node[:]
    graph.node.extend(new_nodes)
    _prune_identities(graph)
    for i, opset in enumerate(model.opset_import):
        if opset.domain == _MARK_DOMAIN:
            del model.opset_import[i]
            break
    missing = [n for n in plan if n not in layers]
    if missing:
        raise ExportError(f"layer {missing[0]!r} of the plan was not traced into the graph; is it used in forward?")
    return layers


def _wrap_layers(unet: nn.Module, plan: LayerPlan, target: str = "tensorrt") -> nn.Module:
    """Copy ``unet`` with every planned layer replaced by its marked export module.

    In the onnxruntime form, a Conv2d with an output quantizer also marks its output and (when
    its input and weight are quantized) its bias, for the INT32 bias of ``QLinearConv``.
    """
    from diffquant.quant.plan import set_module

    wrapped = _deepcopy_module(unet)
    for name, cfg in plan.items():
        layer = wrapped.get_submodule(name)
        mark_input = cfg.activation is not None
        if isinstance(layer, nn.Conv2d):
            mark_output = cfg.output is not None
            mark_bias = target == "onnxruntime" and isinstance(layer, QuantConv2d) and layer.integer_bias()
            set_module(wrapped, name, _ExportConv(layer, name, mark_input, mark_output, mark_bias))
        elif isinstance(layer, nn.Linear):
            if cfg.output is not None:
                raise ExportError(f"layer {name!r}: output quantizers apply to Conv2d layers only")
            set_module(wrapped, name, _ExportLinear(layer, name, mark_input))
        else:
            raise ExportError(f"plan layer {name!r} is a {type(layer).__name__}, not Linear/Conv2d")
    return wrapped


def _deepcopy_module(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


def export_target(plan: LayerPlan, target: str | None = None) -> str:
    """The export form for ``plan``: ``target``, or (None) ``onnxruntime`` when the plan has output quantizers.

    Raises:
        ExportError: If ``target`` is unknown, or ``tensorrt`` for a plan with output quantizers
            (TensorRT's form has none; quantize with ``export.target: tensorrt``).
    """
    if target is None:
        return "onnxruntime" if plan.has_outputs else "tensorrt"
    if target not in TARGETS:
        raise ExportError(f"unknown export target {target!r}; choose one of {', '.join(TARGETS)}")
    if target == "tensorrt" and plan.has_outputs:
        layer = next(name for name, cfg in plan.items() if cfg.output is not None)
        raise ExportError(
            f"layer {layer!r} has an output quantizer, which only the onnxruntime form holds; export with target "
            "'onnxruntime' or quantize with export.target: tensorrt"
        )
    return target


def onnx_target(path: str | Path) -> str:
    """The Q/DQ form of the export at ``path`` (``diffquant.target`` metadata; ``tensorrt`` when absent).

    Raises:
        ExportError: If the file is not a readable ONNX model.
    """
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf's DecodeError and OS errors alike
        raise ExportError(f"{path} is not a readable ONNX model: {error}") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    return meta.get(TARGET_METADATA_KEY, "tensorrt")


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes the initializers of ``model`` take when stored (INT4 counted packed two per byte, INT2 four).

    Works without loading external data: sizes come from element types and shapes.
    """
    return sum(tensor_bytes(tensor) for tensor in model.graph.initializer)


def tensor_bytes(tensor: TensorProto) -> int:
    """Bytes one stored tensor takes (INT4/UINT4/FLOAT4E2M1 packed two per byte, INT2/UINT2 four), from its type and shape."""
    numel = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4, getattr(TensorProto, "FLOAT4E2M1", -1)):
        return (numel + 1) // 2
    if tensor.data_type in (TensorProto.INT2, TensorProto.UINT2):
        return (numel + 3) // 4
    if tensor.data_type == TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    return numel * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def onnx_weight_bytes(path: str | Path) -> int:
    """Bytes of all initializers of the ONNX file at ``path`` (INT4 and INT2 counted packed).

    This is the exported counterpart of :func:`diffquant.quant.plan.deployed_weight_bytes`: its
    count plus the activation quantizers' scalars, the onnxruntime form's bias scales and a few
    shape constants.
    """
    return initializer_bytes(onnx.load(str(path), load_external_data=False))


def _save(model: onnx.ModelProto, path: Path, external: bool) -> Path | None:
    """Save atomically: into a temporary folder beside ``path``, then rename (data file first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    data_name = f"{path.name}.data"
    try:
        if external:
            onnx.save_model(
                model,
                str(tmp / path.name),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
            os.replace(tmp / data_name, path.parent / data_name)
        else:
            onnx.save_model(model, str(tmp / path.name))
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not external and (path.parent / data_name).exists():
        (path.parent / data_name).unlink()
    return path.parent / data_name if external else None


def _trace(model: DiffusionModel, wrapped: nn.Module, opset: int, example_batch: int) -> onnx.ModelProto:
    """Trace the wrapped denoiser (Mark nodes at every quantizer) with the legacy exporter."""
    c, h, w = model.sample_shape
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn((example_batch, c, h, w), generator=generator)
    timestep = torch.arange(example_batch, dtype=torch.long) * 7 + 1
    args: tuple[torch.Tensor, ...] = (sample, timestep)
    names = list(INPUT_NAMES)
    if model.condition is not None:
        condition, _ = model.conditions(example_batch, "calibration")
        assert condition is not None
        args = (*args, condition)
        names.append(CONDITION_INPUTS[model.condition])
    return _trace_module(wrapped, args, names, [OUTPUT_NAME], opset)


def _trace_module(
    wrapped: nn.Module, args: tuple[torch.Tensor, ...], names: list[str], outputs: list[str], opset: int
) -> onnx.ModelProto:
    """Trace ``wrapped`` (Mark nodes at every quantizer) with the legacy exporter, batch axis dynamic."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        raw = Path(tmp) / "traced.onnx"
        with torch.no_grad():
            torch.onnx.export(
                wrapped,
                args,
                str(raw),
                dynamo=False,
                opset_version=min(opset, TRACE_MAX_OPSET),
                input_names=names,
                output_names=outputs,
                dynamic_axes={n: {0: "batch"} for n in [*names, *outputs]},
                custom_opsets={_MARK_DOMAIN: 1},
                do_constant_folding=True,
            )
        return onnx.load(str(raw))


def _check_and_save(
    proto: onnx.ModelProto, path: Path, external_data_threshold: int
) -> tuple[onnx.ModelProto, Path | None, int]:
    """Infer shapes, check the graph and write it (external data past the threshold).

    Returns:
        The checked model, the external data file (or None) and the initializer bytes.
    """
    try:
        proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
        weight_bytes = initializer_bytes(proto)
        external = weight_bytes > external_data_threshold
        if not external:
            onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ExportError(f"the exported graph is not valid ONNX: {str(error).splitlines()[0]}") from None
    data = _save(proto, path, external)
    if external:
        onnx.checker.check_model(str(path), full_check=True)
    return proto, data, weight_bytes


def export_onnx(
    model: DiffusionModel,
    plan: LayerPlan | None,
    path: str | Path,
    opset: int = DEFAULT_OPSET,
    external_data_threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD,
    example_batch: int = 2,
    target: str | None = None,
    device_class: str | DeviceClass | None = None,
) -> ExportInfo:
    """Export ``model``'s denoiser to ONNX, quantized layers as Q/DQ (see the module docstring).

    Args:
        model: The FP model, or a fake-quantized one (``quantize_model`` / ``load_quantized``).
        plan: The plan the model was quantized with; None takes the plan the model's quantizers
            carry (all float for an FP model). The model's quantizers must match it exactly.
        path: Target ``.onnx`` file (written atomically).
        opset: ONNX opset; 21 or more when the plan has INT4 (2-4 bit) or group-wise weights;
            raised to 25 when a weight is stored as INT2 (:func:`export_opset`).
        external_data_threshold: Save tensors to ``<path>.data`` when initializers exceed this
            many bytes.
        example_batch: Batch size of the tracing inputs (the exported batch axis is dynamic).
        target: ``tensorrt`` (TensorRT's explicit-quantization form) or ``onnxruntime`` (UINT8
            activations, output Q/DQ and INT32 biases that onnxruntime fuses into ``QLinearConv``);
            None: ``onnxruntime`` when the plan has output quantizers, else ``tensorrt``.
        device_class: The device class the export is for (:mod:`diffquant.devices`); it decides
            the weights' storage types (INT2 for 2-bit weights on ``cpu``). None: the target's
            default (``tensorrt`` -> ``orin``, ``onnxruntime`` -> ``cpu``).

    Returns:
        The written paths, the declared opset, number of quantized layers and initializer bytes.

    Raises:
        ExportError: Plan and model disagree, a quantizer is uncalibrated, the opset is too old
            for the plan, the target is unknown or cannot hold the plan, or the graph cannot be
            rewritten.
        ConfigError (``device_class``): An unknown class, or one that does not run the target's form.

    Example:
        >>> result = diffquant.quantize(model, diffquant.QuantizeSpec(), calibration)
        >>> info = diffquant.export_onnx(model, result.plan, "model.onnx")
        >>> info.quantized_layers == len(result.plan.quantized_layers())
        True
    """
    path = Path(path)
    unet = model.unet
    if plan is None:
        plan = plan_from_model(unet)
    else:
        _check_matches(unet, plan)
    target = export_target(plan, target)
    device = resolve_device_class(device_class, target)
    check_opset(plan, opset)
    opset = export_opset(plan, device, opset)
    proto = _trace(model, _Denoiser(_wrap_layers(unet, plan, target), model.conditional).eval(), opset, example_batch)
    _lower_and_label(proto, unet, plan, target, opset, device)
    proto, data, weight_bytes = _check_and_save(proto, path, external_data_threshold)
    quantized = len(plan.quantized_layers())
    logger.info(
        "exported %s (%s form, %d quantized layers, %d initializer bytes)", path, target, quantized, weight_bytes
    )
    return ExportInfo(path, data, opset, quantized, weight_bytes)


def check_opset(plan: LayerPlan, opset: int) -> None:
    """Refuse an opset that cannot hold ``plan``: INT4 and block-wise weights need 21, FP8 needs 19.

    FP4 weights are ``FLOAT4E2M1`` from opset 23 and E2M1 values in ``FLOAT8E4M3FN`` at 21-22.

    Raises:
        ExportError: Naming the first layer that needs a newer opset.
    """
    needs: list[tuple[int, str]] = []
    for name, cfg in plan.items():
        w, a = cfg.weight, cfg.activation
        if w is not None and (w.group_size or (w.bits <= 4 and not w.is_float)):
            needs.append((BLOCKED_OPSET, name))
        if (w is not None and w.is_float) or (a is not None and a.is_float):
            needs.append((FP8_OPSET, name))
    needs.append((MIN_OPSET, "-"))
    for required, layer in sorted(needs, key=lambda item: -item[0]):
        if opset < required:
            raise ExportError(f"opset {opset} cannot hold this plan (layer {layer!r}); use opset {BLOCKED_OPSET}")
    if opset >= FP4_TYPE_OPSET and any(c.weight is not None and c.weight.format == "fp4_e2m1" for c in plan.values()):
        float4_type()


def _lower_and_label(
    proto: onnx.ModelProto, module: nn.Module, plan: LayerPlan, target: str, opset: int, device: DeviceClass
) -> None:
    """Set the default-domain opset, lower the traced layer marks to Q/DQ and write diffquant's metadata (in place)."""
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = opset
    if opset >= INT2_OPSET:
        proto.ir_version = max(proto.ir_version, INT2_IR_VERSION)
    layers = _lower_marks(proto, module, plan, target, device)
    proto.metadata_props.append(onnx.StringStringEntryProto(key=LAYERS_METADATA_KEY, value=json.dumps(layers)))
    proto.metadata_props.append(onnx.StringStringEntryProto(key=TARGET_METADATA_KEY, value=target))
    proto.producer_name = "diffquant"


def export_module(
    module: nn.Module,
    plan: LayerPlan,
    example: torch.Tensor,
    path: str | Path,
    opset: int = DEFAULT_OPSET,
    target: str = "tensorrt",
    device_class: str | DeviceClass | None = None,
) -> Path:
    """Export a small (fake-quantized) module of one input with the same Q/DQ lowering as :func:`export_onnx`.

    Used by :mod:`export.profile` to time one layer in exactly the form the full export writes:
    the planned layers are wrapped, traced and lowered by the same functions; the graph has
    input ``x`` (batch axis dynamic) and output ``y``, and the ``diffquant.layers`` /
    ``diffquant.target`` metadata of a full export.

    Args:
        module: The module; the plan's layer names are FQNs inside it.
        plan: The plan its quantizers carry (checked to match).
        example: An input of the shape to trace with.
        path: Target ``.onnx`` file.
        opset: ONNX opset (21 for INT4 or group-wise weights; raised to 25 for INT2 weights).
        target: ``tensorrt`` or ``onnxruntime`` form.
        device_class: The class whose storage types the weights get (None: the target's default).

    Raises:
        ExportError: As :func:`export_onnx`.
    """
    _check_matches(module, plan)
    target = export_target(plan, target)
    device = resolve_device_class(device_class, target)
    check_opset(plan, opset)
    opset = export_opset(plan, device, opset)
    wrapped = _wrap_layers(module, plan, target).eval()
    proto = _trace_module(wrapped, (example,), ["x"], ["y"], opset)
    _lower_and_label(proto, module, plan, target, opset, device)
    _check_and_save(proto, Path(path), DEFAULT_EXTERNAL_DATA_THRESHOLD)
    return Path(path)
