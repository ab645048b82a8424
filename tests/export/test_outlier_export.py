"""Shift, smoothing and low-rank branches in the ONNX export: onnxruntime parity and the rules of each form."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import diffquant
from diffquant.errors import ExportError
from diffquant.export.onnx import export_onnx
from diffquant.export.parity import check_parity
from diffquant.export.rules import check_rules
from diffquant.quant.plan import LayerPlan, LowRankConfig
from diffquant.spec import ActivationQuantSpec, CalibrationSpec, LowRankSpec, QuantizeSpec, SmoothSpec, WeightConfig

SHIFT = ActivationQuantSpec(bits=8, shift="channel")
CASES = {
    "w4a8_all_folded_fp16_branch": (
        QuantizeSpec(weight=WeightConfig(4), activation=SHIFT, smooth=SmoothSpec(), low_rank=LowRankSpec(rank=2)),
        "tensorrt",
    ),
    "w8a6_shift_only": (QuantizeSpec(activation=ActivationQuantSpec(bits=6, shift="channel")), "tensorrt"),
    "w4a8_multiply_fp32_branch": (
        QuantizeSpec(
            weight=WeightConfig(4),
            smooth=SmoothSpec(alpha=0.8, fold=False),
            low_rank=LowRankSpec(rank=3, dtype="float32"),
        ),
        "tensorrt",
    ),
    "onnxruntime_form_shift_smooth": (
        QuantizeSpec(activation=SHIFT, smooth=SmoothSpec(), low_rank=LowRankSpec(rank=2, layers=["*to_q"])),
        "onnxruntime",
    ),
}
CONV = "down_blocks.0.resnets.0.conv1"  # 3x3, padding 1, after a SiLU: explicit Pad, Mul and Sub
LINEAR = "down_blocks.1.attentions.0.to_q"


_EXPORTS: dict[str, tuple] = {}


def _exported(tiny, case: str, folder) -> tuple:
    """``(quantized model, plan, packed bytes, ExportInfo)`` of a case, made once per session."""
    if case not in _EXPORTS:
        model, calib = tiny
        config, target = CASES[case]
        qmodel = copy.deepcopy(model)
        result = diffquant.quantize(qmodel, config, calib, calibration=CalibrationSpec(batch_size=12), target=target)
        info = export_onnx(qmodel, result.plan, folder / f"{case}.onnx")
        _EXPORTS[case] = (qmodel, result.plan, result.packed_bytes, info)
    return _EXPORTS[case]


@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_torch_and_passes_the_rules(tiny, tmp_path_factory, case):
    target = CASES[case][1]
    qmodel, plan, packed, info = _exported(tiny, case, tmp_path_factory.mktemp("outliers"))
    assert check_rules(info.path, plan, device_class="orin" if target == "tensorrt" else "cpu") == []
    report = check_parity(info.path, qmodel, tiny[1])
    assert report.outputs.passed, report.to_dict()
    assert abs(info.weight_bytes - packed) < 0.02 * packed  # zero points and shape constants aside
    proto = onnx.load(str(info.path))
    names = {n.name for n in proto.graph.node}
    if plan[CONV].shift:
        assert {f"{CONV}/input_transform/Pad", f"{CONV}/input_transform/Sub"} <= names
        conv = next(n for n in proto.graph.node if n.name == f"{CONV}/Conv")
        assert not any(next((a.ints for a in conv.attribute if a.name == "pads"), []))
    if plan[CONV].smooth is not None and plan[CONV].smooth.into is None:
        assert f"{CONV}/input_transform/Mul" in names
    folded = plan[LINEAR].smooth is not None and plan[LINEAR].smooth.into is not None
    assert (f"{LINEAR}/input_transform/Mul" in names) == (plan[LINEAR].smooth is not None and not folded)
    if plan[LINEAR].low_rank is not None:
        half = plan[LINEAR].low_rank.dtype == "float16"
        factor = next(t for t in proto.graph.initializer if t.name == f"{LINEAR}.low_rank_down")
        assert factor.data_type == (TensorProto.FLOAT16 if half else TensorProto.FLOAT)
        assert (f"{LINEAR}/low_rank/down/Cast" in names) == half


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    qmodel, plan, _, info = _exported(tiny, "w4a8_all_folded_fp16_branch", tmp_path_factory.mktemp("outliers"))
    return qmodel, onnx.load(str(info.path)), plan


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _rules(model: onnx.ModelProto, plan: LayerPlan) -> set[tuple[str, str]]:
    return {(v.layer, v.rule) for v in check_rules(model, plan)}


def test_missing_shift_or_multiply_is_caught(exported):
    _, proto, plan = exported
    for op, rule in (("Sub", "shift_missing"), ("Mul", "smooth_missing")):
        model = copy.deepcopy(proto)
        node = _node(model, f"{CONV}/input_transform/{op}")
        for user in model.graph.node:
            for i, name in enumerate(user.input):
                if name == node.output[0]:
                    user.input[i] = node.input[0]
        model.graph.node.remove(node)
        assert (CONV, rule) in _rules(model, plan)


def test_shift_then_zero_pad_in_the_conv_is_caught(exported):
    _, proto, plan = exported
    model = copy.deepcopy(proto)
    conv = _node(model, f"{CONV}/Conv")
    for attribute in conv.attribute:
        if attribute.name == "pads":
            conv.attribute.remove(attribute)
            break
    conv.attribute.append(helper.make_attribute("pads", [1, 1, 1, 1]))
    assert (CONV, "shift_padding") in _rules(model, plan)


def test_negative_smoothing_constant_is_caught(exported):
    _, proto, plan = exported
    model = copy.deepcopy(proto)
    name = f"{CONV}.input_smooth"
    old = next(t for t in model.graph.initializer if t.name == name)
    model.graph.initializer.remove(old)
    model.graph.initializer.append(numpy_helper.from_array(-numpy_helper.to_array(old), name))
    assert (CONV, "transform_constant") in _rules(model, plan)


def test_low_rank_branch_rules(exported):
    _, proto, plan = exported
    # the factor stored as FLOAT where the plan says float16
    model = copy.deepcopy(proto)
    name = f"{LINEAR}.low_rank_up"
    old = next(t for t in model.graph.initializer if t.name == name)
    model.graph.initializer.remove(old)
    model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(old).astype(np.float32), name))
    assert (LINEAR, "low_rank_factor") in _rules(model, plan)
    # a plan of another rank, a plan without the branch, a branch missing from the graph
    other = LayerPlan(plan)
    other[LINEAR] = replace(plan[LINEAR], low_rank=LowRankConfig(3))
    assert (LINEAR, "low_rank_rank") in _rules(proto, other)
    other[LINEAR] = replace(plan[LINEAR], low_rank=None)
    assert (LINEAR, "unplanned_low_rank") in _rules(proto, other)
    model = copy.deepcopy(proto)
    up = _node(model, f"{LINEAR}/low_rank/up/MatMul")
    up.name = "renamed"
    assert (LINEAR, "missing_low_rank") in _rules(model, plan)


def test_export_refuses_a_plan_without_the_models_transforms(exported, tmp_path):
    qmodel, _, plan = exported
    other = LayerPlan(plan)
    other[LINEAR] = replace(plan[LINEAR], low_rank=None, shift=False)
    with pytest.raises(ExportError, match="outlier transforms"):
        export_onnx(qmodel, other, tmp_path / "x.onnx")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits-unet", "digits-dit", "digits-t2i"])
def test_reference_models_export_with_every_method(name, tmp_path):
    """The three reference models at W4A8 with shift, folded smoothing and rank-8 branches: rules and parity."""
    from diffquant.calibration.pool import collect_pool, subset
    from diffquant.calibration.selection import select

    model = diffquant.load_model(name)
    pool = collect_pool(model, trajectories=4, steps=10, seed=0)
    calib = subset(pool, select(pool, "random", 32, 0))
    config = QuantizeSpec(weight=WeightConfig(4), activation=SHIFT, smooth=SmoothSpec(), low_rank=LowRankSpec(rank=8))
    result = diffquant.quantize(model, config, calib, calibration=CalibrationSpec(batch_size=32))
    info = export_onnx(model, result.plan, tmp_path / "m.onnx")
    assert check_rules(info.path, result.plan, device_class="orin") == []
    assert check_parity(info.path, model, calib).outputs.passed
