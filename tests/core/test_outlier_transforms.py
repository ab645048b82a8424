"""Shift, smoothing and the low-rank split against brute-force oracles, on single layers.

Each transform must leave the float function unchanged before quantization; the low-rank split
must reconstruct the weight (exactly at full rank) and be the best approximation of its rank.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from diffquant.mixed_precision.costs import low_rank_costs, plan_bitops
from diffquant.outliers.folding import apply_weight_transforms, fold_into
from diffquant.outliers.low_rank import low_rank_factors, residual
from diffquant.outliers.smoothing import smoothing_scales
from diffquant.quant.formats import IntFormat, fake_quant
from diffquant.quant.modules import FakeQuantizer, QuantizerMode
from diffquant.quant.plan import (
    ActivationConfig,
    LayerConfig,
    LayerPlan,
    LowRankConfig,
    SmoothConfig,
    WeightConfig,
    apply_plan,
    packed_weight_bytes,
)
from diffquant.quant.transforms import scale_input_channels, shift_bias, weight_channel_absmax


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer


def _quantized(layer: nn.Module, cfg: LayerConfig) -> nn.Module:
    holder = Holder(copy.deepcopy(layer))
    apply_plan(holder, LayerPlan({"layer": cfg}))
    return holder.layer


def _all_off(module: nn.Module) -> None:
    for quantizer in module.modules():
        if isinstance(quantizer, FakeQuantizer):
            quantizer.mode = QuantizerMode.OFF


CONVS = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, padding=2, dilation=2, stride=2),
    dict(kernel_size=(3, 1), padding=(1, 0), groups=2),
    dict(kernel_size=1, padding=0),
]


@pytest.mark.parametrize("kwargs", CONVS)
def test_shift_bias_is_what_a_constant_padded_input_adds(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, bias=False, **kwargs)
    c = torch.randn(4)
    # brute force: a constant input c (already padded, so c everywhere) through the kernel
    k = conv.kernel_size
    d = conv.dilation
    size = ((k[0] - 1) * d[0] + 1, (k[1] - 1) * d[1] + 1)
    constant = c.reshape(1, 4, 1, 1).expand(1, 4, *size)
    expected = F.conv2d(constant, conv.weight, None, 1, 0, conv.dilation, conv.groups).reshape(-1)
    torch.testing.assert_close(shift_bias(conv.weight, c, conv.groups), expected, rtol=1e-5, atol=1e-6)
    linear = nn.Linear(4, 3)
    torch.testing.assert_close(shift_bias(linear.weight, c), linear.weight @ c)


@pytest.mark.parametrize("kwargs", CONVS)
def test_shifted_conv_computes_the_float_function_before_quantization(kwargs):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, **kwargs)
    x = torch.rand(3, 4, 9, 7) * 3 - 0.3  # post-SiLU-like: mostly positive
    q = _quantized(conv, LayerConfig(WeightConfig(8), ActivationConfig(8), shift=True))
    with torch.no_grad():
        q.input_transform.shift.copy_(torch.randn(4))
    _all_off(q)
    torch.testing.assert_close(q(x), conv(x), rtol=1e-5, atol=1e-5)
    if any(p for p in conv.padding):
        # the oracle that explicit padding exists for: shift-then-zero-pad moves the border
        wrong = conv(x - q.input_transform.shift.reshape(1, -1, 1, 1)) + shift_bias(
            conv.weight, q.input_transform.shift, conv.groups
        ).reshape(1, -1, 1, 1)
        assert (wrong - conv(x)).abs().max() > 1e-3


def test_shifted_linear_without_bias_gets_one_and_keeps_the_function():
    torch.manual_seed(2)
    linear = nn.Linear(5, 3, bias=False)
    x = torch.randn(2, 7, 5) + 4
    q = _quantized(linear, LayerConfig(WeightConfig(8), ActivationConfig(8), shift=True))
    with torch.no_grad():
        q.input_transform.shift.fill_(4.0)
    _all_off(q)
    torch.testing.assert_close(q(x), linear(x), rtol=1e-5, atol=1e-5)
    assert q.effective_bias() is not None


def test_shift_centers_a_one_sided_input_and_halves_the_step():
    """Post-SiLU inputs in [-0.28, 6]: the shifted quantizer's step is about half the unshifted one's."""
    torch.manual_seed(3)
    x = F.silu(torch.randn(4096, 8) * 3)
    lo, hi = x.amin(0), x.amax(0)
    c = (lo + hi) / 2
    fmt = IntFormat(4)
    step, shifted_step = x.abs().max() / fmt.qmax, (x - c).abs().max() / fmt.qmax
    assert 0.45 < float(shifted_step / step) < 0.55
    plain = fake_quant(x, step, fmt)
    shifted = fake_quant(x - c, shifted_step, fmt) + c
    assert (shifted - x).pow(2).mean() < 0.6 * (plain - x).pow(2).mean()


def test_smoothing_scales_follow_the_formula_per_channel():
    act = torch.tensor([4.0, 0.0, 1.0, 9.0])
    weight = torch.tensor([0.5, 2.0, 0.0, 0.25])
    for alpha in (0.0, 0.3, 0.5, 1.0):
        s = smoothing_scales(act, weight, alpha)
        for j in range(4):
            if act[j] == 0 or weight[j] == 0:
                assert s[j] == 1.0
            else:
                assert s[j] == pytest.approx(float(act[j]) ** alpha / float(weight[j]) ** (1 - alpha), rel=1e-6)


@pytest.mark.parametrize("groups", [1, 2])
def test_weight_channel_maxima_and_scaling_match_a_loop(groups):
    torch.manual_seed(4)
    conv = nn.Conv2d(4, 6, 3, groups=groups)
    s = torch.rand(4) + 0.5
    scaled = scale_input_channels(conv.weight, s, groups)
    per_group_in, per_group_out = 4 // groups, 6 // groups
    maxima = torch.zeros(4)
    for o, i in itertools.product(range(6), range(per_group_in)):
        channel = (o // per_group_out) * per_group_in + i
        torch.testing.assert_close(scaled[o, i], conv.weight[o, i] * s[channel])
        maxima[channel] = max(maxima[channel], conv.weight[o, i].abs().max())
    torch.testing.assert_close(weight_channel_absmax(conv.weight, groups), maxima)


@pytest.mark.parametrize("multiply", [True, False])
def test_smoothing_keeps_the_float_function_folded_or_multiplied(multiply):
    torch.manual_seed(5)
    norm, linear = nn.LayerNorm(6), nn.Linear(6, 4)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(3, 5, 6) * 3
    reference = linear(norm(x))
    s = torch.rand(6) * 4 + 0.1
    cfg = LayerConfig(WeightConfig(8), ActivationConfig(8), smooth=SmoothConfig(0.5, None if multiply else "norm"))
    model = nn.ModuleDict({"norm": copy.deepcopy(norm), "linear": copy.deepcopy(linear)})
    plan = LayerPlan({"linear": cfg})
    apply_weight_transforms(model, plan, {"linear": s})
    apply_plan(model, plan)
    model["linear"].input_transform.smooth.copy_(s)
    _all_off(model)
    torch.testing.assert_close(model["linear"](model["norm"](x)), reference, rtol=1e-5, atol=1e-5)
    assert model["linear"].input_transform.multiply == multiply


def test_fold_into_group_norm_and_previous_conv_divides_output_channels():
    torch.manual_seed(6)
    norm, conv = nn.GroupNorm(2, 4), nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    x, s = torch.randn(2, 4, 5, 5), torch.rand(4) + 0.5
    expected = norm(x) / s.reshape(1, -1, 1, 1)
    fold_into(norm, s)
    torch.testing.assert_close(norm(x), expected)
    y = torch.randn(2, 3, 5, 5)
    expected = conv(y) / s.reshape(1, -1, 1, 1)
    fold_into(conv, s)
    torch.testing.assert_close(conv(y), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(12, 20), (8, 6, 3, 3), (5, 40)])
def test_low_rank_split_reconstructs_and_is_exact_at_full_rank(shape):
    torch.manual_seed(7)
    weight = torch.randn(*shape)
    full = min(shape[0], weight[0].numel())
    up, down = low_rank_factors(weight, full, "float32")
    torch.testing.assert_close((up @ down).reshape(shape), weight, rtol=1e-5, atol=1e-5)
    assert residual(weight, up, down).abs().max() < 1e-4
    for dtype in ("float16", "float32"):
        up, down = low_rank_factors(weight, 3, dtype)
        torch.testing.assert_close((up @ down).reshape(shape) + residual(weight, up, down), weight)
    with pytest.raises(ValueError, match="larger than min"):
        low_rank_factors(weight, full + 1)


def test_low_rank_split_is_the_best_approximation_of_its_rank():
    """Eckart-Young: the residual's energy is the sum of the squared dropped singular values."""
    torch.manual_seed(8)
    weight = torch.randn(16, 24, dtype=torch.float64).float()
    singular = torch.linalg.svdvals(weight.double())
    for rank in (1, 4, 10):
        up, down = low_rank_factors(weight, rank, "float32")
        energy = residual(weight, up, down).double().pow(2).sum()
        assert float(energy) == pytest.approx(float(singular[rank:].pow(2).sum()), rel=1e-4)
        float16 = low_rank_factors(weight, rank, "float16")
        assert torch.equal(float16[0], float16[0].half().float())  # values are float16 numbers


@pytest.mark.parametrize("conv", [False, True])
def test_low_rank_layer_quantizes_only_the_residual_and_adds_the_branch(conv):
    torch.manual_seed(9)
    layer = nn.Conv2d(6, 8, 3, padding=1, stride=2) if conv else nn.Linear(6, 8)
    x = torch.randn(2, 6, 7, 7) if conv else torch.randn(2, 5, 6)
    cfg = LayerConfig(WeightConfig(4), ActivationConfig(8), low_rank=LowRankConfig(2, "float16"))
    q = _quantized(layer, cfg)
    up, down = low_rank_factors(q.weight, 2)
    q.low_rank.set_factors(up, down)
    q.weight_quantizer.calibrate_from(q.weight_to_quantize().detach())
    q.input_quantizer.start_observing()
    q(x)
    q.input_quantizer.finish_observing()
    # brute force: Q(W - L1 L2) on Q(x), plus L1 L2 on the float input
    low = (up @ down).reshape(layer.weight.shape)
    w_q = q.weight_quantizer(layer.weight.detach() - low)
    x_q = q.input_quantizer(x)
    if conv:
        expected = F.conv2d(x_q, w_q, layer.bias, 2, 1) + F.conv2d(x, low, None, 2, 1)
    else:
        expected = F.linear(x_q, w_q, layer.bias) + F.linear(x, low)
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)
    _all_off(q)
    torch.testing.assert_close(q(x), layer(x), rtol=1e-5, atol=1e-5)


def test_plan_round_trips_the_methods_as_version_3(tmp_path):
    import json

    cfg = LayerConfig(
        WeightConfig(4),
        ActivationConfig(4),
        shift=True,
        smooth=SmoothConfig(0.35, "norm"),
        low_rank=LowRankConfig(8, "float32"),
    )
    plan = LayerPlan({"a": cfg, "b": LayerConfig(WeightConfig(8), ActivationConfig(8))})
    path = plan.save(tmp_path / "plan.json")
    data = json.loads(path.read_text())
    assert data["version"] == 3
    assert data["layers"]["a"]["shift"] == "channel"
    assert data["layers"]["a"]["smooth"] == {"alpha": 0.35, "into": "norm"}
    assert data["layers"]["a"]["low_rank"] == {"rank": 8, "dtype": "float32"}
    assert set(data["layers"]["b"]) == {"weight", "activation"}
    assert LayerPlan.load(path) == plan
    for bad in ({"shift": "tensor"}, {"smooth": {"alpha": 1.5}}, {"low_rank": {"rank": 0}}):
        layers = {"a": {"weight": {"bits": 8}, "activation": {"bits": 8}, **bad}}
        (tmp_path / "bad.json").write_text(json.dumps({"version": 3, "layers": layers}))
        with pytest.raises(ValueError, match="layer 'a'"):
            LayerPlan.load(tmp_path / "bad.json")
    data["version"] = 1
    (tmp_path / "v1.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="cannot hold shift"):
        LayerPlan.load(tmp_path / "v1.json")


def test_apply_plan_refuses_a_rank_above_the_weight_and_transforms_without_inputs():
    model = Holder(nn.Linear(6, 4))
    with pytest.raises(ValueError, match=r"rank 5 is larger than min\(out, in\) = 4"):
        apply_plan(model, LayerPlan({"layer": LayerConfig(WeightConfig(4), None, low_rank=LowRankConfig(5))}))
    with pytest.raises(ValueError, match="need a quantized input"):
        apply_plan(Holder(nn.Linear(6, 4)), LayerPlan({"layer": LayerConfig(WeightConfig(4), None, shift=True)}))


def test_bytes_and_bitops_count_the_branch_and_the_constants():
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    model = Holder(conv)
    base = LayerConfig(WeightConfig(4), ActivationConfig(8))
    with_all = LayerConfig(
        WeightConfig(4), ActivationConfig(8), shift=True, smooth=SmoothConfig(0.5), low_rank=LowRankConfig(4)
    )
    plain = packed_weight_bytes(model, LayerPlan({"layer": base}))["packed"]
    more = packed_weight_bytes(model, LayerPlan({"layer": with_all}))["packed"]
    # shift: 8 offsets + a new 16-value bias; multiply: 8 values of 1/s; branch: 4 * (72 + 16) float16 values
    assert more - plain == 4 * 8 + 4 * 16 + 4 * 8 + 2 * 4 * (72 + 16)
    # the branch's MACs, counted by running it
    branch = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1, bias=False), nn.Conv2d(4, 16, 1, bias=False))
    x = torch.randn(1, 8, 6, 6)
    macs = 36 * 16 * 72
    branch_macs = 36 * 4 * 72 + 36 * 16 * 4
    assert branch(x).shape == conv(x).shape
    size, bitops = low_rank_costs(72, 16, macs, 4)
    assert size == 2 * 4 * (72 + 16) and bitops == pytest.approx(branch_macs * 16 * 16)
    plan = LayerPlan({"layer": with_all})
    assert plan_bitops(model, plan, {"layer": macs}) == pytest.approx(macs * 4 * 8 + branch_macs * 256)
