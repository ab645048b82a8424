"""Device classes: the capability table, its spec key (default, validation, hash) and the plan check."""

from __future__ import annotations

import itertools

import pytest

from diffquant.devices import (
    DEVICE_CLASS_ENV,
    DEVICE_CLASS_NAMES,
    DEVICE_CLASSES,
    check_device_match,
    device_class,
    machine_device_class,
    plan_problems,
    resolve_device_class,
)
from diffquant.errors import ConfigError, DeviceClassError, SpecError
from diffquant.quant.plan import ActivationConfig, LayerConfig, LayerPlan, WeightConfig
from diffquant.spec import CompressionSpec, load_spec

GPU = ("orin", "ampere", "ada", "hopper", "blackwell")


def test_the_table_holds_the_issue_facts():
    assert set(DEVICE_CLASS_NAMES) == set(DEVICE_CLASSES) == {*GPU, "cpu"}
    orin = DEVICE_CLASSES["orin"]
    assert orin.compute_capability == (8, 7) and orin.runtime == "tensorrt" and orin.runtime_version == "10.3"
    assert orin.int4_gemm and not orin.int4_conv and not orin.fp8 and not orin.fp4
    assert [name for name in GPU if DEVICE_CLASSES[name].fp8] == ["ada", "hopper", "blackwell"]
    assert [name for name in GPU if DEVICE_CLASSES[name].fp4] == ["blackwell"]
    for name in GPU:  # FP8 from sm 8.9, FP4 from sm 10.0: the flags agree with the capabilities
        entry = DEVICE_CLASSES[name]
        assert entry.fp8 == (entry.compute_capability >= (8, 9)), name
        assert entry.fp4 == (entry.compute_capability >= (10, 0)), name
        assert entry.runtime == "tensorrt" and not entry.output_quantizers
    cpu = DEVICE_CLASSES["cpu"]
    assert cpu.runtime == "onnxruntime" and cpu.compute_capability is None and cpu.output_quantizers
    assert cpu.to_dict()["block_kinds"] == ["conv", "linear"]
    with pytest.raises(AttributeError):
        orin.fp8 = True  # frozen: one table, not patched at run time
    with pytest.raises(TypeError):
        DEVICE_CLASSES["tpu"] = orin


@pytest.mark.parametrize("name", DEVICE_CLASS_NAMES)
def test_every_weight_option_against_every_class(name):
    """Brute force: each (layer kind, bits, group) is refused exactly when the table's block entries say so."""
    entry = DEVICE_CLASSES[name]
    for kind, bits, group in itertools.product(("conv", "linear"), range(2, 9), (None, 32)):
        problem = entry.weight_problem(kind, bits, group)
        expected = group is not None and (kind not in entry.block_kinds or bits > entry.block_max_bits)
        assert (problem is not None) == expected, (name, kind, bits, group, problem)
        if problem is not None:
            assert name in problem and ("group-wise" in problem)
        note = entry.weight_note(kind, bits)
        assert (note is not None) == (bits <= 4 and kind == "conv"), (name, kind, bits)
    if name != "cpu":  # TensorRT: group-wise only on Linear layers, INT4 only
        assert entry.weight_problem("linear", 4, 32) is None
        assert "not on a conv" in entry.weight_problem("conv", 4, 32)
        assert "at most 4 bits" in entry.weight_problem("linear", 8, 32)
        assert "onnxruntime form" in entry.output_problem()
    else:
        assert entry.output_problem() is None


def test_plan_problems_name_each_layer():
    plan = LayerPlan(
        {
            "conv_in": LayerConfig(WeightConfig(8), ActivationConfig(8)),
            "down.conv": LayerConfig(WeightConfig(4, "per_group", group_size=32), ActivationConfig(8)),
            "attn.to_q": LayerConfig(WeightConfig(4, "per_group", group_size=32), ActivationConfig(8)),
            "up.conv": LayerConfig(WeightConfig(8), ActivationConfig(8), output=ActivationConfig(8)),
            "conv_out": LayerConfig(None, None),
        }
    )
    kinds = {"conv_in": "conv", "down.conv": "conv", "attn.to_q": "linear", "up.conv": "conv", "conv_out": "conv"}
    problems = plan_problems(DEVICE_CLASSES["orin"], plan, kinds)
    assert [layer for layer, _ in problems] == ["down.conv", "up.conv"]
    assert "orin" in problems[0][1] and "onnxruntime form" in problems[1][1]
    assert plan_problems(DEVICE_CLASSES["cpu"], plan, kinds) == []


def test_lookups_and_the_machine_class(monkeypatch):
    assert device_class("ada").name == "ada" and device_class(DEVICE_CLASSES["ada"]) is DEVICE_CLASSES["ada"]
    with pytest.raises(ConfigError, match="device_class: unknown device class 'tpu'; choose one of orin, ampere"):
        device_class("tpu")
    assert resolve_device_class(None, "tensorrt").name == "orin"
    assert resolve_device_class(None, "onnxruntime").name == "cpu"
    with pytest.raises(ConfigError, match="cpu runs onnxruntime, not the tensorrt form"):
        resolve_device_class("cpu", "tensorrt")
    monkeypatch.delenv(DEVICE_CLASS_ENV, raising=False)
    assert machine_device_class() is None
    monkeypatch.setenv(DEVICE_CLASS_ENV, "hopper")
    assert machine_device_class() == "hopper"
    monkeypatch.setenv(DEVICE_CLASS_ENV, "h100")
    with pytest.raises(ConfigError, match="DIFFQUANT_DEVICE_CLASS: unknown device class 'h100'"):
        machine_device_class()
    check_device_match("ada", None, "m v1")  # the machine did not say: accepted
    check_device_match("ada", "ada", "m v1")
    with pytest.raises(DeviceClassError, match="m v1 was built for device class ada, but this machine is orin"):
        check_device_match("ada", "orin", "m v1")


def test_spec_default_follows_the_target_and_keeps_the_hash():
    base = CompressionSpec()
    assert base.export.device_class is None and base.export.device.name == "orin"
    assert "device_class" not in base.to_dict()["export"]
    # the target's own class written out is the same spec (same hash, same MLflow params)
    explicit = load_spec(overrides=["export.device_class=orin"])
    assert explicit == base and explicit.spec_hash() == base.spec_hash()
    ort = load_spec(overrides=["export.target=onnxruntime"])
    assert ort.export.device.name == "cpu"
    assert load_spec(overrides=["export.target=onnxruntime", "export.device_class=cpu"]) == ort
    ada = load_spec(overrides=["export.device_class=ada"])
    assert ada.export.device.name == "ada" and ada.to_dict()["export"]["device_class"] == "ada"
    assert ada.spec_hash() != base.spec_hash() and ada.flat_params()["export.device_class"] == "ada"
    assert load_spec(overrides=[f"export.device_class={c}" for c in ["ada"]]).to_yaml() == ada.to_yaml()


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["export.device_class=cpu"], "export.device_class cpu: cpu runs onnxruntime, not the tensorrt form"),
        (
            ["export.target=onnxruntime", "export.device_class=hopper"],
            "export.device_class hopper: hopper runs tensorrt, not the onnxruntime form",
        ),
        (["export.device_class=tpu"], "invalid spec value at 'export.device_class'"),
    ],
    ids=["cpu-with-tensorrt", "gpu-with-onnxruntime", "unknown"],
)
def test_spec_refuses_a_class_that_does_not_take_the_target(overrides, fragment):
    with pytest.raises(SpecError) as caught:
        load_spec(overrides=overrides)
    message = str(caught.value)
    assert fragment in message and "\n" not in message
