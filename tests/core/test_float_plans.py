"""Float formats in the spec, the plan, the byte count, the device classes, LSQ and the library API."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from diffquant.devices import DEVICE_CLASSES
from diffquant.errors import ConfigError, SpecError
from diffquant.ptq import plan_from_spec, quantize
from diffquant.quant.float_formats import FLOAT_FORMATS
from diffquant.quant.formats import fake_quant
from diffquant.quant.lsq import lsq_fake_quant
from diffquant.quant.modules import FakeQuantizer
from diffquant.quant.observers import weight_scale
from diffquant.quant.plan import (
    ActivationConfig,
    LayerConfig,
    LayerPlan,
    WeightConfig,
    apply_plan,
    input_quantizers,
    load_quantizer_state,
    output_quantizer_allowed,
    packed_weight_bytes,
    quantized_weight_bytes,
    quantizer_state,
)
from diffquant.spec import ActivationQuantSpec, CompressionSpec, QuantizeSpec, load_spec

FP8 = ["quantize.weight.format=fp8_e4m3", "quantize.activation.format=fp8_e4m3"]
NVFP4 = [
    "quantize.weight.bits=4",
    "quantize.weight.format=fp4_e2m1",
    "quantize.weight.granularity=per_group",
    "quantize.weight.group_size=16",
]


def test_default_specs_serialize_no_format_so_hashes_are_unchanged():
    data = CompressionSpec().to_dict()
    assert "format" not in data["quantize"]["weight"] and "format" not in data["quantize"]["activation"]
    fp8 = load_spec(overrides=[*FP8, "export.device_class=ada"])
    assert fp8.to_dict()["quantize"]["weight"]["format"] == "fp8_e4m3"
    assert fp8.spec_hash() != load_spec(overrides=["export.device_class=ada"]).spec_hash()
    explicit = load_spec(overrides=["quantize.weight.format=int", "quantize.activation.format=int"])
    assert explicit.spec_hash() == CompressionSpec().spec_hash()


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (FP8, "quantize.weight.format fp8_e4m3 cannot run on device class orin: FP8 needs compute capability 8.9"),
        (
            ["quantize.activation.format=fp8_e4m3"],
            "quantize.activation.format fp8_e4m3 cannot run on device class orin",
        ),
        ([*NVFP4, "export.device_class=hopper"], "FP4 (NVFP4) needs compute capability 10.0"),
        (["quantize.weight.format=fp8_e5m2", "export.device_class=hopper"], "E5M2 runs on no device class"),
        (["quantize.weight.format=fp8_e4m3", "export.target=onnxruntime"], "device class cpu"),
        (["quantize.weight.format=fp4_e2m1"], "format fp4_e2m1 stores 4 bits per value; set bits: 4"),
        (["quantize.weight.format=fp4_e2m1", "quantize.weight.bits=4"], "set granularity per_group and group_size 16"),
        (["quantize.weight.format=fp6_e3m2", "quantize.weight.bits=6", "quantize.weight.rounding=gptq"], "gptq"),
        (["quantize.activation.format=fp6_e3m2"], "quantize.activation.format"),
        (["quantize.activation.format=fp8_e4m3", "quantize.activation.bits=null"], "set bits: 8 or format: int"),
        ([*FP8, "export.device_class=ada", "allocation={}"], "offer fp8_e4m3 in allocation.weight_formats"),
        ([*NVFP4, "export.device_class=blackwell", "finetune={}"], "finetune.learn_weight_scales"),
    ],
)
def test_bad_format_input_is_one_line_naming_the_key(overrides, fragment):
    with pytest.raises(SpecError) as error:
        load_spec(overrides=overrides)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_plan_json_round_trips_formats_and_refuses_unknown_ones(tmp_path):
    plan = LayerPlan(
        {
            "a": LayerConfig(WeightConfig(8, format="fp8_e4m3"), ActivationConfig(8, format="fp8_e5m2")),
            "b": LayerConfig(WeightConfig(4, "per_group", group_size=16, format="fp4_e2m1"), ActivationConfig(8)),
            "c": LayerConfig(WeightConfig(8), ActivationConfig(8)),
        }
    )
    path = plan.save(tmp_path / "plan.json")
    assert LayerPlan.load(path) == plan
    layers = json.loads(path.read_text())["layers"]
    assert "format" not in layers["c"]["weight"] and "format" not in layers["c"]["activation"]
    layers["a"]["activation"]["format"] = "fp6_e3m2"
    with pytest.raises(ValueError, match="unknown activation format 'fp6_e3m2'"):
        LayerPlan.from_json_dict(layers)
    layers["a"]["activation"] = {"bits": 6, "format": "fp8_e4m3"}
    with pytest.raises(ValueError, match="stores 8 bits"):
        LayerPlan.from_json_dict(layers)


def test_bytes_are_counted_exactly_per_format():
    shape = (32, 64)
    assert quantized_weight_bytes(shape, WeightConfig(8, format="fp8_e4m3")) == 2048 + 4 * 32
    assert quantized_weight_bytes(shape, WeightConfig(8, "per_tensor", format="fp8_e5m2")) == 2048 + 4
    assert quantized_weight_bytes(shape, WeightConfig(6, format="fp6_e2m3")) == 1536 + 4 * 32
    nvfp4 = WeightConfig(4, "per_group", group_size=16, format="fp4_e2m1")
    assert quantized_weight_bytes(shape, nvfp4) == 1024 + 128 + 4  # 4 bits each, one FP8 code per 16, the global
    model = nn.Sequential(nn.Linear(64, 32))
    sizes = packed_weight_bytes(model, LayerPlan({"0": LayerConfig(nvfp4, None)}))
    assert sizes["fp32"] - sizes["packed"] == 4 * 2048 - (1024 + 128 + 4)


def test_device_table_for_float_formats():
    expect = {
        "orin": (False, False),
        "ampere": (False, False),
        "ada": (True, False),
        "hopper": (True, False),
        "blackwell": (True, True),
        "cpu": (False, False),
    }
    for name, (fp8, fp4) in expect.items():
        device = DEVICE_CLASSES[name]
        assert (device.format_problem("conv", "fp8_e4m3", "fp8_e4m3") is None) == fp8, name
        assert (device.format_problem("linear", "fp6_e3m2", "int") is None) == fp8, name
        assert (device.format_problem("linear", "fp4_e2m1", "fp8_e4m3") is None) == fp4, name
        assert device.format_problem("conv", "fp4_e2m1", "int") is not None
        assert device.format_problem("linear", "int", "fp8_e5m2") is not None
        assert device.format_problem("conv", "int", "int") is None


def test_float_layers_get_no_onnxruntime_output_quantizer():
    conv = nn.Conv2d(16, 16, 3)
    assert output_quantizer_allowed("c", conv, LayerConfig(WeightConfig(8), ActivationConfig(8)))
    assert not output_quantizer_allowed("c", conv, LayerConfig(WeightConfig(8, format="fp8_e4m3"), ActivationConfig(8)))
    assert not output_quantizer_allowed("c", conv, LayerConfig(WeightConfig(8), ActivationConfig(8, format="fp8_e4m3")))


def test_nvfp4_state_round_trips_and_its_scales_are_not_learnable():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.SiLU(), nn.Linear(16, 8))
    plan = LayerPlan(
        {
            "0": LayerConfig(WeightConfig(4, "per_group", group_size=16, format="fp4_e2m1"), ActivationConfig(8)),
            "2": LayerConfig(WeightConfig(8, format="fp8_e4m3"), ActivationConfig(8, format="fp8_e4m3")),
        }
    )
    apply_plan(model, plan)
    x = torch.randn(8, 32)
    for q in input_quantizers(model).values():
        q.start_observing()
    model(x)
    for q in input_quantizers(model).values():
        q.finish_observing()
    state = quantizer_state(model)
    assert "0.weight_quantizer.global_scale" in state
    other = nn.Sequential(nn.Linear(32, 16), nn.SiLU(), nn.Linear(16, 8))
    other.load_state_dict({k: v for k, v in model.state_dict().items() if k in other.state_dict()})
    apply_plan(other, plan)
    load_quantizer_state(other, state)
    assert torch.equal(other(x), model(x))
    with pytest.raises(ValueError, match="cannot be learned"):
        model[0].weight_quantizer.make_learnable()


def test_lsq_on_a_float_grid_equals_fake_quant_and_learns():
    fmt = FLOAT_FORMATS["fp8_e4m3"]
    x = torch.randn(4096) * 3
    step = torch.tensor(0.004, requires_grad=True)
    out = lsq_fake_quant(x, step, fmt, x.numel())
    assert torch.equal(out.detach(), fake_quant(x, step.detach(), fmt))
    out.pow(2).sum().backward()
    assert step.grad is not None and float(step.grad) != 0.0
    quantizer = FakeQuantizer(8, None, fmt="fp8_e4m3")
    quantizer.calibrate_from(x)
    learned = quantizer.make_learnable()
    assert torch.equal(quantizer(x), fake_quant(x, learned.detach(), fmt))


def test_mse_observer_searches_the_float_grid():
    torch.manual_seed(0)
    w = torch.randn(8, 256) * torch.logspace(-1, 1, 8).unsqueeze(1)
    w[:, 0] *= 20  # one outlier column
    fmt = FLOAT_FORMATS["fp6_e2m3"]
    minmax, mse = weight_scale(w, fmt, "minmax"), weight_scale(w, fmt, "mse")

    def error(scale):
        return (fake_quant(w, scale, fmt, axis=0) - w).pow(2).mean(dim=1)

    assert bool((error(mse) <= error(minmax)).all()) and bool((mse <= minmax).all())


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj_in = nn.Linear(24, 32)
        self.proj_out = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(torch.relu(self.proj_in(x)))


def test_library_quantize_with_float_formats_and_its_refusals():
    x = torch.randn(16, 24)
    config = QuantizeSpec(
        weight=WeightConfig(8, format="fp8_e4m3"),
        activation=ActivationQuantSpec(bits=8, format="fp8_e4m3"),
        keep_full_precision=[],
    )
    with pytest.raises(ConfigError, match=r"cannot run on orin: FP8 needs compute capability 8\.9"):
        quantize(_Stack(), config, lambda m: m(x))
    result = quantize(_Stack(), config, lambda m: m(x), device_class="ada")
    assert result.plan["proj_in"].weight.format == "fp8_e4m3" and result.calibrated == 2
    assert result.module.proj_in.input_quantizer.format_name == "fp8_e4m3"
    nvfp4 = QuantizeSpec(weight=WeightConfig(4, "per_group", group_size=16, format="fp4_e2m1"), keep_full_precision=[])
    with pytest.raises(ConfigError, match="proj_in has 24 input channels, not a multiple of 16"):
        plan_from_spec(_Stack(), nvfp4)
    override = QuantizeSpec(
        weight=WeightConfig(8, format="fp8_e4m3"), overrides=[{"layers": ["proj_in"], "weight_bits": 4}]
    )
    with pytest.raises(ConfigError, match=r"overrides\.0\.weight_bits"):
        plan_from_spec(_Stack(), override)
