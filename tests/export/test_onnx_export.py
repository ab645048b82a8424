"""ONNX export: torch-vs-onnxruntime parity, TensorRT rules and sizes on a tiny UNet."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from diffquant.errors import ExportError, ParityError
from diffquant.export.onnx import LAYERS_METADATA_KEY, export_onnx, onnx_weight_bytes, plan_from_model
from diffquant.export.parity import OrtDenoiser, ParityConfig, check_parity, ort_session
from diffquant.export.rules import check_rules
from diffquant.quant.plan import ActivationConfig, LayerConfig, WeightConfig, packed_weight_bytes
from diffquant.sampling import denoiser_outputs
from tests.export.conftest import build_plan, quantize

W8 = WeightConfig(8)
CASES = {
    "w8a8_per_channel": (W8, 8, (), None),
    "w4a8_per_channel": (WeightConfig(4), 8, (), None),
    "w4_group8": (WeightConfig(4, "per_group", group_size=8), None, (), None),
    "w3a8": (WeightConfig(3), 8, (), None),
    "w6a8_per_tensor": (WeightConfig(6, "per_tensor"), 8, (), None),
    "w8a4": (W8, 4, (), None),
    "mixed_fp": (
        WeightConfig(4),
        8,
        ("conv_in", "conv_out", "time_embedding.linear_1"),
        {
            "time_embedding.linear_2": LayerConfig(None, ActivationConfig(8)),
            "down_blocks.0.resnets.0.conv1": LayerConfig(
                WeightConfig(5, "per_group", group_size=4), ActivationConfig(6)
            ),
            "down_blocks.1.attentions.0.to_q": LayerConfig(WeightConfig(2), None),
        },
    ),
}


def _types(model: onnx.ModelProto) -> dict[str, int]:
    return {t.name: t.data_type for t in model.graph.initializer}


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_export_matches_torch_and_rules(tiny, tmp_path, case):
    model, calib = tiny
    weight, act, fp, per_layer = CASES[case]
    plan = build_plan(model, weight, act, fp, per_layer)
    qmodel = quantize(model, calib, plan)
    info = export_onnx(qmodel, plan, tmp_path / "m.onnx")
    assert info.external_data is None and info.quantized_layers == len(plan.quantized_layers())

    assert check_rules(info.path, plan) == []
    report = check_parity(info.path, qmodel, calib)
    out = report.outputs
    # weights dequantize bit-exactly; only rounding flips at activation quantizers differ
    assert out.passed and out.p999_abs < out.tolerance, report.to_dict()
    assert report.to_dict()["passed"] is True
    assert report.to_dict()["provider"] == "CPUExecutionProvider"  # this onnxruntime has no GPU provider

    proto = onnx.load(str(info.path))
    types, inits = _types(proto), {t.name for t in proto.graph.initializer}
    for name, cfg in plan.items():
        if cfg.weight is None:
            assert f"{name}.weight_quantized" not in inits
            continue
        expected = TensorProto.INT4 if cfg.weight.bits <= 4 else TensorProto.INT8
        assert types[f"{name}.weight_quantized"] == expected
        q = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == f"{name}.weight_quantized"))
        bound = 2 ** (cfg.weight.bits - 1)
        assert q.astype(np.int32).min() >= -bound and q.astype(np.int32).max() <= bound - 1
    # no float copy of a quantized weight survives
    float_params = [
        t
        for t in proto.graph.initializer
        if t.data_type == TensorProto.FLOAT and not t.name.endswith(("_scale", "_min", "_max"))
    ]
    assert all(".weight_quantized" not in t.name for t in float_params)
    quantized_numel = sum(qmodel.unet.get_submodule(n).weight.numel() for n, c in plan.items() if c.weight is not None)
    float_numel = sum(int(np.prod(t.dims)) for t in float_params)
    assert float_numel < sum(p.numel() for p in model.unet.parameters()) - quantized_numel + 2000


def test_fp_export_matches_torch(tiny, tmp_path):
    model, calib = tiny
    info = export_onnx(model, None, tmp_path / "fp.onnx")
    assert info.quantized_layers == 0
    proto = onnx.load(str(info.path))
    assert not [n for n in proto.graph.node if "Quantize" in n.op_type]
    assert check_rules(proto, plan_from_model(model.unet)) == []
    ort_out = denoiser_outputs(OrtDenoiser(ort_session(info.path)), calib)
    torch_out = denoiser_outputs(model.unet, calib)
    assert (ort_out - torch_out).abs().max() < 1e-5
    # batch is dynamic
    one = OrtDenoiser(ort_session(info.path))(calib.x[:1], calib.t[:1], calib.labels[:1]).sample
    assert torch.allclose(one, torch_out[:1], atol=1e-5)


def test_layer_metadata_names_compute_nodes(tiny, tmp_path):
    model, calib = tiny
    plan = build_plan(model, W8, 8)
    info = export_onnx(quantize(model, calib, plan), plan, tmp_path / "m.onnx")
    proto = onnx.load(str(info.path))
    layers = json.loads({p.key: p.value for p in proto.metadata_props}[LAYERS_METADATA_KEY])
    names = {n.name: n.op_type for n in proto.graph.node}
    assert set(layers) == set(plan)
    for fqn, entry in layers.items():
        assert names[entry["node"]] == ("Conv" if entry["kind"] == "conv" else "MatMul"), fqn
    linear = next(n for n, e in layers.items() if e["kind"] == "linear")
    dq = next(n for n in proto.graph.node if n.name == f"{linear}/weight_quantizer/DequantizeLinear")
    # a Linear is exported as MatMul(x, W^T): its per-output-channel axis is 1
    assert {a.name: a.i for a in dq.attribute}["axis"] == 1


def test_export_refuses_mismatched_plan_and_uncalibrated(tiny, tmp_path):
    model, calib = tiny
    plan = build_plan(model, W8, 8)
    qmodel = quantize(model, calib, plan)
    other = build_plan(model, WeightConfig(4), 8)
    with pytest.raises(ExportError, match="plan says weight"):
        export_onnx(qmodel, other, tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="not a Linear/Conv2d"):
        export_onnx(qmodel, {**plan, "nope": LayerConfig(W8, None)}, tmp_path / "m.onnx")
    import copy

    from diffquant.quant.plan import apply_plan

    raw = copy.deepcopy(model)
    apply_plan(raw.unet, plan)  # activation scales never calibrated
    with pytest.raises(ExportError, match="not calibrated"):
        export_onnx(raw, plan, tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="opset"):
        export_onnx(quantize(model, calib, other), other, tmp_path / "m.onnx", opset=17)
    assert not (tmp_path / "m.onnx").exists()


@pytest.fixture(scope="module")
def digits():
    from diffquant.models.loading import load_model

    return load_model("digits-unet")


def test_w4_weight_bytes_match_the_plan(digits, tmp_path):
    from diffquant.quant.plan import apply_plan

    plan = build_plan(digits, WeightConfig(4), None)
    w4 = copy.deepcopy(digits)
    apply_plan(w4.unet, plan)  # weight-only: no activation calibration needed
    fp = export_onnx(digits, None, tmp_path / "fp.onnx")
    q = export_onnx(w4, plan, tmp_path / "w4.onnx")
    assert onnx_weight_bytes(q.path) == q.weight_bytes
    layers = [digits.unet.get_submodule(n).weight for n in plan.quantized_layers()]
    weights, channels = sum(w.numel() for w in layers), sum(w.shape[0] for w in layers)
    # exact: each quantized fp32 weight becomes packed int4 plus one fp32 scale and one int4 zero
    # point per output channel
    expected = fp.weight_bytes + sum(
        -(-w.numel() // 2) + 4 * w.shape[0] + -(-w.shape[0] // 2) - 4 * w.numel() for w in layers
    )
    assert q.weight_bytes == expected
    # the plan's packed count, plus the int4 zero points and the tracer's few shape constants
    packed = packed_weight_bytes(digits.unet, plan)
    assert 0 <= q.weight_bytes - packed["packed"] - channels // 2 < 2_000
    # quantized weights are 1/8 of their fp32 bytes, plus scales
    assert (fp.weight_bytes - q.weight_bytes) / (4 * weights) == pytest.approx(
        7 / 8 - 4.5 * channels / (4 * weights), abs=1e-4
    )
    assert q.path.stat().st_size < 0.2 * fp.path.stat().st_size


def test_digits_unet_w8a8_export(digits, tmp_path):
    from diffquant.calibration.pool import collect_pool, subset
    from diffquant.calibration.selection import select

    pool = collect_pool(digits, trajectories=8, steps=10, seed=0)
    calib = subset(pool, select(pool, "random", 48, 0))
    plan = build_plan(digits, W8, 8)
    qmodel = quantize(digits, calib, plan)
    info = export_onnx(qmodel, plan, tmp_path / "w8a8.onnx")
    assert check_rules(info.path, plan) == []
    report = check_parity(info.path, qmodel, calib)
    assert report.passed, report.failures()
    assert report.outputs.mean_abs < 2e-3


def test_parity_catches_a_wrong_scale_and_enforces(tiny, tmp_path):
    model, calib = tiny
    plan = build_plan(model, W8, 8)
    qmodel = quantize(model, calib, plan)
    info = export_onnx(qmodel, plan, tmp_path / "m.onnx")
    proto = onnx.load(str(info.path))
    name = "down_blocks.0.resnets.0.conv1.weight_scale"
    tensor = next(t for t in proto.graph.initializer if t.name == name)
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 1.3, name))
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    assert check_rules(proto, plan) == []  # a plausible scale: only parity can tell
    report = check_parity(tmp_path / "bad.onnx", qmodel, calib)
    assert not report.passed and report.to_dict()["failures"]
    with pytest.raises(ParityError, match="does not match the PyTorch model"):
        check_parity(tmp_path / "bad.onnx", qmodel, calib, ParityConfig(enforce=True))


def test_sampling_parity_through_onnxruntime(tiny, tmp_path):
    from diffquant.models.reference import load_classifier

    model, calib = tiny
    plan = build_plan(model, WeightConfig(4), 8)
    qmodel = quantize(model, calib, plan)
    info = export_onnx(qmodel, plan, tmp_path / "m.onnx")
    real = torch.rand(64, 1, 8, 8) * 2 - 1
    report = check_parity(
        info.path, qmodel, calib, ParityConfig(samples=40, steps=5), classifier=load_classifier(), real_images=real
    )
    sampling = report.to_dict()["sampling"]
    assert sampling["passed"] and set(sampling["onnx_metrics"]) == {"accuracy", "fd_real"}
    assert sampling["psnr_onnx_vs_torch"] > 30
    assert abs(sampling["onnx_metrics"]["accuracy"] - sampling["torch_metrics"]["accuracy"]) <= 0.01


def test_external_data_above_threshold(tiny, tmp_path):
    model, calib = tiny
    plan = build_plan(model, W8, 8)
    qmodel = quantize(model, calib, plan)
    info = export_onnx(qmodel, plan, tmp_path / "ext.onnx", external_data_threshold=1000)
    assert info.external_data == tmp_path / "ext.onnx.data" and info.external_data.stat().st_size > 10_000
    assert onnx_weight_bytes(info.path) == info.weight_bytes
    assert check_rules(info.path, plan) == []
    assert check_parity(info.path, qmodel, calib).passed
    # re-export below the threshold removes the stale data file
    export_onnx(qmodel, plan, tmp_path / "ext.onnx")
    assert not (tmp_path / "ext.onnx.data").exists()


def test_parity_prefers_tensorrt_then_cuda_then_the_cpu():
    from diffquant.export.parity import parity_providers

    assert parity_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert parity_providers(["CUDAExecutionProvider", "CPUExecutionProvider", "AzureExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert parity_providers(["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]) == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
