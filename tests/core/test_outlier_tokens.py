"""BOS-aware quantization: detection, the fp-token Linear, plans and calibration."""

from __future__ import annotations

import pytest
import torch

from diffquant.metrics import sqnr_db
from diffquant.outlier_tokens import apply_outlier_tokens, detect_outlier_tokens
from diffquant.ptq import quantize_model
from diffquant.quant.formats import IntFormat, fake_quant
from diffquant.quant.modules import QuantLinear
from diffquant.quant.plan import (
    ActivationConfig,
    LayerConfig,
    LayerPlan,
    WeightConfig,
    apply_plan,
    load_quantizer_state,
    packed_weight_bytes,
    quantizer_state,
    uniform_plan,
)
from diffquant.sampling import denoiser_outputs
from diffquant.spec import CalibrationSpec
from tests.text_models import text_inputs, tiny_text_model

CALIBRATION = CalibrationSpec(batch_size=64)


def test_fp_token_linear_matches_oracle_and_calibrates_without_the_outlier():
    torch.manual_seed(0)
    layer = QuantLinear.from_float(torch.nn.Linear(16, 8), 8, 8)
    layer.keep_tokens_in_float(1)
    table = torch.randn(1, 8)
    layer.fp_token_outputs.copy_(table)
    x = torch.randn(4, 6, 16)
    x[:, 0] = 500.0  # the BOS outlier, the same for every input
    layer.input_quantizer.start_observing()
    layer(x)
    layer.input_quantizer.finish_observing()
    expected_scale = x[:, 1:].abs().max() / IntFormat(8).qmax
    assert torch.allclose(layer.input_quantizer.scale, expected_scale)
    out = layer(x)
    assert torch.equal(out[:, 0], table.expand(4, -1))
    oracle = torch.nn.functional.linear(
        fake_quant(x[:, 1:], layer.input_quantizer.scale, IntFormat(8), None), layer.quantized_weight(), layer.bias
    )
    assert torch.allclose(out[:, 1:], oracle, atol=1e-6)
    with pytest.raises(ValueError, match="needs"):
        layer(torch.randn(4, 16))


def test_detects_an_injected_bos_outlier_and_nothing_without_it():
    plain = tiny_text_model()
    ids, _ = plain.conditions(60, "calibration")
    found = detect_outlier_tokens(plain, ids)
    assert found.count == 0 and found.ratio < 4
    assert found.constant_positions == 1  # only <bos> is shared by every prompt
    assert found.layers and all(name.endswith(("attn2.to_k", "attn2.to_v")) for name in found.layers)
    outlier = tiny_text_model(bos_scale=60.0)
    found = detect_outlier_tokens(outlier, ids)
    assert found.count == 1 and found.ratio > 20
    assert detect_outlier_tokens(outlier, ids, "off").count == 0
    with pytest.raises(ValueError, match="only 1 leading"):
        detect_outlier_tokens(outlier, ids, 2)


def test_class_models_have_no_outlier_tokens(tmp_path):
    from diffquant.models.loading import load_local_model
    from tests.conftest import save_tiny_unet

    model = load_local_model(save_tiny_unet(tmp_path / "u"))
    assert detect_outlier_tokens(model, torch.arange(10)).count == 0


def test_bos_aware_quantization_recovers_the_outlier_damage():
    model = tiny_text_model(bos_scale=60.0)
    inputs = text_inputs(model, 60)
    reference = denoiser_outputs(model.unet, inputs)
    found = detect_outlier_tokens(model, inputs.labels)
    # the cross-attention key/value layers at W8A8, the rest in float: their error is what BOS-aware removes
    plan = uniform_plan(model.unet, WeightConfig(8), ActivationConfig(8))
    plan = LayerPlan({n: c if n in found.layers else LayerConfig(None, None) for n, c in plan.items()})
    aware = apply_outlier_tokens(plan, found)
    assert {n for n, c in aware.items() if c.fp_tokens} == set(found.layers)
    sqnr = {}
    for label, p in (("naive", plan), ("aware", aware)):
        quantized = quantize_model(model, p, inputs, CALIBRATION)
        sqnr[label] = sqnr_db(reference, denoiser_outputs(quantized.unet, inputs))
    assert sqnr["aware"] > sqnr["naive"] + 10.0, sqnr


def test_fp_tokens_round_trip_through_plan_and_scales(tmp_path):
    model = tiny_text_model(bos_scale=60.0)
    inputs = text_inputs(model, 20)
    plan = apply_outlier_tokens(
        uniform_plan(model.unet, WeightConfig(8), ActivationConfig(8)), detect_outlier_tokens(model, inputs.labels)
    )
    quantized = quantize_model(model, plan, inputs, CALIBRATION)
    loaded = LayerPlan.load(plan.save(tmp_path / "plan.json"))
    assert loaded == plan
    state = quantizer_state(quantized.unet)
    tables = [k for k in state if k.endswith("fp_token_outputs")]
    assert len(tables) == sum(1 for c in plan.values() if c.fp_tokens) > 0
    fresh = tiny_text_model(bos_scale=60.0)
    apply_plan(fresh.unet, loaded)
    load_quantizer_state(fresh.unet, state)
    assert torch.equal(denoiser_outputs(fresh.unet, inputs), denoiser_outputs(quantized.unet, inputs))
    sizes = packed_weight_bytes(model.unet, plan)
    base = packed_weight_bytes(model.unet, LayerPlan({n: LayerConfig(c.weight, c.activation) for n, c in plan.items()}))
    width = {n: model.unet.get_submodule(n).out_features for n, c in plan.items() if c.fp_tokens}
    assert sizes["packed"] - base["packed"] == 4 * sum(width.values())


def test_fp_tokens_only_on_linear_layers():
    model = tiny_text_model()
    plan = LayerPlan({"unet.conv_in": LayerConfig(WeightConfig(8), ActivationConfig(8), fp_tokens=1)})
    with pytest.raises(ValueError, match="Linear"):
        apply_plan(model.unet, plan)
