"""Export of text-conditioned models: the text encoder inside the graph, BOS-aware layers as constants."""

from __future__ import annotations

import onnx
import pytest

from diffquant.export.onnx import export_onnx
from diffquant.export.parity import ParityConfig, check_parity
from diffquant.export.rules import check_rules
from diffquant.outlier_tokens import apply_outlier_tokens, detect_outlier_tokens
from diffquant.ptq import quantize_model
from diffquant.quant.plan import ActivationConfig, LayerConfig, LayerPlan, WeightConfig, uniform_plan
from diffquant.spec import CalibrationSpec
from tests.text_models import text_inputs, tiny_text_model


@pytest.mark.parametrize("bos_aware", [False, True])
def test_text_model_export_matches_torch(tmp_path, bos_aware):
    model = tiny_text_model(bos_scale=60.0)
    inputs = text_inputs(model, 24)
    # W8 everywhere; inputs at A8 in the text encoder and the cross-attention (the layers this
    # test is about): a random tiny U-Net flips activation roundings elsewhere too easily
    plan = uniform_plan(model.unet, WeightConfig(8), ActivationConfig(8))
    plan = LayerPlan(
        {
            n: c if n.startswith("text_encoder.") or ".attn2." in n else LayerConfig(c.weight, None)
            for n, c in plan.items()
        }
    )
    assert any(name.startswith("text_encoder.") for name in plan)
    if bos_aware:
        plan = apply_outlier_tokens(plan, detect_outlier_tokens(model, inputs.labels))
        assert any(cfg.fp_tokens for cfg in plan.values())
    quantized = quantize_model(model, plan, inputs, CalibrationSpec(batch_size=64))
    info = export_onnx(quantized, plan, tmp_path / "t2i.onnx")
    graph = onnx.load(str(info.path)).graph
    ids = next(i for i in graph.input if i.name == "input_ids")
    assert len(ids.type.tensor_type.shape.dim) == 2
    assert check_rules(info.path, plan) == []
    report = check_parity(info.path, quantized, inputs, ParityConfig(samples=10, steps=4))
    assert report.passed, report.failures()
    assert report.outputs.p999_abs < report.outputs.tolerance, report.to_dict()
