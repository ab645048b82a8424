"""GPTQ weight rounding: oracle checks against round-to-nearest and a plain reference, Conv2d via
unfold, the spec and plan forms, save/load, ONNX parity and too few calibration inputs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from diffquant.errors import ConfigError
from diffquant.quant.formats import IntFormat, fake_quant, fake_quant_grouped
from diffquant.quant.gptq import dequantized, gptq_quantize, gptq_solve, layer_columns, weight_2d
from diffquant.quant.observers import weight_scale
from diffquant.quant.plan import ActivationConfig, LayerConfig, LayerPlan, WeightConfig, apply_plan
from diffquant.spec import CompressionSpec, QuantizeSpec, load_spec
from tests.export.conftest import build_plan, tiny  # noqa: F401  (fixture)


def _data(rows: int = 512, cols: int = 48, out: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated inputs (random mixing of channels with uneven energies) and a random weight."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) * torch.logspace(0, -1.5, cols).unsqueeze(1)
    x = torch.randn(rows, cols, generator=g) @ mix + 0.3 * torch.randn(rows, cols, generator=g)
    return x, torch.randn(out, cols, generator=g) * 0.1


def _hessian(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return 2 * x.t() @ x / x.shape[0]


def reference_gptq(w, h, bits, granularity="per_channel", group_size=None, act_order=False, percdamp=0.01):
    """GPTQ written plainly: one column at a time, the full inverse Hessian downdated after each column."""
    fmt = IntFormat(bits)
    w = w.double().clone()
    h = h.double().clone()
    cols = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype)
    order = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(cols)
    hinv = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    fixed = None
    if granularity != "per_group":
        fixed = weight_scale(w.float(), fmt, "minmax", 0 if granularity == "per_channel" else None).double()
        fixed = fixed.expand(w.shape[0]) if fixed.dim() == 0 else fixed
    group_scales, done = {}, []
    for j in order.tolist():
        if fixed is None:
            grp = j // group_size
            if grp not in group_scales:
                members = list(range(grp * group_size, (grp + 1) * group_size))
                group_scales[grp] = weight_scale(w[:, members].float(), fmt, "minmax", 0)
            s = group_scales[grp].double()
        else:
            s = fixed
        q[:, j] = torch.clamp(torch.round(w[:, j] / s), fmt.qmin, fmt.qmax)
        err = w[:, j] - q[:, j] * s
        rest = [k for k in range(cols) if k != j and k not in done]
        w[:, rest] -= torch.outer(err / hinv[j, j], hinv[j, rest])
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
        done.append(j)
    scale = fixed if fixed is not None else torch.stack([group_scales[k] for k in sorted(group_scales)], 1)
    return q, scale


def _rtn(w, bits, granularity, group_size):
    fmt = IntFormat(bits)
    if granularity == "per_group":
        return fake_quant_grouped(w, weight_scale(w, fmt, group_size=group_size), fmt, group_size)
    return fake_quant(w, weight_scale(w, fmt, axis=0), fmt, 0)


CASES = [
    (bits, gran, gs, order)
    for bits in (3, 4)
    for gran, gs in (("per_channel", None), ("per_group", 16))
    for order in (False, True)
]


@pytest.mark.parametrize(("bits", "granularity", "group_size", "act_order"), CASES)
def test_gptq_beats_nearest_and_matches_the_plain_reference(bits, granularity, group_size, act_order):
    x, w = _data()
    h = _hessian(x)
    result = gptq_quantize(w, h, IntFormat(bits), "minmax", granularity, group_size, act_order=act_order, block_size=16)
    q_gptq = dequantized(result, group_size)
    err_gptq = (x @ w.t() - x @ q_gptq.t()).pow(2).sum()
    err_rtn = (x @ w.t() - x @ _rtn(w, bits, granularity, group_size).t()).pow(2).sum()
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)

    q_ref, s_ref = reference_gptq(w, h, bits, granularity, group_size, act_order)
    assert torch.allclose(result.scale.double(), s_ref.double(), rtol=1e-6, atol=0)
    same = (result.q == q_ref.float()).float().mean()
    assert same > 0.999, same
    ref_out = x.double() @ dequantized(type(result)(q_ref.float(), s_ref.float()), group_size).double().t()
    assert (x.double() @ q_gptq.double().t() - ref_out).abs().max() < 1e-5 or same == 1.0


def test_blocking_does_not_change_the_result():
    x, w = _data(seed=1)
    h = _hessian(x)
    runs = [
        gptq_quantize(w, h, IntFormat(4), granularity="per_group", group_size=8, block_size=b) for b in (5, 48, 128)
    ]
    for other in runs[1:]:
        assert torch.equal(runs[0].q, other.q) and torch.equal(runs[0].scale, other.scale)


def test_dead_columns_round_to_nearest_and_stay_finite():
    x, w = _data(seed=2)
    x[:, 5] = 0.0
    result = gptq_quantize(w, _hessian(x), IntFormat(4), act_order=True)
    assert torch.isfinite(result.q).all()
    scale = weight_scale(w, IntFormat(4), axis=0)
    assert torch.equal(result.q[:, 5], torch.clamp(torch.round(w[:, 5] / scale), -8, 7))


def _conv_setup(seed: int = 0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(8, 6, 3, stride=2, padding=1, dilation=1)
    x = torch.randn(16, 8, 9, 9)
    return nn.Sequential(conv), x


@pytest.mark.parametrize(("granularity", "group_size"), [("per_channel", None), ("per_group", 4)])
def test_conv_via_unfold_equals_a_linear_on_unfolded_inputs(granularity, group_size):
    model, x = _conv_setup()
    conv = model[0]
    original = conv.weight.detach().clone()
    cfg = WeightConfig(4, granularity, group_size=group_size, rounding="gptq")
    plan = LayerPlan({"0": LayerConfig(cfg, None)})
    (weight, scale) = gptq_solve(model, plan, lambda m: m(x))["0"]

    grouped = group_size is not None
    if grouped:  # (ky, kx, channel) column order: each group of 4 channels at one kernel position is contiguous
        cols = F.unfold(x, 3, 1, 1, 2).reshape(16, 8, 9, -1).transpose(1, 2).reshape(16, 72, -1)
        w2d = conv.weight.detach().permute(0, 2, 3, 1).reshape(6, -1)
    else:
        cols = F.unfold(x, 3, 1, 1, 2)
        w2d = conv.weight.detach().reshape(6, -1)
    rows = cols.transpose(1, 2).reshape(-1, 72)
    assert torch.equal(rows, layer_columns(conv, x, grouped))
    assert torch.equal(w2d, weight_2d(conv, grouped))
    hessian = 2.0 * (rows.t() @ rows).double() / rows.shape[0]  # as the hook sums it (float32 products)
    linear = gptq_quantize(w2d, hessian, IntFormat(4), "minmax", granularity, group_size)
    expected = dequantized(linear, group_size)
    if grouped:
        expected = expected.reshape(6, 3, 3, 8).permute(0, 3, 1, 2)
        assert scale.shape == (6, 2, 3, 3)
    assert torch.equal(weight, expected.reshape(conv.weight.shape))

    # installed in the fake-quant layer, the weight is on the grid: fake quant returns it unchanged
    apply_plan(model, plan)
    model[0].weight_quantizer.scale.copy_(scale)
    with torch.no_grad():
        model[0].weight.copy_(weight)
    assert torch.equal(model[0].quantized_weight(), weight)
    y = F.conv2d(x, original, None, 2, 1)
    w_rtn = _rtn(original, 4, granularity, group_size)
    err_gptq = (y - F.conv2d(x, weight, None, 2, 1)).pow(2).sum()
    err_rtn = (y - F.conv2d(x, w_rtn, None, 2, 1)).pow(2).sum()
    assert err_gptq < err_rtn


def test_too_few_calibration_rows_is_a_config_error():
    model = nn.Sequential(nn.Linear(64, 8))
    plan = LayerPlan({"0": LayerConfig(WeightConfig(4, rounding="gptq"), None)})
    with pytest.raises(ConfigError) as info:
        gptq_solve(model, plan, lambda m: m(torch.randn(8, 64)))
    assert info.value.key == "weight.rounding"
    assert "\n" not in str(info.value) and "16 calibration input rows" in str(info.value)


def test_nearest_serializes_as_before_and_gptq_round_trips():
    spec = CompressionSpec()
    assert "rounding" not in json.dumps(spec.to_dict())
    explicit = load_spec(overrides=["quantize.weight.rounding=nearest"])
    assert explicit == spec and explicit.spec_hash() == spec.spec_hash()
    chosen = load_spec(overrides=["quantize.weight.rounding=gptq"])
    assert chosen.quantize.weight.rounding == "gptq" and chosen.spec_hash() != spec.spec_hash()
    gptq = QuantizeSpec.model_validate({"weight": {"bits": 3, "rounding": "gptq"}})
    assert gptq.model_dump(mode="json")["weight"]["rounding"] == "gptq"
    assert QuantizeSpec.model_validate(gptq.model_dump(mode="json")) == gptq
    with pytest.raises(ValueError, match="rounding"):
        WeightConfig(4, rounding="gptx")

    plan = LayerPlan({"a": LayerConfig(WeightConfig(4), ActivationConfig(8))})
    assert plan.to_json_dict() == {
        "a": {
            "weight": {"bits": 4, "granularity": "per_channel", "observer": "minmax"},
            "activation": {"bits": 8, "observer": "minmax"},
        }
    }
    plan["b"] = LayerConfig(WeightConfig(4, rounding="gptq"), None)
    assert LayerPlan.from_json_dict(plan.to_json_dict()) == plan


def test_quantize_save_load_and_onnx_parity(tiny, tmp_path):  # noqa: F811
    from diffquant.export.onnx import export_onnx
    from diffquant.export.parity import check_parity
    from diffquant.ptq import load_quantized, quantize_model, save_quantized
    from diffquant.spec import CalibrationSpec

    model, calib = tiny
    plan = build_plan(model, WeightConfig(4, rounding="gptq"), 8)
    qmodel = quantize_model(model, plan, calib, CalibrationSpec())
    changed = [
        name
        for name in plan
        if not torch.equal(qmodel.unet.get_submodule(name).weight, model.unet.get_submodule(name).weight)
    ]
    assert changed, "GPTQ changed no weight"
    for name in plan:  # float weights on the grid: the fake quant returns them as they are
        layer = qmodel.unet.get_submodule(name)
        assert torch.equal(layer.quantized_weight(), layer.weight)
    plan_path, scales_path = save_quantized(qmodel, plan, tmp_path / "q")
    assert "rounding" in plan_path.read_text()
    reloaded = load_quantized(model, plan_path, scales_path)
    with torch.no_grad():
        args = (calib.x[:4], calib.t[:4], calib.labels[:4])
        assert torch.equal(qmodel.unet(*args).sample, reloaded.unet(*args).sample)

    info = export_onnx(qmodel, plan, tmp_path / "m.onnx")
    report = check_parity(info.path, qmodel, calib)
    assert report.outputs.passed, report.to_dict()
