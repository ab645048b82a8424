"""``allocation.cost: deployed``: budgets count what the device class's export stores (INT2/INT4/INT8 + zero points)."""

import pytest

from diffquant.devices import DEVICE_CLASSES
from diffquant.errors import ConfigError, SpecError
from diffquant.mixed_precision.allocate import allocate_plan
from diffquant.mixed_precision.sensitivity import SensitivityTable
from diffquant.mixed_precision.solver import AllocationInfeasibleError
from diffquant.quant.plan import (
    LayerConfig,
    LayerPlan,
    WeightConfig,
    deployed_weight_bytes,
    packed_weight_bytes,
    quantizable_layers,
    stored_weight_bytes,
)
from diffquant.spec import AllocationSpec, BudgetSpec, spec_from_dict

CPU, ORIN = DEVICE_CLASSES["cpu"], DEVICE_CLASSES["orin"]
BITS = [2, 3, 4, 8]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.conftest import tiny_calibrated

    model, calib = tiny_calibrated(tmp_path_factory.mktemp("m"))
    names = quantizable_layers(model.unet)
    # noise falls 4x per bit; layers differ so the solver has choices to make
    rows = [
        {"layer": n, "kind": "weight", "bits": b, "group_size": None, "noise": (1 + i % 5) * 4.0**-b, "sqnr_db": 0.0}
        for i, n in enumerate(names)
        for b in BITS
    ]
    rows += [
        {"layer": n, "kind": "activation", "bits": 8, "group_size": None, "noise": 1e-6, "sqnr_db": 60.0} for n in names
    ]
    return model, calib, SensitivityTable(rows)


def test_storage_rule_and_stored_bytes():
    assert [CPU.storage_bits(b) for b in range(2, 9)] == [2, 4, 4, 8, 8, 8, 8]
    for entry in DEVICE_CLASSES.values():
        if entry.runtime == "tensorrt":
            assert [entry.storage_bits(b) for b in range(2, 9)] == [4, 4, 4, 8, 8, 8, 8]
    # 10 integers and 3 scales: packed integers, fp32 scales, packed zero points
    assert stored_weight_bytes(10, 3, 2) == 3 + 12 + 1
    assert stored_weight_bytes(10, 3, 4) == 5 + 12 + 2
    assert stored_weight_bytes(10, 3, 8) == 10 + 12 + 3


def _allocate(tiny, device, cost, **budget):
    model, calib, table = tiny
    config = AllocationSpec(
        weight_bits=BITS,
        group_bits=[],
        budget=BudgetSpec(**budget),
        cost=cost,
        tie_qkv=False,
        quantize_family_fp_layers=True,  # every layer takes a weight option, as in _uniform
    )
    return allocate_plan(model, calib, config, table, device_class=device)


def _uniform(model, bits):
    return LayerPlan({n: LayerConfig(WeightConfig(bits), None) for n in quantizable_layers(model.unet)})


def test_deployed_budget_is_what_the_export_stores(tiny):
    """The solver's byte count is deployed_weight_bytes of its plan; a plan-cost plan overshoots when deployed."""
    model = tiny[0]
    budget = 1.03 * deployed_weight_bytes(model.unet, _uniform(model, 4), ORIN)  # uniform W4 fits, on any class
    planned, planned_answer = _allocate(tiny, ORIN, "plan", bytes=budget)
    assert planned_answer.usage["bytes"] == pytest.approx(packed_weight_bytes(model.unet, planned)["packed"])
    assert any(cfg.weight.bits == 3 for cfg in planned.values())
    assert deployed_weight_bytes(model.unet, planned, ORIN) > budget  # its 3-bit layers are stored as INT4
    for device in (ORIN, CPU):
        plan, answer = _allocate(tiny, device, "deployed", bytes=budget)
        assert answer.usage["bytes"] == pytest.approx(deployed_weight_bytes(model.unet, plan, device), abs=1e-6)
        assert answer.usage["bytes"] <= budget
        chosen = {cfg.weight.bits for cfg in plan.values()}
        assert device is CPU or 2 not in chosen  # 2 bits cost INT4's bytes on orin
        assert 3 not in chosen  # and 3 bits everywhere: more noise than 4 bits for the same bytes
    # below uniform W4: only INT2 storage (cpu) gets there
    tight = 0.9 * deployed_weight_bytes(model.unet, _uniform(model, 4), CPU)
    plan, answer = _allocate(tiny, CPU, "deployed", bytes=tight)
    assert any(cfg.weight.bits == 2 for cfg in plan.values()) and answer.usage["bytes"] <= tight
    assert answer.usage["bytes"] == pytest.approx(deployed_weight_bytes(model.unet, plan, CPU), abs=1e-6)
    with pytest.raises(AllocationInfeasibleError):
        _allocate(tiny, ORIN, "deployed", bytes=tight)


def test_deployed_average_bits_count_storage_bits(tiny):
    model = tiny[0]
    plan, answer = _allocate(tiny, CPU, "deployed", avg_weight_bits=3.0)
    numel = {n: model.unet.get_submodule(n).weight.numel() for n in plan}
    stored = sum(CPU.storage_bits(plan[n].weight.bits) * numel[n] for n in plan) / sum(numel.values())
    assert answer.usage["avg_weight_bits"] == pytest.approx(stored) and stored <= 3.0 + 1e-9


def test_deployed_cost_needs_a_device_class_and_a_byte_or_bit_budget(tiny):
    model, calib, table = tiny
    config = AllocationSpec(weight_bits=BITS, group_bits=[], budget=BudgetSpec(avg_weight_bits=4.0), cost="deployed")
    with pytest.raises(ConfigError, match=r"^cost: deployed counts what a device class stores"):
        allocate_plan(model, calib, config, table)
    with pytest.raises(SpecError, match="cost: deployed counts stored bytes"):
        spec_from_dict({"allocation": {"cost": "deployed", "budget": {"avg_weight_bits": None, "bitops": 1e9}}})


def test_default_cost_leaves_the_spec_hash_alone():
    plain = spec_from_dict({"allocation": {}})
    assert "cost" not in plain.to_yaml()
    assert plain.spec_hash() == spec_from_dict({"allocation": {"cost": "plan"}}).spec_hash()
    deployed = spec_from_dict({"allocation": {"cost": "deployed"}})
    assert "cost: deployed" in deployed.to_yaml() and deployed.spec_hash() != plain.spec_hash()


def test_deployed_bytes_of_a_uniform_plan_by_hand(tiny):
    """W2 everywhere: cpu stores 2 bits per weight plus 2-bit zero points, orin 4 bits."""
    model = tiny[0]
    plan = _uniform(model, 2)
    weights = [model.unet.get_submodule(n).weight for n in plan]
    fp32 = sum(p.numel() * 4 for p in model.unet.parameters())
    for device, bits in ((CPU, 2), (ORIN, 4)):
        expected = fp32 + sum(
            -(-w.numel() * bits // 8) + 4 * w.shape[0] + -(-w.shape[0] * bits // 8) - 4 * w.numel() for w in weights
        )
        assert deployed_weight_bytes(model.unet, plan, device) == expected
