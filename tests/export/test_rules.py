"""Rules check: a valid export passes; each mutation is reported with the node at fault."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from diffquant.errors import RulesError
from diffquant.export.onnx import export_onnx
from diffquant.export.rules import check_rules
from diffquant.quant.plan import ActivationConfig, LayerConfig, WeightConfig
from tests.export.conftest import build_plan, quantize

CONV = "down_blocks.0.resnets.0.conv2"  # W4 per-channel, A8
LIN = "down_blocks.1.attentions.0.to_k"  # W4 per-channel (MatMul, axis 1), A8
W3 = "down_blocks.0.resnets.0.conv1"  # W3, A4 (Clip before the INT8 Q)
W6 = "down_blocks.1.attentions.0.to_v"  # W6 per-group 8 (INT8 blocks)
FP = "conv_out"


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    model, calib = tiny
    per_layer = {
        W3: LayerConfig(WeightConfig(3), ActivationConfig(4)),
        W6: LayerConfig(WeightConfig(6, "per_group", group_size=8), ActivationConfig(8)),
    }
    plan = build_plan(model, WeightConfig(4), 8, fp=(FP, "conv_in"), per_layer=per_layer)
    info = export_onnx(quantize(model, calib, plan), plan, tmp_path_factory.mktemp("rules") / "m.onnx")
    return onnx.load(str(info.path)), plan


def _init(model, name):
    return next(t for t in model.graph.initializer if t.name == name)


def _node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def _replace_init(model, name, array, data_type=None):
    old = _init(model, name)
    if data_type == TensorProto.INT4:
        new = helper.make_tensor(name, data_type, array.shape, array.reshape(-1).tolist())
    else:
        new = numpy_helper.from_array(array, name)
    model.graph.initializer.remove(old)
    model.graph.initializer.append(new)


def _violations(model, plan):
    return {(v.node, v.rule) for v in check_rules(model, plan)}


def test_valid_export_passes(exported):
    model, plan = exported
    assert check_rules(model, plan) == []


def test_nonzero_zero_point(exported):
    model, plan = copy.deepcopy(exported[0]), exported[1]
    _replace_init(
        model,
        f"{CONV}.weight_zero_point",
        np.ones(_init(model, f"{CONV}.weight_zero_point").dims, np.int8),
        TensorProto.INT4,
    )
    _replace_init(model, f"{LIN}.input_zero_point", np.array(3, np.int8))
    found = _violations(model, plan)
    assert (f"{CONV}/weight_quantizer/DequantizeLinear", "zero_point") in found
    assert (f"{LIN}/input_quantizer/QuantizeLinear", "zero_point") in found


def test_negative_scale_and_per_channel_activation(exported):
    model, plan = copy.deepcopy(exported[0]), exported[1]
    scale = numpy_helper.to_array(_init(model, f"{CONV}.weight_scale")).copy()
    scale[3] = -scale[3]
    _replace_init(model, f"{CONV}.weight_scale", scale)
    _replace_init(model, f"{LIN}.input_scale", np.array([0.1, 0.2], np.float32))
    found = _violations(model, plan)
    assert (f"{CONV}/weight_quantizer/DequantizeLinear", "scale_positive") in found
    assert (f"{LIN}/input_quantizer/DequantizeLinear", "activation_per_tensor") in found


def test_scale_from_a_constant_node_is_not_an_initializer(exported):
    model, plan = copy.deepcopy(exported[0]), exported[1]
    dq = _node(model, f"{CONV}/weight_quantizer/DequantizeLinear")
    const = helper.make_node("Constant", [], ["runtime_scale"], value=_init(model, f"{CONV}.weight_scale"))
    model.graph.node.insert(0, const)
    dq.input[1] = "runtime_scale"
    assert (dq.name, "constant") in _violations(model, plan)


def test_wrong_axis_for_linear_and_conv(exported):
    model, plan = copy.deepcopy(exported[0]), exported[1]
    for name, axis in ((LIN, 0), (CONV, 1)):
        dq = _node(model, f"{name}/weight_quantizer/DequantizeLinear")
        del dq.attribute[:]
        dq.attribute.append(helper.make_attribute("axis", axis))
    found = _violations(model, plan)
    assert (f"{LIN}/weight_quantizer/DequantizeLinear", "weight_axis") in found
    assert (f"{CONV}/weight_quantizer/DequantizeLinear", "weight_axis") in found


def test_wrong_block_size(exported):
    model, plan = copy.deepcopy(exported[0]), exported[1]
    dq = _node(model, f"{W6}/weight_quantizer/DequantizeLinear")
    for attr in dq.attribute:
        if attr.name == "block_size":
            attr.i = 4
    assert (dq.name, "weight_block") in _violations(model, plan)


def test_wrong_integer_type_and_range(exported):
    model, plan = copy.deepcopy(exported[0]), exported[1]
    # a 4-bit weight stored as INT8, and a 3-bit weight holding the value 5
    q = numpy_helper.to_array(_init(model, f"{CONV}.weight_quantized")).astype(np.int8)
    _replace_init(model, f"{CONV}.weight_quantized", q)
    q3 = numpy_helper.to_array(_init(model, f"{W3}.weight_quantized")).astype(np.int8)
    q3.reshape(-1)[0] = 5
    _replace_init(model, f"{W3}.weight_quantized", q3, TensorProto.INT4)
    found = _violations(model, plan)
    assert (f"{CONV}/weight_quantizer/DequantizeLinear", "integer_type") in found
    assert (f"{W3}/weight_quantizer/DequantizeLinear", "weight_range") in found


def test_float_weight_quantized_at_run_time(exported):
    model, plan = copy.deepcopy(exported[0]), exported[1]
    dq = _node(model, f"{CONV}/weight_quantizer/DequantizeLinear")
    q = numpy_helper.to_array(_init(model, f"{CONV}.weight_quantized")).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(q, "float_weight"))
    quant = helper.make_node(
        "QuantizeLinear", ["float_weight", dq.input[1], dq.input[2]], ["qw"], name="runtime_q", axis=0
    )
    model.graph.node.insert(0, quant)
    dq.input[0] = "qw"
    assert (dq.name, "weight_initializer") in _violations(model, plan)


def test_missing_activation_qdq_and_missing_clip(exported):
    model, plan = copy.deepcopy(exported[0]), exported[1]
    compute = _node(model, f"{LIN}/MatMul")
    q = _node(model, f"{LIN}/input_quantizer/QuantizeLinear")
    compute.input[0] = q.input[0]
    clip = _node(model, f"{W3}/input_quantizer/Clip")
    _node(model, f"{W3}/input_quantizer/QuantizeLinear").input[0] = clip.input[0]
    found = _violations(model, plan)
    assert (compute.name, "missing_activation_qdq") in found
    assert (q.name, "unplanned_qdq") in found  # the orphaned Q/DQ pair belongs to no quantizer
    assert (f"{W3}/input_quantizer/QuantizeLinear", "activation_clamp") in found


def test_int4_activation_is_rejected(exported):
    model, plan = copy.deepcopy(exported[0]), exported[1]
    _replace_init(model, f"{W3}.input_zero_point", np.array(0, np.int8), TensorProto.INT4)
    found = _violations(model, plan)
    assert (f"{W3}/input_quantizer/QuantizeLinear", "int4_activation") in found
    assert (f"{W3}/input_quantizer/QuantizeLinear", "integer_type") in found


def test_quantized_layer_the_plan_keeps_fp(exported):
    model, plan = exported
    fp_plan = type(plan)(plan)
    fp_plan[CONV] = LayerConfig(None, None)
    found = _violations(model, fp_plan)
    assert (f"{CONV}/weight_quantizer/DequantizeLinear", "quantized_fp_layer") in found
    assert (f"{CONV}/input_quantizer/DequantizeLinear", "quantized_fp_layer") in found
    # and the other way round: a planned layer left in float
    q_plan = type(plan)(plan)
    q_plan[FP] = LayerConfig(WeightConfig(8), ActivationConfig(8))
    found = _violations(model, q_plan)
    assert (f"{FP}/Conv", "missing_weight_dq") in found and (f"{FP}/Conv", "missing_activation_qdq") in found


def test_rules_error_names_the_node(exported, tmp_path):
    model, plan = copy.deepcopy(exported[0]), exported[1]
    _replace_init(model, f"{LIN}.input_zero_point", np.array(1, np.int8))
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    with pytest.raises(RulesError, match=f"{LIN}/input_quantizer/QuantizeLinear"):
        check_rules(path, plan, raise_on_violation=True)


@pytest.mark.parametrize("device", ["orin", "ampere", "ada", "hopper", "blackwell"])
def test_device_class_refuses_what_it_cannot_run_naming_the_layer(exported, device):
    """Every weight option on a Conv and a Linear layer, against the class's table entry."""
    from diffquant.devices import DEVICE_CLASSES
    from diffquant.errors import ConfigError

    model, plan = exported
    entry = DEVICE_CLASSES[device]
    # the fixture's W6 group-wise Linear: fine in the form, but TensorRT's block quantization is INT4 only
    found = [v for v in check_rules(model, plan, device_class=device) if v.rule == "device_class"]
    assert [(v.layer, v.node) for v in found] == [(W6, f"{W6}/MatMul")]
    assert f"{W6} cannot run on {device}" in found[0].message and "at most 4 bits" in found[0].message
    with pytest.raises(RulesError, match=f"device class at node '{W6}/MatMul': {W6} cannot run on {device}"):
        check_rules(model, plan, raise_on_violation=True, device_class=device)
    for (layer, kind), bits, group in itertools.product(((CONV, "conv"), (LIN, "linear")), range(2, 9), (None, 8)):
        weight = WeightConfig(bits, "per_group", group_size=group) if group else WeightConfig(bits)
        changed = type(plan)({**plan, W6: LayerConfig(WeightConfig(6), ActivationConfig(8))})
        changed[layer] = LayerConfig(weight, plan[layer].activation)
        refused = [v.layer for v in check_rules(model, changed, device_class=device) if v.rule == "device_class"]
        expected = [layer] if entry.weight_problem(kind, bits, group) is not None else []
        assert refused == expected, (layer, bits, group)
    assert [v.rule for v in check_rules(model, plan) if v.rule == "device_class"] == []  # no class: the form only
    with pytest.raises(ConfigError, match="cpu runs onnxruntime, not the tensorrt form"):
        check_rules(model, plan, device_class="cpu")
