"""Check an exported ONNX model against TensorRT's explicit-quantization rules and its plan.

TensorRT (explicit quantization) wants: symmetric Q/DQ (zero point 0), scales that are
constant and positive, per-tensor activation scales, INT8 activations, per-channel weight
scales on the output-channel axis (or block-wise on the input axis with ``block_size``, opset
21), INT4 only as weight-only ``DequantizeLinear``. The plan adds: every planned layer has its
weight DQ and input Q/DQ with the integer type its bits need on the device class
(:func:`export.onnx.storage_type`: INT2 for 2-bit weights on ``cpu``, else INT4 or INT8),
integer weights inside the b-bit range, a ``Clip`` to the b-bit range before an activation
quantized at fewer than 8 bits, and no Q/DQ on a layer the plan keeps in float nor anywhere
outside the planned layers.

Layers are found through the ``diffquant.layers`` metadata of :func:`export.onnx.export_onnx`
(falling back to nodes named ``<fqn>/Conv``, ``<fqn>/MatMul`` or ``<fqn>/Gemm``).

**Outlier transforms** (:mod:`diffquant.quant.transforms`): the float input of a layer the plan
shifts or smooths (unfolded) must reach its input quantizer through ``[Pad ->] [Mul 1/s ->]
[Sub c ->]``, each constant a float initializer with one value per input channel (``1 / s``
positive) that broadcasts on the channel axis, so the Q/DQ itself stays symmetric with zero point
0; a shifted convolution must not pad in the Conv (shift-then-zero-pad is not exact: the padding
must be an explicit ``Pad`` before the ``Sub``). A layer with a low-rank branch must have its two
factors as a MatMul (1x1/KxK Conv) pair reading the same float input as the input quantizer, with
unquantized factor weights (a FLOAT16 initializer behind a ``Cast``, or FLOAT, as the plan's
dtype says; never a ``DequantizeLinear``), the plan's rank, and the branch added to the layer's
output; a branch the plan does not have is a violation too.

**The onnxruntime form** (``diffquant.target`` metadata ``onnxruntime``, or a plan with output
quantizers): activation Q/DQ must be ``UINT8`` with zero point 128 (symmetric INT8 shifted by
128) instead of INT8 with 0; a layer whose plan has an ``output`` quantizer must have its Conv
output feed only its ``[Clip ->] QuantizeLinear -> DequantizeLinear`` (so onnxruntime can fuse
``DQ -> Conv -> Q`` into ``QLinearConv``), and its bias, if any, must come from a
``DequantizeLinear`` of an INT32 initializer with scale ``s_in * s_w`` and zero point 0. A plan
with output quantizers checked against a TensorRT-form graph is a violation, and so is a Q/DQ
after a layer whose plan has no output quantizer.

**Floating-point formats** (:mod:`export.onnx_float`): a float weight must be stored in its
container type (FP8, or ``FLOAT4E2M1`` from opset 23 for NVFP4) with every value on the format's
grid, FP8 zero points 0, NVFP4 block scales a ``DequantizeLinear`` of positive FP8 E4M3 codes by a
per-tensor float32 scale in the plan's block layout; an FP8 input's ``QuantizeLinear`` must
saturate and its zero points be FP8 zeros of the format's type.

**Device classes** (:mod:`diffquant.devices`): given a ``device_class`` (the pipeline always passes
``export.device_class``, whose default is the target's: ``tensorrt`` -> ``orin``), every planned
layer must also be one the class runs. A layer the class
cannot run (group-wise weights on a convolution or above 4 bits on a TensorRT class, FP8 below
compute capability 8.9, FP4 below 10.0 or on a convolution, output quantizers on a GPU class,
which the form rules also catch) is a ``device_class`` violation at its compute node naming the layer and
the class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from diffquant.devices import DeviceClass, resolve_device_class
from diffquant.errors import RulesError
from diffquant.export.onnx import (
    LAYERS_METADATA_KEY,
    ORT_ACTIVATION_ZERO_POINT,
    TARGET_METADATA_KEY,
    TARGETS,
    storage_type,
)
from diffquant.export.onnx_float import activation_type, container_type, float_values
from diffquant.quant.float_formats import E4M3, FLOAT_FORMATS
from diffquant.quant.formats import IntFormat
from diffquant.quant.plan import LayerConfig, LayerPlan, WeightConfig

_INT_TYPES = {
    TensorProto.INT2: "INT2",
    TensorProto.UINT2: "UINT2",
    TensorProto.FLOAT8E4M3FN: "FLOAT8E4M3FN",
    TensorProto.FLOAT8E5M2: "FLOAT8E5M2",
    TensorProto.INT4: "INT4",
    TensorProto.INT8: "INT8",
    TensorProto.UINT8: "UINT8",
    TensorProto.UINT4: "UINT4",
}
_CLIP_RTOL = 1e-6
_BIAS_SCALE_RTOL = 1e-6
_SUB_BYTE_TYPES = (TensorProto.INT4, TensorProto.UINT4, TensorProto.INT2, TensorProto.UINT2)


@dataclass(frozen=True)
class Violation:
    """One broken rule, at one node."""

    node: str
    rule: str
    message: str
    layer: str | None = None

    def __str__(self) -> str:
        """``node: message``."""
        return f"{self.node}: {self.message}"


def rules_error(violations: list[Violation], target: str = "tensorrt") -> RulesError:
    """A :class:`RulesError` naming the first violation's node (and how many there are)."""
    first = violations[0]
    more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
    if first.rule == "device_class":
        return RulesError(
            f"the plan cannot run on its device class at node {first.node!r}: {first.message}{more}; "
            "plan for this class (export.device_class) or pick the class that runs it"
        )
    rules = "TensorRT explicit-quantization" if target == "tensorrt" else "onnxruntime Q/DQ-form"
    return RulesError(
        f"the ONNX export breaks {rules} rules at node {first.node!r}: {first.message}{more}; "
        "re-export the model with its own plan"
    )


def graph_target(model: onnx.ModelProto, plan: LayerPlan) -> str:
    """The Q/DQ form an export claims (``diffquant.target`` metadata), else the plan's.

    A plan with output quantizers implies the onnxruntime form; otherwise TensorRT's.
    """
    meta = {p.key: p.value for p in model.metadata_props}
    claimed = meta.get(TARGET_METADATA_KEY)
    if claimed in TARGETS:
        return claimed
    return "onnxruntime" if plan.has_outputs else "tensorrt"


def _type_name(data_type: int) -> str:
    return _INT_TYPES.get(data_type, TensorProto.DataType.Name(data_type))


class _Checker:
    def __init__(
        self, model: onnx.ModelProto, plan: LayerPlan, target: str = "tensorrt", device: DeviceClass | None = None
    ) -> None:
        self.model, self.plan, self.target = model, plan, target
        self.device = device
        self.storage = device if device is not None else resolve_device_class(None, target)
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        graph = model.graph
        self.inits = {t.name: t for t in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.by_name = {n.name: n for n in graph.node}
        self.opset = next((e.version for e in model.opset_import if e.domain in ("", "ai.onnx")), 0)
        self.violations: list[Violation] = []
        self.claimed: set[str] = set()
        meta = {p.key: p.value for p in model.metadata_props}
        layers = json.loads(meta.get(LAYERS_METADATA_KEY, "{}"))
        self.layer_nodes: dict[str, str] = {k: v["node"] for k, v in layers.items() if "node" in v}
        self.low_rank_nodes: dict[str, dict[str, str]] = {
            k: v["low_rank"] for k, v in layers.items() if "low_rank" in v
        }
        self.float_outputs: list[tuple[str, onnx.NodeProto]] = []
        self.output_computes: set[str] = set()
        for layer, cfg in plan.items():
            compute = self.compute_node(layer)
            if cfg.output is not None and compute is not None:
                self.output_computes |= {n.name for n in self.repeated_calls(compute)}

    def add(self, node: str, rule: str, message: str, layer: str | None = None) -> None:
        self.violations.append(Violation(node, rule, message, layer))

    def compute_node(self, layer: str) -> onnx.NodeProto | None:
        candidates = [self.layer_nodes.get(layer)] + [f"{layer}/{op}" for op in ("Conv", "MatMul", "Gemm")]
        for name in candidates:
            if name and name in self.by_name:
                return self.by_name[name]
        return None

    def repeated_calls(self, compute: onnx.NodeProto) -> list[onnx.NodeProto]:
        """The compute node and its numbered repeats (a layer called more than once: ``<name>_1``, ...)."""
        nodes = [compute]
        while f"{compute.name}_{len(nodes)}" in self.by_name:
            nodes.append(self.by_name[f"{compute.name}_{len(nodes)}"])
        return nodes

    def constant(self, node: onnx.NodeProto, index: int, what: str, layer: str) -> np.ndarray | None:
        """The value of input ``index`` of ``node`` if it is an initializer, else a violation."""
        if index >= len(node.input) or not node.input[index]:
            return None
        name = node.input[index]
        if name not in self.inits:
            self.add(node.name, "constant", f"{what} {name!r} is not a constant initializer", layer)
            return None
        return numpy_helper.to_array(self.inits[name])

    def scale(self, node: onnx.NodeProto, layer: str, what: str) -> np.ndarray | None:
        scale = self.constant(node, 1, f"{what} scale", layer)
        if scale is None:
            if len(node.input) < 2 or not node.input[1]:
                self.add(node.name, "constant", f"{what} has no scale", layer)
            return None
        if scale.dtype.kind != "f":
            self.add(node.name, "scale_type", f"{what} scale has type {scale.dtype}, not float", layer)
        elif not (np.isfinite(scale).all() and (scale > 0).all()):
            self.add(
                node.name, "scale_positive", f"{what} scale is not positive and finite (min {scale.min():g})", layer
            )
        return scale

    def zero_point(
        self, node: onnx.NodeProto, layer: str, what: str, expected_type: int | None, expected_value: int = 0
    ) -> None:
        if len(node.input) < 3 or not node.input[2]:
            if expected_type is not None and expected_type != TensorProto.UINT8:
                self.add(
                    node.name,
                    "integer_type",
                    f"{what} has no zero point, so its type is UINT8, not {_type_name(expected_type)}",
                    layer,
                )
            elif expected_value != 0:
                self.add(node.name, "zero_point", f"{what} has no zero point (0), expected {expected_value}", layer)
            return
        name = node.input[2]
        if name not in self.inits:
            self.add(node.name, "constant", f"{what} zero point {name!r} is not a constant initializer", layer)
            return
        tensor = self.inits[name]
        if expected_type is not None and tensor.data_type != expected_type:
            self.add(
                node.name,
                "integer_type",
                f"{what} zero point is {_type_name(tensor.data_type)}, expected {_type_name(expected_type)}",
                layer,
            )
        if np.any(numpy_helper.to_array(tensor).astype(np.int32) != expected_value):
            why = "TensorRT needs symmetric quantization" if expected_value == 0 else "symmetric INT8 shifted to UINT8"
            self.add(node.name, "zero_point", f"{what} zero point is not {expected_value} ({why})", layer)

    def check_weight(self, layer: str, cfg: LayerConfig, compute: onnx.NodeProto) -> None:
        if len(compute.input) < 2:
            self.add(compute.name, "missing_weight", "has no weight input", layer)
            return
        producer = self.producer.get(compute.input[1])
        if cfg.weight is None:
            if producer is not None and producer.op_type in ("DequantizeLinear", "QuantizeLinear"):
                self.add(
                    producer.name,
                    "quantized_fp_layer",
                    f"quantizes the weight of {layer}, which the plan keeps in float",
                    layer,
                )
                self.claimed.add(producer.name)
            return
        if producer is None or producer.op_type != "DequantizeLinear":
            self.add(
                compute.name, "missing_weight_dq", f"weight of {layer} is not produced by a DequantizeLinear", layer
            )
            return
        self.claimed.add(producer.name)
        if cfg.weight.is_float:
            self.check_float_weight(producer, compute, layer, cfg.weight)
            return
        q = self.weight_integers(producer, layer, cfg.weight.bits)
        scale = self.scale(producer, layer, "weight")
        self.zero_point(producer, layer, "weight", storage_type(cfg.weight.bits, self.storage))
        if q is not None and scale is not None:
            self.weight_layout(producer, compute, layer, cfg.weight, q, scale)

    def check_float_weight(self, dq: onnx.NodeProto, compute: onnx.NodeProto, layer: str, w: WeightConfig) -> None:
        """A float weight: its container type, values on the format's grid, zero point and scales."""
        expected = container_type(w.format, self.opset)
        source = dq.input[0]
        if source not in self.inits:
            self.add(dq.name, "weight_initializer", f"{w.format} weight is not stored as an initializer", layer)
            return
        tensor = self.inits[source]
        if tensor.data_type != expected:
            self.add(
                dq.name,
                "float_type",
                f"{w.format} weight stored as {_type_name(tensor.data_type)}, expected {_type_name(expected)} "
                f"at opset {self.opset}",
                layer,
            )
            return
        values = float_values(tensor)
        grid = FLOAT_FORMATS[w.format].values().numpy()
        off = ~np.isin(values, grid)
        if off.any():
            self.add(
                dq.name,
                "weight_range",
                f"{int(off.sum())} weight values are not {w.format} values (e.g. {values[off][0]:g})",
                layer,
            )
        if len(dq.input) > 2 and dq.input[2]:
            zero = self.inits.get(dq.input[2])
            if zero is None or zero.data_type != tensor.data_type or np.any(float_values(zero) != 0):
                self.add(dq.name, "zero_point", f"{w.format} weight zero point is not a constant 0 of its type", layer)
        if FLOAT_FORMATS[w.format].block_size is not None:
            self.check_block_scales(dq, compute, layer, w, values)
            return
        scale = self.scale(dq, layer, "weight")
        if scale is not None:
            self.weight_layout(dq, compute, layer, w, values, scale)

    def check_block_scales(
        self, dq: onnx.NodeProto, compute: onnx.NodeProto, layer: str, w: WeightConfig, values: np.ndarray
    ) -> None:
        """NVFP4: the block scales are a DequantizeLinear of FP8 E4M3 codes by a positive float32 global scale."""
        scale_dq = self.producer.get(dq.input[1]) if len(dq.input) > 1 else None
        if scale_dq is None or scale_dq.op_type != "DequantizeLinear":
            self.add(
                dq.name, "block_scale", f"NVFP4 block scales of {layer} are not a DequantizeLinear of FP8 codes", layer
            )
            return
        self.claimed.add(scale_dq.name)
        codes = self.inits.get(scale_dq.input[0])
        if codes is None or codes.data_type != TensorProto.FLOAT8E4M3FN:
            kind = _type_name(codes.data_type) if codes is not None else "not an initializer"
            self.add(scale_dq.name, "block_scale", f"NVFP4 block codes of {layer} are {kind}, not FLOAT8E4M3FN", layer)
            return
        code_values = float_values(codes)
        if not (code_values > 0).all() or not np.isin(code_values, E4M3.values().numpy()).all():
            self.add(scale_dq.name, "block_scale", f"NVFP4 block codes of {layer} are not positive E4M3 values", layer)
        global_scale = self.scale(scale_dq, layer, "NVFP4 global")
        if global_scale is not None and global_scale.size != 1:
            self.add(scale_dq.name, "block_scale", f"NVFP4 global scale of {layer} is not per tensor", layer)
        self.weight_layout(dq, compute, layer, w, values, code_values)

    def weight_integers(self, dq: onnx.NodeProto, layer: str, bits: int) -> np.ndarray | None:
        """The stored integer weight of ``dq``, checked for its storage type and range (None: not stored)."""
        expected_type = storage_type(bits, self.storage)
        source = dq.input[0]
        if source not in self.inits:
            origin = self.producer.get(source)
            how = f"by {origin.op_type} {origin.name!r}" if origin is not None else "at run time"
            self.add(
                dq.name, "weight_initializer", f"integer weight is produced {how}, not stored as an initializer", layer
            )
            if origin is not None and origin.op_type == "QuantizeLinear":
                self.claimed.add(origin.name)
            return None
        tensor = self.inits[source]
        if tensor.data_type != expected_type:
            self.add(
                dq.name,
                "integer_type",
                f"{bits}-bit weight stored as {_type_name(tensor.data_type)}, expected {_type_name(expected_type)}",
                layer,
            )
        q = numpy_helper.to_array(tensor).astype(np.int32)
        fmt = IntFormat(bits)
        if q.dtype.kind in "iu" and q.size and (q.min() < fmt.qmin or q.max() > fmt.qmax):
            self.add(
                dq.name,
                "weight_range",
                f"weight values span [{q.min()}, {q.max()}], outside the {bits}-bit range [{fmt.qmin}, {fmt.qmax}]",
                layer,
            )
        return q

    def weight_layout(
        self,
        dq: onnx.NodeProto,
        compute: onnx.NodeProto,
        layer: str,
        w: WeightConfig,
        q: np.ndarray,
        scale: np.ndarray,
    ) -> None:
        """Check the weight scales' granularity, axis and block size against the plan."""
        out_axis, in_axis = self.weight_axes(compute, q.ndim)
        attrs = {a.name: a.i for a in dq.attribute}
        axis = attrs.get("axis", 1)
        axis = axis + q.ndim if axis < 0 else axis
        block = attrs.get("block_size", 0)
        if w.granularity == "per_tensor":
            if scale.size != 1:
                self.add(dq.name, "weight_granularity", f"per-tensor weight has {scale.size} scales", layer)
        elif w.granularity == "per_channel":
            if block:
                self.add(dq.name, "weight_granularity", f"per-channel weight uses block_size {block}", layer)
            if scale.ndim != 1 or axis != out_axis or scale.shape[0] != q.shape[out_axis]:
                self.add(
                    dq.name,
                    "weight_axis",
                    f"per-channel scales {list(scale.shape)} on axis {axis}; expected {q.shape[out_axis]} on the "
                    f"output-channel axis {out_axis} of weight {list(q.shape)}",
                    layer,
                )
        else:
            expected = list(q.shape)
            expected[in_axis] = -(-q.shape[in_axis] // int(w.group_size or 1))
            if block != w.group_size or axis != in_axis or list(scale.shape) != expected:
                self.add(
                    dq.name,
                    "weight_block",
                    f"block-wise scales {list(scale.shape)}, axis {axis}, block_size {block}; expected {expected}, "
                    f"axis {in_axis}, block_size {w.group_size}",
                    layer,
                )

    def weight_axes(self, compute: onnx.NodeProto, rank: int) -> tuple[int, int]:
        """(output-channel axis, input-channel axis) of the weight of ``compute``."""
        if compute.op_type == "Gemm":
            trans_b = next((a.i for a in compute.attribute if a.name == "transB"), 0)
            return (0, 1) if trans_b else (1, 0)
        if compute.op_type == "MatMul":
            return rank - 1, rank - 2
        return 0, 1

    def check_activation(self, layer: str, cfg: LayerConfig, compute: onnx.NodeProto) -> None:
        producer = self.producer.get(compute.input[0])
        if cfg.activation is None:
            if producer is not None and producer.op_type == "DequantizeLinear" and not self.is_output_dq(producer):
                self.add(
                    producer.name,
                    "quantized_fp_layer",
                    f"quantizes the input of {layer}, which the plan keeps in float",
                    layer,
                )
                self.claimed.add(producer.name)
                q = self.producer.get(producer.input[0])
                if q is not None and q.op_type == "QuantizeLinear":
                    self.claimed.add(q.name)
            return
        if producer is None or producer.op_type != "DequantizeLinear":
            self.add(
                compute.name, "missing_activation_qdq", f"input of {layer} is not produced by a DequantizeLinear", layer
            )
            return
        dq = producer
        self.claimed.add(dq.name)
        q = self.producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            self.add(
                dq.name,
                "missing_activation_qdq",
                f"input DequantizeLinear of {layer} is not fed by a QuantizeLinear",
                layer,
            )
            return
        self.claimed.add(q.name)
        if cfg.activation.is_float:
            self.check_float_qdq_pair(layer, cfg.activation.format, q, dq, "activation")
            return
        self.check_qdq_pair(layer, cfg.activation.bits, q, dq, "activation")

    def is_output_dq(self, dq: onnx.NodeProto) -> bool:
        """Whether ``dq`` dequantizes the planned output of another layer (onnxruntime form)."""
        q = self.producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            return False
        source = self.producer.get(q.input[0])
        if source is not None and source.op_type == "Clip":
            source = self.producer.get(source.input[0])
        return source is not None and source.name in self.output_computes

    def activation_type(self) -> tuple[int, int]:
        """(zero-point type, zero-point value) of activation Q/DQ in this graph's form."""
        if self.target == "onnxruntime":
            return TensorProto.UINT8, ORT_ACTIVATION_ZERO_POINT
        return TensorProto.INT8, 0

    def check_float_qdq_pair(self, layer: str, fmt: str, q: onnx.NodeProto, dq: onnx.NodeProto, what: str) -> None:
        """An FP8 activation Q/DQ: FP8 zero point 0 of the format's type, per-tensor equal scales, saturating Q."""
        expected = activation_type(fmt)
        scales = []
        for node in (q, dq):
            scale = self.scale(node, layer, what)
            zero = self.inits.get(node.input[2]) if len(node.input) > 2 else None
            if zero is None or zero.data_type != expected or np.any(float_values(zero) != 0):
                self.add(
                    node.name, "zero_point", f"{fmt} {what} needs a constant {_type_name(expected)} zero point 0", layer
                )
            if scale is not None and scale.size != 1:
                self.add(node.name, "activation_per_tensor", f"{what} scale has shape {list(scale.shape)}", layer)
            scales.append(scale)
        if all(s is not None and s.size == 1 for s in scales) and not np.array_equal(
            scales[0].reshape(()), scales[1].reshape(())
        ):
            self.add(dq.name, "scale_mismatch", "QuantizeLinear and DequantizeLinear scales differ", layer)
        if next((a.i for a in q.attribute if a.name == "saturate"), 1) != 1:
            self.add(
                q.name, "saturate", f"{fmt} {what} QuantizeLinear must saturate (TensorRT clips to the range)", layer
            )

    def check_qdq_pair(self, layer: str, bits: int, q: onnx.NodeProto, dq: onnx.NodeProto, what: str) -> None:
        """Scales, zero points and the b-bit Clip of one activation ``QuantizeLinear -> DequantizeLinear``."""
        expected_type, expected_zero = self.activation_type()
        scales = []
        for node in (q, dq):
            scale = self.scale(node, layer, what)
            self.zero_point(node, layer, what, expected_type, expected_zero)
            if scale is not None and scale.size != 1:
                self.add(
                    node.name,
                    "activation_per_tensor",
                    f"{what} scale has shape {list(scale.shape)}, not per-tensor",
                    layer,
                )
            scales.append(scale)
        if all(s is not None and s.size == 1 for s in scales) and not np.array_equal(
            scales[0].reshape(()), scales[1].reshape(())
        ):
            self.add(dq.name, "scale_mismatch", "QuantizeLinear and DequantizeLinear scales differ", layer)
        if bits < 8 and scales[0] is not None and scales[0].size == 1:
            s = float(scales[0].reshape(()))
            fmt = IntFormat(bits)
            clip = self.producer.get(q.input[0])
            bounds = None
            if clip is not None and clip.op_type == "Clip" and len(clip.input) == 3:
                self.claimed.add(clip.name)
                lo, hi = (self.inits.get(name) for name in clip.input[1:3])
                if lo is not None and hi is not None:
                    bounds = (float(numpy_helper.to_array(lo)), float(numpy_helper.to_array(hi)))
            if bounds is None or not np.allclose(bounds, (fmt.qmin * s, fmt.qmax * s), rtol=_CLIP_RTOL, atol=0):
                self.add(
                    q.name,
                    "activation_clamp",
                    f"{bits}-bit {what} needs Clip to [{fmt.qmin * s:g}, {fmt.qmax * s:g}] before its 8-bit "
                    f"QuantizeLinear (found {bounds})",
                    layer,
                )

    def output_qdq(self, compute: onnx.NodeProto) -> tuple[onnx.NodeProto | None, onnx.NodeProto | None]:
        """The ``QuantizeLinear`` (through an optional Clip) and ``DequantizeLinear`` after ``compute``."""
        users = self.consumers.get(compute.output[0], [])
        if len(users) != 1:
            return None, None
        first = users[0]
        if first.op_type == "Clip":
            after = self.consumers.get(first.output[0], [])
            first = after[0] if len(after) == 1 else first
        if first.op_type != "QuantizeLinear":
            return None, None
        after = self.consumers.get(first.output[0], [])
        dq = after[0] if len(after) == 1 and after[0].op_type == "DequantizeLinear" else None
        return first, dq

    def check_output(self, layer: str, cfg: LayerConfig, compute: onnx.NodeProto) -> None:
        """Output Q/DQ: present exactly when planned, and the Conv's only consumer."""
        users = self.consumers.get(compute.output[0], [])
        if cfg.output is None:
            self.float_outputs.append((layer, compute))
            return
        if self.target != "onnxruntime":
            self.add(
                compute.name,
                "output_needs_onnxruntime",
                f"the plan quantizes the output of {layer}, which only the onnxruntime form holds",
                layer,
            )
        q, dq = self.output_qdq(compute)
        if q is None:
            found = ", ".join(f"{u.op_type} {u.name!r}" for u in users) or "nothing"
            self.add(
                compute.name,
                "missing_output_qdq",
                f"output of {layer} must feed only its QuantizeLinear (onnxruntime fuses DQ -> Conv -> Q); it feeds {found}",
                layer,
            )
            return
        self.claimed.add(q.name)
        if dq is None:
            self.add(
                q.name,
                "missing_output_qdq",
                f"output QuantizeLinear of {layer} is not followed by one DequantizeLinear",
                layer,
            )
            return
        self.claimed.add(dq.name)
        self.check_qdq_pair(layer, cfg.output.bits, q, dq, "output")

    def check_float_outputs(self) -> None:
        """A QuantizeLinear right after a layer the plan keeps with a float output, not another layer's input Q."""
        for layer, compute in self.float_outputs:
            for user in self.consumers.get(compute.output[0], []):
                if user.op_type != "QuantizeLinear" or user.name in self.claimed:
                    continue
                self.add(
                    user.name,
                    "quantized_fp_output",
                    f"quantizes the output of {layer}, which the plan keeps in float",
                    layer,
                )
                self.claimed.add(user.name)
                for after in self.consumers.get(user.output[0], []):
                    if after.op_type == "DequantizeLinear":
                        self.claimed.add(after.name)

    def check_bias(self, layer: str, cfg: LayerConfig, compute: onnx.NodeProto) -> None:
        """An output-quantized Conv's bias: INT32 DequantizeLinear with scale ``s_in * s_w`` and zero point 0."""
        if cfg.output is None or self.target != "onnxruntime" or len(compute.input) < 3 or not compute.input[2]:
            return
        dq = self.producer.get(compute.input[2])
        if dq is None or dq.op_type != "DequantizeLinear":
            self.add(
                compute.name,
                "bias_int32",
                f"bias of {layer} is not an INT32 DequantizeLinear (onnxruntime's QLinearConv fusion needs one)",
                layer,
            )
            return
        self.claimed.add(dq.name)
        source = self.inits.get(dq.input[0])
        if source is None or source.data_type != TensorProto.INT32:
            kind = _type_name(source.data_type) if source is not None else "not an initializer"
            self.add(dq.name, "bias_int32", f"bias of {layer} is {kind}, expected an INT32 initializer", layer)
            return
        scale = self.scale(dq, layer, "bias")
        if len(dq.input) > 2 and dq.input[2]:
            zero = self.inits.get(dq.input[2])
            if zero is None or np.any(numpy_helper.to_array(zero) != 0):
                self.add(dq.name, "zero_point", f"bias zero point of {layer} is not a constant 0", layer)
        expected = self.expected_bias_scale(compute)
        if scale is not None and expected is not None:
            if scale.shape != expected.shape and scale.size != expected.size:
                self.add(
                    dq.name,
                    "bias_scale",
                    f"bias scale has shape {list(scale.shape)}, expected {list(expected.shape)}",
                    layer,
                )
            elif not np.allclose(scale.reshape(-1), expected.reshape(-1), rtol=_BIAS_SCALE_RTOL, atol=0):
                self.add(dq.name, "bias_scale", "bias scale is not input scale x weight scale", layer)

    def expected_bias_scale(self, compute: onnx.NodeProto) -> np.ndarray | None:
        """``s_in * s_w`` from the Conv's input and weight DequantizeLinear scales (None if absent)."""
        scales = []
        for index in (0, 1):
            dq = self.producer.get(compute.input[index])
            if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 2 or dq.input[1] not in self.inits:
                return None
            scales.append(numpy_helper.to_array(self.inits[dq.input[1]]).astype(np.float32))
        return (scales[0].reshape(()) * scales[1]).astype(np.float32)

    def check_device(self, layer: str, cfg: LayerConfig, compute: onnx.NodeProto) -> None:
        """The layer's weight format against its device class's table entry (the form rules cover outputs)."""
        if self.device is None:
            return
        kind = "conv" if compute.op_type == "Conv" else "linear"
        weight_format = cfg.weight.format if cfg.weight is not None else "int"
        act_format = cfg.activation.format if cfg.activation is not None else "int"
        problem = self.device.format_problem(kind, weight_format, act_format)
        if problem is None and cfg.weight is not None:
            problem = self.device.weight_problem(kind, cfg.weight.bits, cfg.weight.group_size)
        if problem is not None:
            self.add(compute.name, "device_class", f"{layer} cannot run on {self.device.name}: {problem}", layer)

    def quantizer_source(self, compute: onnx.NodeProto) -> str:
        """The float tensor that enters the layer's input quantizer (its compute input when not quantized)."""
        tensor = compute.input[0]
        dq = self.producer.get(tensor)
        if dq is None or dq.op_type != "DequantizeLinear":
            return tensor
        q = self.producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            return tensor
        clip = self.producer.get(q.input[0])
        return clip.input[0] if clip is not None and clip.op_type == "Clip" else q.input[0]

    def input_channels(self, compute: onnx.NodeProto) -> int | None:
        """Input channels of the layer's weight (from its initializer, through a DequantizeLinear)."""
        weight = self.producer.get(compute.input[1]) if len(compute.input) > 1 else None
        name = weight.input[0] if weight is not None and weight.op_type == "DequantizeLinear" else compute.input[1]
        tensor = self.inits.get(name)
        if tensor is None or len(tensor.dims) < 2:
            return None
        if compute.op_type == "Conv":
            groups = next((a.i for a in compute.attribute if a.name == "group"), 1)
            return int(tensor.dims[1]) * groups
        return int(tensor.dims[-2])

    def channel_constant(
        self, node: onnx.NodeProto, layer: str, compute: onnx.NodeProto, what: str
    ) -> np.ndarray | None:
        """The per-channel constant (second input) of a transform node, checked for its shape."""
        values = self.constant(node, 1, what, layer)
        if values is None:
            return None
        channels = self.input_channels(compute)
        expected = [channels] if compute.op_type != "Conv" else [1, channels, 1, 1]
        if values.dtype.kind != "f" or (channels is not None and list(values.shape) != expected):
            self.add(
                node.name,
                "transform_constant",
                f"{what} of {layer} is {values.dtype} {list(values.shape)}, expected float {expected} (one per input channel)",
                layer,
            )
            return None
        return values

    def check_transform(self, layer: str, cfg: LayerConfig, compute: onnx.NodeProto) -> None:
        """``[Pad ->] [Mul 1/s ->] [Sub c ->]`` before the input quantizer of a shifted / smoothed layer."""
        multiply = cfg.smooth is not None and cfg.smooth.into is None
        if not (cfg.shift or multiply) or cfg.activation is None:
            return
        node = self.producer.get(self.quantizer_source(compute))
        if cfg.shift:
            if node is None or node.op_type != "Sub":
                found = node.op_type if node is not None else "a graph input"
                self.add(
                    compute.name,
                    "shift_missing",
                    f"input of {layer} is not shifted by a Sub before its Q/DQ (found {found})",
                    layer,
                )
                return
            self.channel_constant(node, layer, compute, "shift")
            node = self.producer.get(node.input[0])
        if multiply:
            if node is None or node.op_type != "Mul":
                self.add(
                    compute.name, "smooth_missing", f"input of {layer} is not multiplied by 1/s before its Q/DQ", layer
                )
                return
            values = self.channel_constant(node, layer, compute, "smoothing 1/s")
            if values is not None and not (np.isfinite(values).all() and (values > 0).all()):
                self.add(node.name, "transform_constant", f"smoothing 1/s of {layer} is not positive and finite", layer)
            node = self.producer.get(node.input[0])
        if cfg.shift and compute.op_type == "Conv":
            pads = next((list(a.ints) for a in compute.attribute if a.name == "pads"), [])
            auto = next((a.s.decode() for a in compute.attribute if a.name == "auto_pad"), "NOTSET")
            if any(pads) or auto not in ("NOTSET", "VALID"):
                self.add(
                    compute.name,
                    "shift_padding",
                    f"shifted convolution {layer} pads in the Conv (pads {pads}, auto_pad {auto}): shift-then-zero-pad "
                    "is not exact; pad explicitly before the Sub",
                    layer,
                )
            if node is not None and node.op_type == "Pad":
                mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "constant")
                value = self.constant(node, 2, "pad value", layer) if mode == "constant" else None
                if value is not None and np.any(value != 0):
                    self.add(node.name, "shift_padding", f"padding of {layer} is not zero", layer)

    def low_rank_node(self, layer: str, part: str) -> onnx.NodeProto | None:
        name = self.low_rank_nodes.get(layer, {}).get(part)
        candidates = [name] + [f"{layer}/low_rank/{part}/{op}" for op in ("MatMul", "Conv")]
        return next((self.by_name[n] for n in candidates if n and n in self.by_name), None)

    def factor(self, node: onnx.NodeProto, layer: str, dtype: str, part: str) -> list[int] | None:
        """Dims of a branch factor, checked to be an unquantized initializer of the plan's dtype."""
        source = node.input[1] if len(node.input) > 1 else ""
        producer = self.producer.get(source)
        expected = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT
        if producer is not None and producer.op_type in ("DequantizeLinear", "QuantizeLinear"):
            self.add(producer.name, "low_rank_quantized", f"the low-rank {part} factor of {layer} is quantized", layer)
            self.claimed.add(producer.name)
            return None
        if producer is not None and producer.op_type == "Cast":
            source = producer.input[0]
        tensor = self.inits.get(source)
        if tensor is None or tensor.data_type != expected:
            found = _type_name(tensor.data_type) if tensor is not None else "not an initializer"
            self.add(
                node.name,
                "low_rank_factor",
                f"the low-rank {part} factor of {layer} is {found}, expected a {_type_name(expected)} initializer",
                layer,
            )
            return None
        return list(tensor.dims)

    def check_low_rank(self, layer: str, cfg: LayerConfig, compute: onnx.NodeProto) -> None:
        """The branch ``up(down(x_hat))`` added to the layer's output, at the plan's rank, unquantized."""
        down, up = self.low_rank_node(layer, "down"), self.low_rank_node(layer, "up")
        if cfg.low_rank is None:
            if down is not None or up is not None:
                self.add(
                    (down or up).name, "unplanned_low_rank", f"{layer} has a low-rank branch the plan does not", layer
                )
            return
        if down is None or up is None:
            self.add(compute.name, "missing_low_rank", f"the low-rank branch of {layer} is not in the graph", layer)
            return
        rank = cfg.low_rank.rank
        dims = self.factor(down, layer, cfg.low_rank.dtype, "down"), self.factor(up, layer, cfg.low_rank.dtype, "up")
        conv = down.op_type == "Conv"
        found = None
        if dims[0] is not None and dims[1] is not None:
            found = (dims[0][0], dims[1][1]) if conv else (dims[0][-1], dims[1][0])
        if found is not None and found != (rank, rank):
            self.add(
                down.name,
                "low_rank_rank",
                f"the low-rank branch of {layer} has rank {found}, the plan says {rank}",
                layer,
            )
        if down.input[0] != self.quantizer_source(compute) or self.producer.get(up.input[0]) is not down:
            self.add(
                down.name,
                "low_rank_input",
                f"the low-rank branch of {layer} does not read the layer's float input",
                layer,
            )
        sums = [u for u in self.consumers.get(up.output[0], []) if u.op_type == "Add"]
        main = {compute.output[0]} | {
            u.output[0] for u in self.consumers.get(compute.output[0], []) if u.op_type == "Add"
        }
        if not any(set(add.input) & main for add in sums):
            self.add(
                up.name, "low_rank_output", f"the low-rank branch of {layer} is not added to the layer's output", layer
            )

    def run(self) -> list[Violation]:
        for layer, cfg in self.plan.items():
            compute = self.compute_node(layer)
            if compute is None:
                if not cfg.is_full_precision:
                    self.add(
                        layer,
                        "missing_layer",
                        f"planned layer {layer} has no Conv/MatMul/Gemm node in the graph",
                        layer,
                    )
                continue
            self.check_device(layer, cfg, compute)
            self.check_low_rank(layer, cfg, compute)
            for call in self.repeated_calls(compute):
                self.check_weight(layer, cfg, call)
                self.check_activation(layer, cfg, call)
                self.check_transform(layer, cfg, call)
                self.check_output(layer, cfg, call)
                self.check_bias(layer, cfg, call)
        self.check_float_outputs()
        for node in self.model.graph.node:
            if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                continue
            zero_point = self.inits.get(node.input[2]) if len(node.input) > 2 else None
            if node.op_type == "QuantizeLinear" and zero_point is not None and zero_point.data_type in _SUB_BYTE_TYPES:
                self.add(
                    node.name,
                    "int4_activation",
                    f"{_type_name(zero_point.data_type)} QuantizeLinear: TensorRT takes INT4 only as weight-only "
                    "DequantizeLinear (and no INT2)",
                )
            if node.name not in self.claimed:
                self.add(node.name, "unplanned_qdq", f"{node.op_type} belongs to no planned quantizer")
        return self.violations


def check_rules(
    model: onnx.ModelProto | str | Path,
    plan: LayerPlan,
    raise_on_violation: bool = False,
    target: str | None = None,
    device_class: str | DeviceClass | None = None,
) -> list[Violation]:
    """Validate an export against TensorRT's explicit-quantization rules (or the onnxruntime form's), ``plan`` and its device class.

    Args:
        model: The exported model, or the path of its ``.onnx`` file (external data is loaded).
        plan: The plan it was exported with (FP layers included, so Q/DQ on them is caught).
        raise_on_violation: Raise instead of returning a non-empty list.
        target: The form to check, ``tensorrt`` or ``onnxruntime``; None takes the graph's
            ``diffquant.target`` metadata, else ``onnxruntime`` when the plan has output quantizers.
        device_class: The class the plan is for (``orin``, ..., ``cpu``; :mod:`diffquant.devices`);
            a planned layer the class cannot run is a ``device_class`` violation naming the layer
            and the class; it also says which integer type stores each weight (INT2 for 2-bit
            weights on ``cpu``). None checks the form alone, with the target's default class's
            storage types (``tensorrt`` -> ``orin``, ``onnxruntime`` -> ``cpu``).

    Returns:
        Every violation, each naming the node at fault; empty when the export is valid.

    Raises:
        RulesError: With ``raise_on_violation``, if any rule is broken (names the first node).
        ConfigError (``device_class``): An unknown class, or one that does not run ``target``'s form.

    Example:
        >>> diffquant.check_rules("model.onnx", result.plan)  # [] when the graph is clean
        []
    """
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    target = target or graph_target(proto, plan)
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    device = resolve_device_class(device_class, target) if device_class is not None else None
    violations = _Checker(proto, plan, target, device).run()
    if violations and raise_on_violation:
        raise rules_error(violations, target)
    return violations
