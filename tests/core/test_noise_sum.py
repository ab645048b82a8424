"""``allocation.noise_sum``: the quality term adds noise power (independent errors) or amplitude (coherent)."""

import itertools
import math

import pytest

from diffquant.errors import SpecError
from diffquant.mixed_precision.allocate import allocate_plan
from diffquant.mixed_precision.sensitivity import SensitivityTable
from diffquant.quant.plan import (
    ActivationConfig,
    LayerConfig,
    LayerPlan,
    WeightConfig,
    packed_weight_bytes,
    quantizable_layers,
)
from diffquant.spec import AllocationSpec, BudgetSpec, spec_from_dict

BITS = [2, 3, 4, 6, 8]
FREE = 3  # layers the solver chooses for; the others are pinned to w4a8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.conftest import tiny_calibrated

    model, calib = tiny_calibrated(tmp_path_factory.mktemp("m"))
    names = quantizable_layers(model.unet)
    by_size = sorted(names, key=lambda n: -model.unet.get_submodule(n).weight.numel())
    free = by_size[:FREE]
    # noise (at 2 bits, fall per bit): the middle layer has a large error that falls slowly with bits,
    # the other two small errors that fall fast
    shape = {free[0]: (0.02, 8.0), free[1]: (1.0, 2.0), free[2]: (0.02, 8.0)}
    rows = [
        {
            "layer": n,
            "kind": "weight",
            "bits": b,
            "group_size": None,
            "noise": shape[n][0] * shape[n][1] ** -(b - 2) if n in shape else 4.0**-b,
            "sqnr_db": 0.0,
        }
        for n in names
        for b in BITS
    ]
    rows += [
        {"layer": n, "kind": "activation", "bits": 8, "group_size": None, "noise": 1e-6, "sqnr_db": 60.0} for n in names
    ]
    return model, calib, SensitivityTable(rows), free


def _plan(model, free, bits):
    plan = LayerPlan()
    for name in quantizable_layers(model.unet):
        b = dict(zip(free, bits, strict=True)).get(name, 4)
        plan[name] = LayerConfig(WeightConfig(b), ActivationConfig(8))
    return plan


def _brute_force(tiny, budget, aggregate):
    """The free layers' bits that minimise ``aggregate`` of their weight noise within ``budget`` bytes."""
    model, _, table, free = tiny
    best = None
    for bits in itertools.product(BITS, repeat=FREE):
        if packed_weight_bytes(model.unet, _plan(model, free, bits))["packed"] > budget:
            continue
        value = sum(aggregate(table.noise(n, "weight", b)) for n, b in zip(free, bits, strict=True))
        if best is None or value < best[0] - 1e-12:
            best = (value, bits)
    assert best is not None
    return best[1]


def _allocate(tiny, budget, noise_sum):
    model, calib, table, free = tiny
    config = AllocationSpec(
        weight_bits=BITS,
        group_bits=[],
        budget=BudgetSpec(avg_weight_bits=None, bytes=budget),
        tie_qkv=False,
        quantize_family_fp_layers=True,
        pinned={n: "w4a8" for n in quantizable_layers(model.unet) if n not in free},
        noise_sum=noise_sum,
    )
    plan, _ = allocate_plan(model, calib, config, table)
    return tuple(plan[n].weight.bits for n in free)


def test_each_sum_matches_brute_force_and_they_choose_differently(tiny):
    """Power gives the bits to the layer with the large error; amplitude values the small ones' errors more."""
    model, _, _, free = tiny
    budget = packed_weight_bytes(model.unet, _plan(model, free, (4, 4, 4)))["packed"]
    power = _allocate(tiny, budget, "power")
    amplitude = _allocate(tiny, budget, "amplitude")
    assert power == _brute_force(tiny, budget, lambda n: n)
    assert amplitude == _brute_force(tiny, budget, math.sqrt)
    # power buys the large error down with the small layers' bits (their 2-bit noise is tiny as power);
    # amplitude, which counts those errors as sqrt, keeps them at 3 bits
    assert power == (2, 8, 2) and amplitude == (3, 6, 3)


def test_the_default_stays_out_of_the_spec_and_bad_values_are_refused():
    plain = spec_from_dict({"allocation": {}})
    assert "noise_sum" not in plain.to_yaml()
    assert plain.spec_hash() == spec_from_dict({"allocation": {"noise_sum": "power"}}).spec_hash()
    assert "noise_sum: amplitude" in spec_from_dict({"allocation": {"noise_sum": "amplitude"}}).to_yaml()
    with pytest.raises(SpecError, match="noise_sum"):
        spec_from_dict({"allocation": {"noise_sum": "energy"}})
