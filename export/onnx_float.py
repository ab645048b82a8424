"""ONNX lowering of floating-point formats: FP8 / FP6 / FP4 weights and FP8 activations.

What :mod:`export.onnx` writes for a layer whose plan has a float format:

- **FP8 weights** (``fp8_e4m3``, ``fp8_e5m2``): a ``FLOAT8E4M3FN`` / ``FLOAT8E5M2`` initializer
  (the fake quant's values, one byte each) behind one ``DequantizeLinear`` with float32 scales
  per output channel or per tensor and a zero point 0 of the same FP8 type (opset 19+).
- **FP6 weights** (``fp6_e3m2``, ``fp6_e2m3``): ONNX has no 6-bit type; every FP6 value is an E4M3
  value, so they are stored as ``FLOAT8E4M3FN`` holding only FP6 values (like a 3-bit integer
  weight in INT4); the rules check verifies the values lie on the FP6 grid.
- **FP4 weights** (``fp4_e2m1``, NVFP4): TensorRT's two-DQ form. The FP8 E4M3 block codes
  ``[O, I/16, *k]`` (Linear: transposed) are dequantized by the float32 global scale into the
  block scales, which a second ``DequantizeLinear`` (``block_size`` 16 along the input axis)
  applies to the E2M1 values. From opset 23 the values are ``FLOAT4E2M1`` (packed two per
  byte, the first in the low nibble); below it (21-22) they are ``FLOAT8E4M3FN`` holding E2M1
  values, which onnxruntime's CPU provider runs (it has no ``FLOAT4E2M1`` kernel:
  ``DequantizeLinear(23)`` and ``Cast(23)`` on FLOAT4E2M1 are "NOT_IMPLEMENTED" in onnxruntime 1.32).
- **FP8 activations**: ``QuantizeLinear(saturate=1) -> DequantizeLinear`` with a float32
  per-tensor scale and an FP8 zero point 0; ``saturate=1`` is TensorRT's clip to +-448.

The stored values are computed with the fake quant's own operations (divide by the scale, round
to the format, saturate), so the dequantized weights equal PyTorch's bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

from diffquant.errors import ExportError
from diffquant.quant.float_formats import FLOAT_FORMATS, FloatFormat
from diffquant.quant.formats import group_view
from diffquant.quant.modules import FakeQuantizer, QuantConv2d, QuantLinear

FP4_TYPE_OPSET = 23
"""First opset whose ``DequantizeLinear`` takes ``FLOAT4E2M1``."""
FP8_OPSET = 19
"""First opset with FP8 ``QuantizeLinear`` / ``DequantizeLinear``."""
_TORCH_FP8 = {TensorProto.FLOAT8E4M3FN: torch.float8_e4m3fn, TensorProto.FLOAT8E5M2: torch.float8_e5m2}
_E2M1_MAGNITUDES = FLOAT_FORMATS["fp4_e2m1"].values()[FLOAT_FORMATS["fp4_e2m1"].values() >= 0].numpy()


def float4_type() -> int:
    """``TensorProto.FLOAT4E2M1``.

    Raises:
        ExportError: This onnx package predates the type (onnx 1.18).
    """
    data_type = getattr(TensorProto, "FLOAT4E2M1", None)
    if data_type is None:
        raise ExportError("this onnx has no FLOAT4E2M1 type (onnx 1.18+); upgrade onnx or export at opset 21")
    return int(data_type)


def container_type(weight_format: str, opset: int) -> int:
    """The ONNX type that stores values of ``weight_format`` at ``opset`` (see the module docstring)."""
    if weight_format == "fp8_e5m2":
        return TensorProto.FLOAT8E5M2
    if weight_format == "fp4_e2m1" and opset >= FP4_TYPE_OPSET:
        return float4_type()
    return TensorProto.FLOAT8E4M3FN


def activation_type(activation_format: str) -> int:
    """The FP8 type of an activation ``QuantizeLinear`` output (and its zero point)."""
    return TensorProto.FLOAT8E5M2 if activation_format == "fp8_e5m2" else TensorProto.FLOAT8E4M3FN


def _pack_e2m1(values: np.ndarray) -> bytes:
    """E2M1 codes (sign << 3 | magnitude index) two per byte, the first element in the low nibble."""
    flat = values.astype(np.float32).reshape(-1)
    index = np.searchsorted(_E2M1_MAGNITUDES, np.abs(flat))
    if not np.array_equal(_E2M1_MAGNITUDES[np.minimum(index, len(_E2M1_MAGNITUDES) - 1)], np.abs(flat)):
        raise ExportError("a weight value is not an FP4 E2M1 value; re-quantize the model before export")
    codes = (np.signbit(flat).astype(np.uint8) << 3) | index.astype(np.uint8)
    if codes.size % 2:
        codes = np.concatenate([codes, np.zeros(1, np.uint8)])
    return (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8).tobytes()


def float_tensor(name: str, values: np.ndarray, data_type: int) -> TensorProto:
    """An initializer of FP8 or FP4 ``data_type`` holding ``values`` (already on the format's grid)."""
    dims = list(values.shape)
    if data_type in _TORCH_FP8:
        raw = torch.from_numpy(np.ascontiguousarray(values, np.float32)).to(_TORCH_FP8[data_type])
        return helper.make_tensor(name, data_type, dims, raw.view(torch.uint8).numpy().tobytes(), raw=True)
    return helper.make_tensor(name, data_type, dims, _pack_e2m1(values), raw=True)


def float_values(tensor: TensorProto) -> np.ndarray:
    """The values of an FP8/FP4 initializer as float64."""
    return numpy_helper.to_array(tensor).astype(np.float64)


def float_weight(layer: QuantLinear | QuantConv2d) -> tuple[np.ndarray, np.ndarray, int | None, int | None]:
    """Values, scales (NVFP4: block codes), axis and block size of ``layer``'s float weight, export layout.

    The values are those of the weight the quantizer sees (with a low-rank branch, ``W - L1 L2``).
    """
    quantizer = layer.weight_quantizer
    assert quantizer is not None and isinstance(quantizer.fmt, FloatFormat)
    fmt = quantizer.fmt
    w = layer.weight_to_quantize().detach().float()
    scale = quantizer.scale.detach().float()
    linear = isinstance(layer, QuantLinear)
    with torch.no_grad():
        if quantizer.group_size is not None:
            g = quantizer.group_size
            effective = quantizer.effective_scale().detach().float().unsqueeze(2)
            values = fmt.round(group_view(w, g) / effective).reshape(w.shape)
            if linear:
                return values.t().numpy(), scale.t().contiguous().numpy(), 0, g
            return values.numpy(), scale.numpy(), 1, g
        if quantizer.axis is None:
            values = fmt.round(w / scale.reshape(()))
            return (values.t() if linear else values).numpy(), scale.reshape(()).numpy(), None, None
        values = fmt.round(w / scale.reshape([-1] + [1] * (w.dim() - 1)))
        return (values.t() if linear else values).numpy(), scale.numpy(), 1 if linear else 0, None


def lower_float_weight(
    add_init: Callable[[TensorProto], str],
    layer: QuantLinear | QuantConv2d,
    name: str,
    out: str,
    suffix: str,
    first_call: bool,
    opset: int,
) -> list[NodeProto]:
    """The initializers (added through ``add_init`` on the first call) and nodes of a float weight."""
    assert layer.weight_quantizer is not None
    quantizer = layer.weight_quantizer
    weight_format = quantizer.format_name
    values, scale, axis, block = float_weight(layer)
    data_type = container_type(weight_format, opset)
    q_name, s_name, z_name = f"{name}.weight_quantized", f"{name}.weight_scale", f"{name}.weight_zero_point"
    prefix = f"{name}/weight_quantizer"
    kwargs: dict[str, int] = {} if axis is None else {"axis": axis}
    if block is not None:
        kwargs["block_size"] = block
    if quantizer.two_level:
        codes_name, global_name = f"{name}.weight_block_scale", f"{name}.weight_global_scale"
        if first_call:
            add_init(float_tensor(q_name, values, data_type))
            add_init(float_tensor(codes_name, scale, TensorProto.FLOAT8E4M3FN))
            add_init(numpy_helper.from_array(quantizer.global_scale.detach().float().numpy(), global_name))
        block_scale = f"{prefix}/block_scale{suffix}"
        return [
            helper.make_node(
                "DequantizeLinear",
                [codes_name, global_name],
                [block_scale],
                name=f"{prefix}/DequantizeLinear_scale{suffix}",
            ),
            helper.make_node(
                "DequantizeLinear", [q_name, block_scale], [out], name=f"{prefix}/DequantizeLinear{suffix}", **kwargs
            ),
        ]
    if first_call:
        add_init(float_tensor(q_name, values, data_type))
        add_init(numpy_helper.from_array(scale.astype(np.float32), s_name))
        add_init(float_tensor(z_name, np.zeros(scale.shape, np.float32), data_type))
    return [
        helper.make_node(
            "DequantizeLinear", [q_name, s_name, z_name], [out], name=f"{prefix}/DequantizeLinear{suffix}", **kwargs
        )
    ]


def lower_float_activation(
    add_init: Callable[[TensorProto], str],
    has_init: Callable[[str], bool],
    quantizer: FakeQuantizer,
    name: str,
    role: str,
    source: str,
    out: str,
    suffix: str,
) -> list[NodeProto]:
    """``QuantizeLinear(saturate=1) -> DequantizeLinear`` of an FP8 activation quantizer (per tensor)."""
    data_type = activation_type(quantizer.format_name)
    prefix = f"{name}/{role}_quantizer"
    s_name, z_name = f"{name}.{role}_scale", f"{name}.{role}_zero_point"
    if not has_init(s_name):
        add_init(numpy_helper.from_array(np.array(float(quantizer.scale.reshape(-1)[0]), dtype=np.float32), s_name))
        add_init(float_tensor(z_name, np.zeros((), np.float32), data_type))
    quantized = f"{prefix}/QuantizeLinear{suffix}_output_0"
    return [
        helper.make_node(
            "QuantizeLinear", [source, s_name, z_name], [quantized], name=f"{prefix}/QuantizeLinear{suffix}", saturate=1
        ),
        helper.make_node(
            "DequantizeLinear", [quantized, s_name, z_name], [out], name=f"{prefix}/DequantizeLinear{suffix}"
        ),
    ]


ORT_FP4_NOTE = (
    "onnxruntime has no FLOAT4E2M1 kernel: its session ran a copy with the FP4 weights re-encoded as FLOAT8E4M3FN "
    "(the same values)"
)


def has_float4(model: ModelProto) -> bool:
    """Whether ``model`` stores any ``FLOAT4E2M1`` initializer (external data need not be loaded)."""
    data_type = getattr(TensorProto, "FLOAT4E2M1", None)
    return data_type is not None and any(t.data_type == data_type for t in model.graph.initializer)


def float4_as_float8(model: ModelProto) -> ModelProto:
    """A copy of ``model`` whose ``FLOAT4E2M1`` initializers hold the same values as ``FLOAT8E4M3FN``.

    Every E2M1 value is an E4M3 value, and ``DequantizeLinear`` gives the same result for both, so
    the copy computes exactly what the FP4 graph computes; onnxruntime (1.32) runs the copy, not
    the original (no ``FLOAT4E2M1`` kernel).
    """
    copy = ModelProto()
    copy.CopyFrom(model)
    data_type = float4_type()
    for i, tensor in enumerate(copy.graph.initializer):
        if tensor.data_type == data_type:
            values = float_values(tensor).astype(np.float32)
            copy.graph.initializer[i].CopyFrom(float_tensor(tensor.name, values, TensorProto.FLOAT8E4M3FN))
    return copy
