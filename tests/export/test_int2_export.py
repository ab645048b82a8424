"""INT2 weights: the cpu class's export stores 2-bit weights as INT2 (opset 25), onnxruntime runs it, and the
exported bytes are what ``allocation.cost: deployed`` counts."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, numpy_helper

from diffquant.devices import DEVICE_CLASSES
from diffquant.export.onnx import INT2_OPSET, _int_tensor, export_onnx, tensor_bytes
from diffquant.export.parity import check_parity
from diffquant.export.rules import check_rules
from diffquant.quant.plan import (
    ActivationConfig,
    LayerConfig,
    WeightConfig,
    deployed_weight_bytes,
    stored_weight_bytes,
    weight_scale_count,
)
from tests.export.conftest import build_plan, quantize

A8 = ActivationConfig(8)
PER_LAYER = {  # INT2 per channel (the default below), INT2 block-wise on a conv and a linear, INT4, INT8
    "down_blocks.0.resnets.0.conv2": LayerConfig(WeightConfig(2, "per_group", group_size=4), A8),
    "down_blocks.1.attentions.0.to_q": LayerConfig(WeightConfig(2, "per_group", group_size=8), A8),
    "down_blocks.0.resnets.0.conv1": LayerConfig(WeightConfig(3), A8),
    "down_blocks.1.attentions.0.to_k": LayerConfig(WeightConfig(8), A8),
    "up_blocks.0.attentions.0.to_v": LayerConfig(WeightConfig(2, "per_tensor"), A8),
}


@pytest.fixture(scope="module")
def exports(tiny, tmp_path_factory):
    """One W2-mostly model exported for cpu (onnxruntime form) and for orin (TensorRT form)."""
    model, calib = tiny
    plan = build_plan(model, WeightConfig(2), 8, fp=("conv_in", "conv_out"), per_layer=PER_LAYER)
    qmodel = quantize(model, calib, plan)
    folder = tmp_path_factory.mktemp("int2")
    cpu = export_onnx(qmodel, plan, folder / "cpu.onnx", target="onnxruntime", device_class="cpu")
    orin = export_onnx(qmodel, plan, folder / "orin.onnx", target="tensorrt")
    return qmodel, calib, plan, cpu, orin


def _inits(path) -> dict[str, TensorProto]:
    return {t.name: t for t in onnx.load(str(path)).graph.initializer}


def test_cpu_export_stores_int2_and_matches_torch(exports):
    qmodel, calib, plan, cpu, _ = exports
    proto = onnx.load(str(cpu.path))
    assert cpu.opset == INT2_OPSET and proto.opset_import[0].version == INT2_OPSET and proto.ir_version >= 13
    inits = {t.name: t for t in proto.graph.initializer}
    expected = {2: TensorProto.INT2, 3: TensorProto.INT4, 8: TensorProto.INT8}
    for name, cfg in plan.items():
        if cfg.weight is not None:
            for part in ("weight_quantized", "weight_zero_point"):
                assert inits[f"{name}.{part}"].data_type == expected[cfg.weight.bits], name
            q = numpy_helper.to_array(inits[f"{name}.weight_quantized"]).astype(np.int32)
            assert q.min() >= -(2 ** (cfg.weight.bits - 1)) and q.max() < 2 ** (cfg.weight.bits - 1)
    assert check_rules(cpu.path, plan, device_class="cpu") == []
    report = check_parity(cpu.path, qmodel, calib)  # MatMulNBits and DequantizeLinear on INT2, CPU provider
    # onnxruntime's CPU kernels sum in a thread-count-dependent order: max |diff| was below 1e-4 with two
    # threads and 2.2e-4 with one (OMP_NUM_THREADS=1, as under the test runner's workers)
    assert report.passed and report.outputs.max_abs < 5e-4, report.to_dict()


def test_tensorrt_export_keeps_int4_and_the_rules_refuse_int2_there(exports):
    _, _, plan, _, orin = exports
    assert orin.opset == 21
    inits = _inits(orin.path)
    two_bit = [n for n, c in plan.items() if c.weight is not None and c.weight.bits == 2]
    assert all(inits[f"{n}.weight_quantized"].data_type == TensorProto.INT4 for n in two_bit)
    # the form alone (this plan's group-wise convolution is a device_class violation on orin)
    assert check_rules(orin.path, plan) == []
    proto = onnx.load(str(orin.path))
    layer = two_bit[0]
    for tensor in proto.graph.initializer:
        if tensor.name in (f"{layer}.weight_quantized", f"{layer}.weight_zero_point"):
            tensor.CopyFrom(_int_tensor(tensor.name, numpy_helper.to_array(tensor), TensorProto.INT2))
    violations = check_rules(proto, plan)
    assert [(v.layer, v.rule) for v in violations] == [(layer, "integer_type"), (layer, "integer_type")]
    assert "2-bit weight stored as INT2, expected INT4" in str(violations[0])


def test_deployed_bytes_are_the_exported_initializers(exports):
    """Per layer exactly; and the cpu and orin files differ by exactly the deployed counts' difference."""
    qmodel, _, plan, cpu, orin = exports
    for info, device in ((cpu, DEVICE_CLASSES["cpu"]), (orin, DEVICE_CLASSES["orin"])):
        inits = _inits(info.path)
        for name, cfg in plan.items():
            if cfg.weight is None:
                continue
            weight = qmodel.unet.get_submodule(name).weight
            real = sum(
                tensor_bytes(inits[f"{name}.{p}"]) for p in ("weight_quantized", "weight_scale", "weight_zero_point")
            )
            scales = weight_scale_count(tuple(weight.shape), cfg.weight)
            assert real == stored_weight_bytes(weight.numel(), scales, device.storage_bits(cfg.weight.bits)), name
    deployed = {d: deployed_weight_bytes(qmodel.unet, plan, DEVICE_CLASSES[d]) for d in ("cpu", "orin")}
    assert orin.weight_bytes - cpu.weight_bytes == deployed["orin"] - deployed["cpu"] > 0


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([(TensorProto.INT2, 2), (TensorProto.INT4, 4)]), st.integers(1, 23), st.integers(0, 10**6))
def test_packing_round_trips(kind, size, seed):
    data_type, bits = kind
    values = np.random.default_rng(seed).integers(-(2 ** (bits - 1)), 2 ** (bits - 1), size=(size,)).astype(np.int8)
    tensor = _int_tensor("w", values, data_type)
    assert np.array_equal(numpy_helper.to_array(tensor).astype(np.int8), values)
    assert len(tensor.raw_data) == tensor_bytes(tensor) == -(-size * bits // 8)


def test_digits_unet_weight_only_export_is_its_deployed_count_exactly(tmp_path):
    """A trained model (no folded or shared constants): every initializer byte is one the deployed count has."""
    import copy

    from diffquant.models.loading import load_model
    from diffquant.quant.plan import LayerPlan, apply_plan, quantizable_layers

    model = load_model("digits-unet")
    keep = {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"}
    names = quantizable_layers(model.unet)
    plan = LayerPlan(
        {n: LayerConfig(None if n in keep else WeightConfig([2, 3, 4, 8][i % 4]), None) for i, n in enumerate(names)}
    )
    quantized = copy.deepcopy(model)
    apply_plan(quantized.unet, plan)  # weight-only: nothing to calibrate
    info = export_onnx(quantized, plan, tmp_path / "cpu.onnx", target="onnxruntime")
    assert info.weight_bytes == deployed_weight_bytes(quantized.unet, plan, DEVICE_CLASSES["cpu"])
