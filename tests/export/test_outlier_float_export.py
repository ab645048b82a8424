"""Outlier methods (shift, SmoothQuant, low-rank branch) on layers with floating-point formats (FP8, NVFP4).

The two features meet on one layer: the plan entry carries a float ``format`` and the outlier
fields, the fake-quant layer quantizes ``W - L1 L2`` on the format's grid after the input
transform, and the export writes the transform and branch around the FP8 Q/DQ or NVFP4 two-DQ
weight. Each case goes through ``diffquant.quantize``, the ONNX export, the rules check (with a
device class that runs the format) and the onnxruntime parity check.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

import diffquant
from diffquant.export.onnx import export_onnx
from diffquant.export.onnx_float import float_values
from diffquant.export.parity import check_parity
from diffquant.export.rules import check_rules
from diffquant.ptq import load_quantized, save_quantized
from diffquant.quant.float_formats import FLOAT_FORMATS
from diffquant.quant.modules import QuantLinear, groups_allowed
from diffquant.quant.plan import PLAN_VERSION_TRANSFORMS, ActivationConfig, LayerConfig, LayerPlan, quantizable_layers
from diffquant.sampling import denoiser_outputs
from diffquant.spec import ActivationQuantSpec, CalibrationSpec, LowRankSpec, QuantizeSpec, SmoothSpec, WeightConfig

LINEAR = "down_blocks.1.attentions.0.to_q"
FP8 = WeightConfig(8, format="fp8_e4m3")
NVFP4 = WeightConfig(4, "per_group", group_size=16, format="fp4_e2m1")
A_FP8 = ActivationConfig(8, format="fp8_e4m3")


def _nvfp4_linear_plan(model) -> LayerPlan:
    """NVFP4 weights and FP8 inputs on every Linear whose inputs split into blocks of 16 (SVDQuant's W4A8 form)."""
    plan = LayerPlan()
    for name in quantizable_layers(model.unet):
        layer = model.unet.get_submodule(name)
        fits = isinstance(layer, torch.nn.Linear) and groups_allowed(layer, 16)
        plan[name] = LayerConfig(NVFP4, A_FP8) if fits else LayerConfig(None, None)
    return plan


CASES = {
    # FP8 W8A8 with every outlier method (smoothing folded where it can be, else an explicit Mul)
    "fp8_w8a8_shift_smooth_low_rank": dict(
        config=QuantizeSpec(
            weight=FP8,
            activation=ActivationQuantSpec(bits=8, format="fp8_e4m3", shift="channel"),
            smooth=SmoothSpec(alpha=0.5),
            low_rank=LowRankSpec(rank=2),
        ),
        device="ada",
        opset=21,
    ),
    # SVDQuant: NVFP4 residual + FP16 low-rank branch, smoothing multiplied in (no folds), FP4 values at opset 23
    "nvfp4_smooth_low_rank_opset23": dict(
        config=QuantizeSpec(smooth=SmoothSpec(alpha=0.5, fold=False), low_rank=LowRankSpec(rank=2)),
        plan=_nvfp4_linear_plan,
        device="blackwell",
        opset=23,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_float_formats_with_outlier_methods_export_and_match_torch(tiny, tmp_path, case):
    model, calib = tiny
    spec = CASES[case]
    qmodel = copy.deepcopy(model)
    plan = spec["plan"](model) if "plan" in spec else None
    result = diffquant.quantize(
        qmodel,
        spec["config"],
        calib,
        calibration=CalibrationSpec(batch_size=12),
        plan=plan,
        device_class=spec["device"],
    )
    cfg = result.plan[LINEAR]
    assert cfg.weight is not None and cfg.weight.is_float and cfg.activation is not None and cfg.activation.is_float
    assert cfg.smooth is not None and cfg.low_rank is not None
    assert result.plan.version == PLAN_VERSION_TRANSFORMS

    layer = qmodel.unet.get_submodule(LINEAR)
    assert isinstance(layer, QuantLinear) and layer.low_rank is not None
    with torch.no_grad():  # the float-format quantizer is calibrated on the residual W - L1 L2, not on W
        residual = layer.weight_to_quantize().detach()
        assert not torch.equal(residual, layer.weight)
        on_residual, on_weight = copy.deepcopy(layer.weight_quantizer), copy.deepcopy(layer.weight_quantizer)
        on_residual.calibrate_from(residual)
        on_weight.calibrate_from(layer.weight.detach())
        assert torch.equal(on_residual.effective_scale(), layer.weight_quantizer.effective_scale())
        assert not torch.equal(on_weight.effective_scale(), layer.weight_quantizer.effective_scale())

    info = export_onnx(qmodel, result.plan, tmp_path / "m.onnx", opset=spec["opset"])
    proto = onnx.load(str(info.path))
    assert check_rules(proto, result.plan, device_class=spec["device"]) == []
    names = {n.name for n in proto.graph.node}
    assert {f"{LINEAR}/low_rank/down/MatMul", f"{LINEAR}/low_rank/up/MatMul"} <= names
    inits = {t.name: t for t in proto.graph.initializer}
    stored = inits[f"{LINEAR}.weight_quantized"]
    expected = TensorProto.FLOAT4E2M1 if cfg.weight.format == "fp4_e2m1" else TensorProto.FLOAT8E4M3FN
    assert stored.data_type == expected
    assert np.isin(float_values(stored), FLOAT_FORMATS[cfg.weight.format].values().numpy()).all()
    report = check_parity(info.path, qmodel, calib)
    assert report.outputs.passed, report.to_dict()

    plan_path, scales_path = save_quantized(qmodel, result.plan, tmp_path / "saved")
    assert LayerPlan.load(plan_path) == result.plan
    loaded = load_quantized(model, plan_path, scales_path)
    assert torch.equal(denoiser_outputs(loaded.unet, calib), denoiser_outputs(qmodel.unet, calib))


def test_plan_entry_with_format_and_transforms_round_trips(tmp_path):
    from diffquant.quant.plan import LowRankConfig, SmoothConfig

    plan = LayerPlan(
        {
            "a": LayerConfig(
                NVFP4, A_FP8, shift=True, smooth=SmoothConfig(0.25, "norm"), low_rank=LowRankConfig(4, "float32")
            ),
            "b": LayerConfig(FP8, A_FP8),
            "c": LayerConfig(None, None),
        }
    )
    path = plan.save(tmp_path / "plan.json")
    saved = path.read_text()
    assert '"version": 3' in saved and '"format": "fp4_e2m1"' in saved and '"shift": "channel"' in saved
    assert LayerPlan.load(path) == plan
    older = LayerPlan({"b": LayerConfig(FP8, A_FP8)})  # formats alone stay at version 1, as before the merge
    assert older.version == 1 and LayerPlan.load(older.save(tmp_path / "older.json")) == older
