"""FP8 / FP6 / NVFP4 export: onnxruntime parity, the onnx reference evaluator, rules and device classes.

The tiny U-Net is exported twice (FP8 W8A8 and NVFP4 at opset 23, each with the parity check the
pipeline runs); every other form is checked on a small Conv/Linear stack through
:func:`export.onnx.export_module`, the same lowering.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

from diffquant.errors import ExportError
from diffquant.export.onnx import export_module, export_onnx
from diffquant.export.onnx_float import float4_as_float8, float_tensor, float_values
from diffquant.export.parity import check_parity, onnxruntime_model
from diffquant.export.rules import check_rules
from diffquant.quant.float_formats import FLOAT_FORMATS
from diffquant.quant.modules import groups_allowed
from diffquant.quant.plan import (
    ActivationConfig,
    LayerConfig,
    LayerPlan,
    WeightConfig,
    apply_plan,
    input_quantizers,
    quantizable_layers,
)
from tests.export.conftest import quantize

FP8 = WeightConfig(8, format="fp8_e4m3")
A_FP8 = ActivationConfig(8, format="fp8_e4m3")
NVFP4 = WeightConfig(4, "per_group", group_size=16, format="fp4_e2m1")
FORMS = {
    "fp8_e4m3_w8a8": (FP8, A_FP8, 19),
    "fp8_e5m2_per_tensor": (
        WeightConfig(8, "per_tensor", format="fp8_e5m2"),
        ActivationConfig(8, format="fp8_e5m2"),
        21,
    ),
    "fp6_e3m2_a8": (WeightConfig(6, format="fp6_e3m2"), ActivationConfig(8), 21),
    "fp6_e2m3_a8": (WeightConfig(6, "per_tensor", format="fp6_e2m3"), A_FP8, 21),
    "nvfp4_opset21": (NVFP4, A_FP8, 21),
    "nvfp4_opset23": (NVFP4, A_FP8, 23),
}


def _stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(16, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 32, 1), nn.Flatten(), nn.Linear(512, 16)
    )


def _quantized_stack(weight: WeightConfig, act: ActivationConfig | None, layers=("0", "2", "4")):
    module = _stack()
    plan = LayerPlan(
        {name: LayerConfig(weight, act) if name in layers else LayerConfig(None, None) for name in ("0", "2", "4")}
    )
    apply_plan(module, plan)
    x = torch.randn(32, 16, 4, 4, generator=torch.Generator().manual_seed(1)) * 2
    quantizers = input_quantizers(module).values()
    for quantizer in quantizers:
        quantizer.start_observing()
    module(x)
    for quantizer in quantizers:
        quantizer.finish_observing()
    return module, plan, x


def _inits(proto: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in proto.graph.initializer}


@pytest.mark.parametrize("form", list(FORMS))
def test_float_forms_run_on_onnxruntime_and_pass_the_rules(tmp_path, form):
    weight, act, opset = FORMS[form]
    module, plan, x = _quantized_stack(weight, act)
    path = export_module(module, plan, x[:2], tmp_path / "m.onnx", opset=opset)
    proto = onnx.load(str(path))
    assert check_rules(proto, plan) == []
    stored = _inits(proto)["0.weight_quantized"]
    expected = {"fp8_e5m2": TensorProto.FLOAT8E5M2, "fp4_e2m1": TensorProto.FLOAT8E4M3FN}.get(
        weight.format, TensorProto.FLOAT8E4M3FN
    )
    if opset >= 23 and weight.format == "fp4_e2m1":
        expected = TensorProto.FLOAT4E2M1
    assert stored.data_type == expected
    assert np.isin(float_values(stored), FLOAT_FORMATS[weight.format].values().numpy()).all()
    with torch.no_grad():
        reference = module(x).numpy()
    with onnxruntime_model(path) as runnable:
        (got,) = ort.InferenceSession(runnable, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    # weights dequantize bit for bit; an activation a few ulps from a rounding boundary may flip one
    # step (a wrong scale, axis or type moves every output by its own size)
    diff, size = np.abs(got - reference), np.abs(reference)
    assert diff.mean() < 1e-3 * size.mean() and diff.max() < 0.02 * size.max(), (diff.mean(), diff.max())
    if weight.format == "fp4_e2m1":  # the two DQs reproduce PyTorch's block scales bit for bit
        inits = _inits(proto)
        block = float_values(inits["0.weight_block_scale"]) * numpy_helper.to_array(inits["0.weight_global_scale"])
        assert torch.equal(torch.from_numpy(block.astype(np.float32)), module[0].weight_quantizer.effective_scale())


def test_reference_evaluator_runs_the_float4_graph(tmp_path):
    """onnx's reference evaluator runs FLOAT4E2M1 itself (onnxruntime 1.32 does not): same outputs as PyTorch."""
    module, plan, x = _quantized_stack(NVFP4, A_FP8)
    path = export_module(module, plan, x[:2], tmp_path / "m.onnx", opset=23)
    proto = onnx.load(str(path))
    with torch.no_grad():
        expected = module(x[:4]).numpy()
    (got,) = ReferenceEvaluator(proto).run(None, {"x": x[:4].numpy()})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    copy = float4_as_float8(proto)
    for a, b in zip(proto.graph.initializer, copy.graph.initializer, strict=True):
        if a.data_type == TensorProto.FLOAT4E2M1:
            assert b.data_type == TensorProto.FLOAT8E4M3FN and np.array_equal(float_values(a), float_values(b))
        else:
            assert a == b


def test_rules_refuse_what_the_device_class_cannot_run(tmp_path):
    module, plan, x = _quantized_stack(FP8, A_FP8)
    path = export_module(module, plan, x[:2], tmp_path / "fp8.onnx")
    for device in ("ada", "hopper", "blackwell"):
        assert check_rules(path, plan, device_class=device) == []
    found = check_rules(path, plan, device_class="orin")
    assert len(found) == 3 and {v.rule for v in found} == {"device_class"}
    assert "8.9" in found[0].message and "orin" in found[0].message
    module, plan, x = _quantized_stack(NVFP4, None)
    path = export_module(module, plan, x[:2], tmp_path / "fp4.onnx")
    hopper = check_rules(path, plan, device_class="hopper")
    assert len(hopper) == 3 and all("10.0" in v.message for v in hopper)
    blackwell = check_rules(path, plan, device_class="blackwell")
    assert [v.layer for v in blackwell] == ["0", "2"] and all("GEMM" in v.message for v in blackwell)
    module, plan, x = _quantized_stack(NVFP4, None, layers=("4",))
    path = export_module(module, plan, x[:2], tmp_path / "linear.onnx")
    assert check_rules(path, plan, device_class="blackwell") == []


def test_rules_catch_off_grid_values_wrong_zero_points_and_unsaturated_q(tmp_path):
    module, plan, x = _quantized_stack(WeightConfig(6, format="fp6_e3m2"), A_FP8)
    proto = onnx.load(str(export_module(module, plan, x[:2], tmp_path / "m.onnx")))
    assert check_rules(proto, plan) == []
    inits = _inits(proto)
    values = float_values(inits["2.weight_quantized"]).astype(np.float32)
    values.flat[0] = 1.125  # an E4M3 value that is not an E3M2 value (1.001b)
    inits["2.weight_quantized"].CopyFrom(float_tensor("2.weight_quantized", values, TensorProto.FLOAT8E4M3FN))
    inits["2.input_zero_point"].CopyFrom(numpy_helper.from_array(np.array(0, np.int8), "2.input_zero_point"))
    q = next(n for n in proto.graph.node if n.name == "2/input_quantizer/QuantizeLinear")
    next(a for a in q.attribute if a.name == "saturate").i = 0
    assert {v.rule for v in check_rules(proto, plan)} == {"weight_range", "zero_point", "saturate"}


def test_opset_too_old_for_fp8_is_refused(tmp_path):
    module, plan, x = _quantized_stack(FP8, A_FP8)
    with pytest.raises(ExportError, match="opset 18 cannot hold this plan"):
        export_module(module, plan, x[:2], tmp_path / "m.onnx", opset=18)


def _unet_plan(model, weight: WeightConfig, act: ActivationConfig | None) -> LayerPlan:
    """Every layer that can take ``weight`` gets it (NVFP4 needs input counts divisible by 16)."""
    plan = LayerPlan()
    for name in quantizable_layers(model.unet):
        fits = weight.group_size is None or groups_allowed(model.unet.get_submodule(name), weight.group_size)
        plan[name] = LayerConfig(weight, act) if fits else LayerConfig(None, None)
    return plan


def test_unet_fp8_w8a8_export_passes_parity_and_rules(tiny, tmp_path):
    model, calib = tiny
    plan = _unet_plan(model, FP8, A_FP8)
    qmodel = quantize(model, calib, plan)
    info = export_onnx(qmodel, plan, tmp_path / "m.onnx")
    assert check_rules(info.path, plan, device_class="ada") == []
    report = check_parity(info.path, qmodel, calib)
    assert report.passed and report.outputs.p999_abs < report.outputs.tolerance, report.to_dict()
    assert report.notes == []


def test_unet_nvfp4_opset23_parity_runs_the_fp8_container_copy(tiny, tmp_path):
    model, calib = tiny
    plan = _unet_plan(model, NVFP4, A_FP8)
    qmodel = quantize(model, calib, plan)
    info = export_onnx(qmodel, plan, tmp_path / "m.onnx", opset=23)
    proto = onnx.load(str(info.path))
    assert check_rules(proto, plan) == []
    name = next(n for n in plan if n.endswith("to_q"))
    weight_dq = next(n for n in proto.graph.node if n.name == f"{name}/weight_quantizer/DequantizeLinear")
    assert {a.name: a.i for a in weight_dq.attribute} == {"axis": 0, "block_size": 16}  # Linear: W^T [I, O]
    stored = _inits(proto)[f"{name}.weight_quantized"]
    assert stored.data_type == TensorProto.FLOAT4E2M1 and len(stored.raw_data) == np.prod(stored.dims) // 2
    report = check_parity(info.path, qmodel, calib)
    assert report.passed and report.notes and "FLOAT4E2M1" in report.notes[0]
