import json

import pytest
import torch
from torch import nn

from diffquant.quant.modules import FakeQuantizer, QuantizerMode
from diffquant.quant.plan import (
    ActivationConfig,
    LayerPlan,
    WeightConfig,
    apply_plan,
    input_quantizers,
    load_quantizer_state,
    packed_weight_bytes,
    quantizable_layers,
    quantizer_state,
    resolve_globs,
    uniform_plan,
)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv_in = nn.Conv2d(1, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.SiLU())
        self.proj = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.proj(self.block(self.conv_in(x)).flatten(1))


def calibrate(model, x):
    for q in input_quantizers(model).values():
        q.start_observing()
    model(x)
    for q in input_quantizers(model).values():
        q.finish_observing()


def test_quantizable_layers_in_module_order():
    assert quantizable_layers(Tiny()) == ["conv_in", "block.0", "proj"]


def test_globs_resolve_and_unknown_glob_fails():
    names = ["conv_in", "block.0", "proj"]
    assert resolve_globs(names, ["block.*", "proj"]) == {"block.0", "proj"}
    with pytest.raises(ValueError, match="nope"):
        resolve_globs(names, ["nope*"])


def test_uniform_plan_keeps_globbed_layers_fp_and_round_trips(tmp_path):
    plan = uniform_plan(Tiny(), WeightConfig(4), ActivationConfig(8), ["conv_in"])
    assert plan["conv_in"].is_full_precision
    assert plan.quantized_layers() == ["block.0", "proj"]
    path = plan.save(tmp_path / "plan.json")
    assert LayerPlan.load(path) == plan
    data = json.loads(path.read_text())["layers"]
    assert data["conv_in"] == {"weight": None, "activation": None}
    assert data["proj"]["weight"]["bits"] == 4


def test_plan_rejects_bad_bits(tmp_path):
    with pytest.raises(ValueError, match="bits 9"):
        LayerPlan.from_json_dict({"proj": {"weight": {"bits": 9}, "activation": None}})


def test_apply_plan_w8a8_close_to_float_and_fp_layers_untouched():
    model, x = Tiny(), torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = model(x)
    q = Tiny()
    apply_plan(q, uniform_plan(q, WeightConfig(8), ActivationConfig(8), ["conv_in"]))
    assert type(q.conv_in) is nn.Conv2d
    calibrate(q, x)
    out = q(x)
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.02


def test_fewer_bits_more_error():
    model, x = Tiny(), torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = model(x)
    errors = []
    for b in (8, 6, 4, 2):
        q = Tiny()
        apply_plan(q, uniform_plan(q, WeightConfig(b), ActivationConfig(b)))
        calibrate(q, x)
        errors.append(float((q(x) - ref).norm()))
    assert errors == sorted(errors)


def test_weight_only_plan_leaves_inputs_float():
    q = Tiny()
    apply_plan(q, uniform_plan(q, WeightConfig(4), None))
    assert input_quantizers(q) == {}
    assert q.proj.weight_quantizer.mode is QuantizerMode.QUANTIZE


def test_apply_plan_unknown_layer():
    with pytest.raises(ValueError, match="does not have"):
        apply_plan(Tiny(), LayerPlan.from_json_dict({"missing": {"weight": {"bits": 8}, "activation": None}}))


def test_quantizer_state_round_trip():
    x = torch.randn(8, 1, 8, 8)
    a = Tiny()
    plan = uniform_plan(a, WeightConfig(6), ActivationConfig(6))
    apply_plan(a, plan)
    calibrate(a, x)
    b = apply_plan(Tiny(), plan)
    load_quantizer_state(b, quantizer_state(a))
    assert torch.equal(a(x), b(x))
    with pytest.raises(ValueError, match="mismatch"):
        load_quantizer_state(b, {"x.scale": torch.ones(1)})


def test_finish_observing_without_data_fails():
    q = FakeQuantizer(8)
    q.start_observing()
    with pytest.raises(RuntimeError, match="no data"):
        q.finish_observing()


def test_packed_bytes_oracle():
    model = Tiny()
    plan = uniform_plan(model, WeightConfig(4), ActivationConfig(8), ["conv_in"])
    sizes = packed_weight_bytes(model, plan)
    total = sum(p.numel() for p in model.parameters())
    w_block, w_proj = 4 * 4 * 9, 10 * 256
    expected = (total - w_block - w_proj) * 4 + w_block // 2 + 4 * 4 + w_proj // 2 + 10 * 4
    assert sizes == {"fp32": total * 4, "packed": expected}


def test_cached_quantized_weight_follows_in_place_updates():
    q = Tiny()
    apply_plan(q, uniform_plan(q, WeightConfig(4), None))
    with torch.no_grad():
        first = q.proj.quantized_weight()
        assert q.proj.quantized_weight() is first
        q.proj.weight.mul_(2)
        q.proj.weight_quantizer.calibrate_from(q.proj.weight)
        second = q.proj.quantized_weight()
    assert second is not first
    assert torch.allclose(second, q.proj.weight_quantizer(q.proj.weight))


def test_group_wise_plan_quantizes_allowed_layers_and_refuses_others(tmp_path):
    from diffquant.quant.modules import groups_allowed

    model = Tiny()
    x = torch.randn(2, 1, 8, 8)
    ref = model(x)
    assert not groups_allowed(model.conv_in, 2) and groups_allowed(model.block[0], 2)
    assert groups_allowed(model.proj, 32) and not groups_allowed(model.proj, 3)
    bad = LayerPlan({"conv_in": LayerConfigFor(4, 2)})
    with pytest.raises(ValueError, match=r"conv_in.*groups of 2"):
        apply_plan(Tiny(), bad)
    plan = LayerPlan({"block.0": LayerConfigFor(4, 2), "proj": LayerConfigFor(4, 32)})
    loaded = LayerPlan.load(plan.save(tmp_path / "plan.json"))
    assert loaded == plan
    grouped = apply_plan(Tiny(), loaded)
    per_channel = apply_plan(Tiny(), LayerPlan({"block.0": LayerConfigFor(4), "proj": LayerConfigFor(4)}))
    assert grouped.proj.weight_quantizer.scale.shape == (10, 8)
    assert grouped.block[0].weight_quantizer.scale.shape == (4, 2, 3, 3)
    err_group = (grouped(x) - ref).pow(2).mean()
    err_channel = (per_channel(x) - ref).pow(2).mean()
    assert 0 < err_group < err_channel
    state = quantizer_state(grouped)
    again = apply_plan(Tiny(), loaded)
    load_quantizer_state(again, state)
    assert torch.equal(again(x), grouped(x))


def test_group_wise_packed_bytes_oracle():
    model = Tiny()
    plan = LayerPlan({"proj": LayerConfigFor(4, 32)})
    sizes = packed_weight_bytes(model, plan)
    n = model.proj.weight.numel()
    assert sizes["fp32"] - sizes["packed"] == n * 4 - (n * 4 // 8 + 4 * n // 32)


def test_weight_config_validates_groups(tmp_path):
    with pytest.raises(ValueError, match="group_size"):
        WeightConfig(4, "per_group")
    with pytest.raises(ValueError, match="group_size"):
        WeightConfig(4, "per_channel", group_size=32)
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"version": 1, "layers": {"a": {"weight": {"bits": 4, "granularity": "diagonal"}}}}))
    with pytest.raises(ValueError, match=r"layer .a.*granularity"):
        LayerPlan.load(path)


def LayerConfigFor(bits, group=None):  # noqa: N802
    from diffquant.quant.plan import LayerConfig

    granularity = "per_group" if group else "per_channel"
    return LayerConfig(WeightConfig(bits, granularity, "minmax", group), None)
