"""Output quantizers (the onnxruntime export form): plan eligibility, JSON v1/v2, calibration, state."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from diffquant.quant.formats import IntFormat, scale_from_absmax
from diffquant.quant.modules import QuantConv2d, QuantizerMode
from diffquant.quant.plan import (
    ActivationConfig,
    LayerConfig,
    LayerPlan,
    WeightConfig,
    activation_quantizers,
    apply_plan,
    load_quantizer_state,
    quantizer_state,
    uniform_plan,
    with_output_quantizers,
)


class Net(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv_in = nn.Conv2d(1, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 4, 3, padding=1)
        self.conv_out = nn.Conv2d(4, 1, 3, padding=1)
        self.proj = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_out(torch.nn.functional.silu(self.body(self.conv_in(x))))
        return self.proj(h.flatten(1))


def calibrate(model: nn.Module, *batches: torch.Tensor) -> None:
    quantizers = activation_quantizers(model)
    for q in quantizers.values():
        q.start_observing()
    with torch.no_grad():
        for x in batches:
            model(x)
    for q in quantizers.values():
        q.finish_observing()


def ort_plan(model: nn.Module, weight: WeightConfig = WeightConfig(8)) -> LayerPlan:
    return with_output_quantizers(model, uniform_plan(model, weight, ActivationConfig(8)))


def test_only_fusable_conv_layers_get_output_quantizers():
    model = Net()
    plan = ort_plan(model)
    assert [n for n, c in plan.items() if c.output is not None] == ["conv_in", "body"]
    assert plan["body"].output == ActivationConfig(8)
    # INT4 weights, float inputs, float weights and group-wise weights cannot become QLinearConv
    assert not ort_plan(model, WeightConfig(4)).has_outputs
    base = uniform_plan(model, WeightConfig(8), ActivationConfig(8))
    base["body"] = LayerConfig(WeightConfig(8), None)
    base["conv_in"] = LayerConfig(None, ActivationConfig(8))
    assert not with_output_quantizers(model, base).has_outputs
    grouped = uniform_plan(model, WeightConfig(8, "per_group", group_size=2), ActivationConfig(8), ["conv_in"])
    assert not with_output_quantizers(model, grouped).has_outputs


def test_plan_v1_and_v2_round_trip(tmp_path):
    model = Net()
    v1 = uniform_plan(model, WeightConfig(8), ActivationConfig(8))
    path1 = v1.save(tmp_path / "v1.json")
    assert json.loads(path1.read_text())["version"] == 1
    assert "output" not in json.loads(path1.read_text())["layers"]["body"]
    assert LayerPlan.load(path1) == v1
    v2 = with_output_quantizers(model, v1)
    path2 = v2.save(tmp_path / "v2.json")
    data = json.loads(path2.read_text())
    assert data["version"] == 2
    assert data["layers"]["body"]["output"] == {"bits": 8, "observer": "minmax"}
    assert "output" not in data["layers"]["conv_out"]
    loaded = LayerPlan.load(path2)
    assert loaded == v2 and loaded.has_outputs
    # a version 1 file cannot carry output quantizers; unknown versions are refused
    data["version"] = 1
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="version 1 plan cannot hold output"):
        LayerPlan.load(tmp_path / "bad.json")
    data["version"] = 99
    (tmp_path / "v99.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unsupported plan version 99"):
        LayerPlan.load(tmp_path / "v99.json")


def test_output_quantizer_on_linear_is_refused():
    model = Net()
    plan = uniform_plan(model, WeightConfig(8), ActivationConfig(8))
    plan["proj"] = LayerConfig(WeightConfig(8), ActivationConfig(8), output=ActivationConfig(8))
    with pytest.raises(ValueError, match=r"proj.*Conv2d layers only"):
        apply_plan(model, plan)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    amplitude=st.floats(0.05, 20.0),
    bits=st.integers(4, 8),
    batches=st.integers(1, 3),
)
def test_output_quantizer_calibration_property(seed, amplitude, bits, batches):
    """Min-max output scale = absmax of the float-bias conv output over all batches / qmax; outputs land on its grid."""
    layer = nn.Conv2d(3, 5, 3, padding=1)
    torch.manual_seed(seed)
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    q = QuantConv2d.from_float(layer, 8, bits, out_bits=bits)
    xs = [amplitude * torch.randn(2, 3, 6, 6) for _ in range(batches)]
    with torch.no_grad():
        # what the output observes: float input (input quantizer observing), quantized weight, float bias
        raw = [torch.nn.functional.conv2d(x, q.quantized_weight(), layer.bias, padding=1) for x in xs]
    calibrate(q, *xs)
    fmt = IntFormat(bits)
    expected = scale_from_absmax(torch.stack([r.abs().max() for r in raw]).max(), fmt)
    assert q.output_quantizer.mode is QuantizerMode.QUANTIZE
    torch.testing.assert_close(q.output_quantizer.scale, expected.reshape(()))
    with torch.no_grad():
        y = q(xs[0])
    steps = y / q.output_quantizer.scale
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    assert steps.min() >= fmt.qmin - 1e-3 and steps.max() <= fmt.qmax + 1e-3


def test_bias_on_int32_grid_after_calibration_with_straight_through_gradient():
    torch.manual_seed(1)
    layer = nn.Conv2d(2, 3, 3, padding=1)
    q = QuantConv2d.from_float(layer, 8, 8, out_bits=8)
    x = torch.randn(4, 2, 5, 5)
    assert q.integer_bias()
    calibrate(q, x)
    bias = q.quantized_bias()
    grid = q.bias_scale()
    assert torch.equal(bias.detach(), (bias.detach() / grid).round() * grid)
    assert (bias - layer.bias).abs().max() <= grid.max() / 2 + 1e-9
    assert not torch.equal(bias.detach(), layer.bias.detach())
    bias.sum().backward()
    assert torch.equal(layer.bias.grad, torch.ones(3))
    # without an output quantizer the bias stays float
    plain = QuantConv2d.from_float(nn.Conv2d(2, 3, 3), 8, 8)
    assert not plain.integer_bias() and plain.quantized_bias() is plain.bias


def test_quantizer_state_holds_output_scales():
    model = Net()
    plan = ort_plan(model)
    apply_plan(model, plan)
    calibrate(model, torch.randn(3, 1, 8, 8))
    state = quantizer_state(model)
    assert {"conv_in.output_quantizer.scale", "body.output_quantizer.scale"} <= set(state)
    assert "conv_out.output_quantizer.scale" not in state
    fresh = Net()
    apply_plan(fresh, LayerPlan(plan))
    assert fresh.body.output_quantizer.mode is QuantizerMode.OFF
    load_quantizer_state(fresh, state)
    assert fresh.body.output_quantizer.mode is QuantizerMode.QUANTIZE
    assert torch.equal(fresh.body.output_quantizer.scale, model.body.output_quantizer.scale)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # a v1 model (no output quantizers) does not take v2 scales
    v1 = Net()
    apply_plan(v1, uniform_plan(v1, WeightConfig(8), ActivationConfig(8)))
    with pytest.raises(ValueError, match="unexpected"):
        load_quantizer_state(v1, state)
