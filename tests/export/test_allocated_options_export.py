"""An allocated plan that mixes integer bits, a low-rank branch and FP8 options: ONNX parity and rules."""

from __future__ import annotations

import copy

import onnx
from onnx import TensorProto

import diffquant
from diffquant.export.onnx import export_onnx
from diffquant.export.parity import check_parity
from diffquant.export.rules import check_rules
from diffquant.spec import AllocationSpec, BudgetSpec, CalibrationSpec

BRANCH = "down_blocks.0.resnets.0.conv1"
FP8 = "down_blocks.1.attentions.0.to_q"


def test_allocated_branch_and_fp8_options_export_and_match_torch(tiny, tmp_path):
    model, calib = tiny
    qmodel = copy.deepcopy(model)
    config = AllocationSpec(
        weight_bits=[4, 8],
        group_bits=[],
        ranks=[0, 2],
        weight_formats=["fp8_e4m3"],
        activation_formats=["fp8_e4m3"],
        content_layers=[],
        budget=BudgetSpec(avg_weight_bits=6.0),
        pinned={BRANCH: "w4a8r2", FP8: "wfp8e4m3afp8e4m3"},
    )
    result = diffquant.auto_quantize(
        qmodel, config, calib, calibration=CalibrationSpec(batch_size=12), steps=4, device_class="ada"
    )
    plan = result.plan
    assert plan[BRANCH].low_rank is not None and plan[FP8].weight.format == "fp8_e4m3"
    info = export_onnx(qmodel, plan, tmp_path / "mixed.onnx")
    assert check_rules(info.path, plan, device_class="ada") == []
    report = check_parity(info.path, qmodel, calib)
    assert report.outputs.passed, report.to_dict()
    proto = onnx.load(str(info.path))
    names = {n.name for n in proto.graph.node}
    assert any(name.startswith(f"{BRANCH}/low_rank/") for name in names)
    fp8 = {t.name for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT8E4M3FN}
    assert any(name.startswith(FP8) for name in fp8), sorted(fp8)[:5]
