"""The onnxruntime export form: parity with PyTorch, QLinearConv fusion, and its rules."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from diffquant.errors import ExportError, RulesError
from diffquant.export.onnx import TARGET_METADATA_KEY, export_onnx, onnx_target, plan_from_model
from diffquant.export.parity import check_parity, denoiser_parity, ort_session
from diffquant.export.rules import check_rules
from diffquant.quant.plan import WeightConfig, with_output_quantizers
from tests.export.conftest import build_plan, quantize

CONV = "down_blocks.0.resnets.0.conv2"  # has an output quantizer and a bias
SHORTCUT = "down_blocks.1.resnets.0.conv_shortcut"  # fed directly by the downsampler's output Q/DQ
LIN = "down_blocks.1.attentions.0.to_k"
# Without onnxruntime's fusion the graph computes what PyTorch computes (weights and biases
# dequantize bit for bit): measured max 3e-7 on the tiny model. With the fusion, QLinearConv
# requantizes its INT32 accumulator with one float multiplier, PyTorch divides the float conv
# output by the output scale: the two round differently within a few ulps of a step boundary, and
# such a flip spreads (measured on the tiny model: max 0.018, mean 5e-4; sometimes none at all).
PARITY_MAX_ABS = 1e-4
FUSED_MAX_ABS = 0.05
FUSED_MEAN_ABS = 2e-3


def ort_plan(model, weight=WeightConfig(8), act_bits=8):
    plan = build_plan(model, weight, act_bits, fp=("conv_in", "conv_out"))
    return with_output_quantizers(model.unet, plan)


@pytest.fixture(scope="module")
def ort_export(tiny, tmp_path_factory):
    model, calib = tiny
    plan = ort_plan(model)
    qmodel = quantize(model, calib, plan)
    info = export_onnx(qmodel, plan, tmp_path_factory.mktemp("ort") / "m.onnx", target="onnxruntime")
    return info.path, plan, qmodel


def _ops_after_ort(path, tmp_path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)


def test_ort_form_matches_torch_and_fuses_qlinearconv(tiny, ort_export, tmp_path):
    path, plan, qmodel = ort_export
    _, calib = tiny
    assert onnx_target(path) == "onnxruntime"
    assert plan_from_model(qmodel.unet) == plan
    outputs = [n for n, c in plan.items() if c.output is not None]
    assert CONV in outputs and "conv_out" not in outputs and LIN not in outputs
    exact = denoiser_parity(ort_session(path, optimize=False), qmodel, calib, 0.05, 0.01)
    assert exact.max_abs < PARITY_MAX_ABS, exact
    fused = denoiser_parity(ort_session(path, optimize=True), qmodel, calib, 0.05, 0.01)
    assert fused.max_abs < FUSED_MAX_ABS and fused.mean_abs < FUSED_MEAN_ABS, fused
    assert check_parity(path, qmodel, calib).passed
    ops = _ops_after_ort(path, tmp_path)
    # every output-quantized Conv became an integer convolution
    assert ops["QLinearConv"] == len(outputs)
    assert ops["Conv"] == 2  # conv_in and conv_out stay float


def test_ort_form_initializers(ort_export):
    path, _, qmodel = ort_export
    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    for role in ("input", "output"):
        zp = inits[f"{CONV}.{role}_zero_point"]
        assert zp.data_type == TensorProto.UINT8 and int(numpy_helper.to_array(zp)) == 128
    assert inits[f"{LIN}.input_zero_point"].data_type == TensorProto.UINT8
    bias = inits[f"{CONV}.bias_quantized"]
    assert bias.data_type == TensorProto.INT32
    layer = qmodel.unet.get_submodule(CONV)
    scale = numpy_helper.to_array(inits[f"{CONV}.bias_scale"])
    np.testing.assert_array_equal(scale, layer.bias_scale().numpy())
    # dequantized bias = the fake quant's bias, bit for bit
    np.testing.assert_array_equal(
        numpy_helper.to_array(bias).astype(np.float32) * scale, layer.quantized_bias().detach().numpy()
    )
    assert f"{CONV}.bias" not in inits  # no float copy left
    assert {p.key: p.value for p in proto.metadata_props}[TARGET_METADATA_KEY] == "onnxruntime"


def test_ort_form_rules_pass_and_target_inferred(ort_export):
    path, plan, _ = ort_export
    assert check_rules(path, plan) == []
    assert check_rules(path, plan, target="onnxruntime") == []
    # the same graph judged as TensorRT's form breaks the zero-point rules, and the plan's outputs
    violations = {(v.node, v.rule) for v in check_rules(path, plan, target="tensorrt")}
    assert (f"{CONV}/input_quantizer/QuantizeLinear", "zero_point") in violations
    assert (f"{CONV}/Conv", "output_needs_onnxruntime") in violations


def _mutated(path):
    return onnx.load(str(path))


def _set_init(model, name, array):
    old = next(t for t in model.graph.initializer if t.name == name)
    model.graph.initializer.remove(old)
    model.graph.initializer.append(numpy_helper.from_array(array, name))


def _node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def _rules(model, plan):
    return {(v.node, v.rule) for v in check_rules(model, plan)}


def test_ort_rules_activation_zero_point_must_be_128(ort_export):
    path, plan, _ = ort_export
    model = _mutated(path)
    _set_init(model, f"{CONV}.output_zero_point", np.array(0, np.uint8))
    found = _rules(model, plan)
    assert (f"{CONV}/output_quantizer/QuantizeLinear", "zero_point") in found
    model = _mutated(path)
    _set_init(model, f"{LIN}.input_zero_point", np.array(0, np.int8))
    assert (f"{LIN}/input_quantizer/QuantizeLinear", "integer_type") in _rules(model, plan)


def test_ort_rules_missing_output_qdq_names_the_conv(ort_export):
    path, plan, _ = ort_export
    model = _mutated(path)
    q = _node(model, f"{CONV}/output_quantizer/QuantizeLinear")
    dq = _node(model, f"{CONV}/output_quantizer/DequantizeLinear")
    conv_out = q.input[0]
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name == dq.output[0]:
                node.input[i] = conv_out
    model.graph.node.remove(q)
    model.graph.node.remove(dq)
    found = _rules(model, plan)
    assert (f"{CONV}/Conv", "missing_output_qdq") in found
    with pytest.raises(RulesError, match=f"onnxruntime Q/DQ-form rules at node '{CONV}/Conv'"):
        check_rules(model, plan, raise_on_violation=True)


def test_ort_rules_output_fanout_blocks_fusion(ort_export):
    path, plan, _ = ort_export
    model = _mutated(path)
    conv = _node(model, f"{CONV}/Conv")
    dq = _node(model, f"{CONV}/output_quantizer/DequantizeLinear")
    user = next(n for n in model.graph.node if dq.output[0] in n.input)
    user.input[list(user.input).index(dq.output[0])] = conv.output[0]  # a second, float consumer
    assert (f"{CONV}/Conv", "missing_output_qdq") in _rules(model, plan)


def test_ort_rules_bias_must_be_int32_with_product_scale(ort_export):
    path, plan, _ = ort_export
    model = _mutated(path)
    _set_init(model, f"{CONV}.bias_scale", numpy_helper.to_array(_init(model, f"{CONV}.bias_scale")) * 2)
    assert (f"{CONV}/bias_quantizer/DequantizeLinear", "bias_scale") in _rules(model, plan)
    model = _mutated(path)
    _set_init(
        model, f"{CONV}.bias_quantized", numpy_helper.to_array(_init(model, f"{CONV}.bias_quantized")).astype(np.int8)
    )
    assert (f"{CONV}/bias_quantizer/DequantizeLinear", "bias_int32") in _rules(model, plan)
    model = _mutated(path)
    conv = _node(model, f"{CONV}/Conv")
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(conv_channels(model), np.float32), "float_bias"))
    conv.input[2] = "float_bias"
    found = _rules(model, plan)
    assert (f"{CONV}/Conv", "bias_int32") in found
    assert (f"{CONV}/bias_quantizer/DequantizeLinear", "unplanned_qdq") in found


def _init(model, name):
    return next(t for t in model.graph.initializer if t.name == name)


def conv_channels(model):
    return int(_init(model, f"{CONV}.bias_scale").dims[0])


def test_ort_rules_output_qdq_on_a_float_output_layer(tiny, ort_export):
    path = ort_export[0]
    model, _ = tiny
    # judge the export against a plan without output quantizers: every output Q/DQ is unplanned
    plain = build_plan(model, WeightConfig(8), 8, fp=("conv_in", "conv_out"))
    found = _rules(_mutated(path), plain)
    assert (f"{CONV}/output_quantizer/QuantizeLinear", "quantized_fp_output") in found
    # the downsampler's output Q feeds the shortcut's input Q: that is the shortcut's input, not an output
    assert not any(node.startswith(f"{SHORTCUT}/input_quantizer") for node, _ in found)


def test_tensorrt_export_refuses_output_quantizers(tiny, ort_export, tmp_path):
    _, plan, qmodel = ort_export
    with pytest.raises(ExportError, match="only the onnxruntime form holds"):
        export_onnx(qmodel, plan, tmp_path / "m.onnx", target="tensorrt")
    with pytest.raises(ExportError, match="unknown export target"):
        export_onnx(qmodel, plan, tmp_path / "m.onnx", target="tflite")
    # a plan without outputs against a model with them: the mismatch is named
    model, _ = tiny
    plain = build_plan(model, WeightConfig(8), 8, fp=("conv_in", "conv_out"))
    with pytest.raises(ExportError, match="output"):
        export_onnx(qmodel, plain, tmp_path / "m.onnx")


def test_ort_form_low_bit_activations_clip(tiny, tmp_path):
    model, calib = tiny
    plan = ort_plan(model, act_bits=6)
    qmodel = quantize(model, calib, plan)
    path = export_onnx(qmodel, plan, tmp_path / "a6.onnx", target="onnxruntime").path
    assert check_rules(path, plan) == []
    report = denoiser_parity(ort_session(path, optimize=False), qmodel, calib, 0.05, 0.01)
    assert report.max_abs < PARITY_MAX_ABS
    model_proto = onnx.load(str(path))
    clip = _node(model_proto, f"{CONV}/output_quantizer/Clip")
    lo = _init(model_proto, clip.input[1])
    _set_init(model_proto, lo.name, numpy_helper.to_array(lo) * 2)
    assert (f"{CONV}/output_quantizer/QuantizeLinear", "activation_clamp") in _rules(model_proto, plan)


def test_digits_unet_ort_form_parity_and_accuracy_path(tmp_path):
    from diffquant.calibration.pool import collect_pool, subset
    from diffquant.calibration.selection import select
    from diffquant.models.loading import load_model

    digits = load_model("digits-unet")
    pool = collect_pool(digits, trajectories=8, steps=10, seed=0)
    calib = subset(pool, select(pool, "random", 48, 0))
    plan = ort_plan(digits)
    qmodel = quantize(digits, calib, plan)
    info = export_onnx(qmodel, plan, tmp_path / "w8a8_ort.onnx")
    assert onnx_target(info.path) == "onnxruntime"
    assert check_rules(info.path, plan) == []
    report = check_parity(info.path, qmodel, calib)
    assert report.passed, report.failures()
    assert report.outputs.mean_abs < 2e-3
