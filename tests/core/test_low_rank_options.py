"""Options of mixed precision beyond integer bits: low-rank branches (``allocation.ranks``) and float formats."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import diffquant
from diffquant.errors import SpecError
from diffquant.metrics import sqnr_db
from diffquant.mixed_precision.allocate import allocation_options
from diffquant.mixed_precision.costs import (
    LOW_RANK_BITS,
    MixedPrecisionInputs,
    Option,
    build_problem,
    grid_options,
    option_name,
)
from diffquant.mixed_precision.sensitivity import SensitivityTable, branch_ranks, quantize_only
from diffquant.mixed_precision.solver import solve_allocation
from diffquant.quant.modules import QuantLinear
from diffquant.quant.plan import packed_weight_bytes, quantized_weight_bytes
from diffquant.spec import AllocationSpec, BudgetSpec, QuantizeSpec, WeightConfig, load_spec

LAYERS = {"a": (16, 32), "b": (8, 8), "c": (4, 64)}
"""Layer -> (out, fan_in) of the toy program."""
CONV = "down_blocks.0.resnets.0.conv1"
LINEAR = "down_blocks.1.attentions.0.to_q"


def _inputs(max_ranks: dict[str, int] | None = None) -> MixedPrecisionInputs:
    return MixedPrecisionInputs(
        layers=list(LAYERS),
        weight_numel={n: o * i for n, (o, i) in LAYERS.items()},
        out_channels={n: o for n, (o, _) in LAYERS.items()},
        macs={n: 10 * o * i for n, (o, i) in LAYERS.items()},
        other_params=0,
        group_channels={n: i for n, (_, i) in LAYERS.items()},
        max_ranks=max_ranks if max_ranks is not None else {n: min(o, i) for n, (o, i) in LAYERS.items()},
    )


def _noise(layer: str, kind: str, bits: int | None, group: int | None, rank: int = 0, fmt: str = "int") -> float:
    """Toy sensitivities: halving per bit, and a branch of rank r removes r / 8 of the weight noise."""
    if bits is None:
        return 0.0
    value = 2.0**-bits * (1.0 if kind == "weight" else 0.01)
    return value * max(0.0, 1 - rank / 8) if kind == "weight" else value


def _zero(*_args: object) -> float:
    return 0.0


def _brute_force(problem) -> float:
    best = np.inf
    for combo in itertools.product(range(len(problem.options)), repeat=len(problem.layers)):
        if not all(np.isfinite(problem.cost[i, o]) for i, o in enumerate(combo)):
            continue
        if any(
            sum(problem.resources[r][i, o] for i, o in enumerate(combo)) > limit + 1e-9
            for r, limit in problem.budgets.items()
        ):
            continue
        best = min(best, sum(problem.cost[i, o] for i, o in enumerate(combo)))
    return best


def _tiny(folder):
    """A fresh tiny class-conditional U-Net and 12 calibration inputs (each test quantizes its own copy in place)."""
    from tests.conftest import tiny_calibrated

    return tiny_calibrated(folder, trajectories=4, steps=4, inputs=12)


def test_option_names():
    assert option_name(4, 8) == "w4a8" and option_name(4, 8, None, 16) == "w4a8r16"
    spec = AllocationSpec(weight_bits=[2, 4], group_bits=[4], group_sizes=[32], ranks=[0, 8])
    assert {n for n in allocation_options(spec) if n.endswith("r8")} == {"w2a8r8", "w4a8r8"}  # per-channel only
    assert not any(n.endswith("r8") for n in allocation_options(AllocationSpec()))
    assert option_name(8, 8, None, 0, "fp8_e4m3", "fp8_e4m3") == "wfp8e4m3afp8e4m3"


def test_a_branch_option_costs_its_float16_values_and_macs():
    weights = [(2, None), (4, None)]
    problem = build_problem(_inputs(), _noise, _zero, grid_options(weights, [8], [0, 2]), {"avg_weight_bits": 4.0}, {})
    assert problem.options == ["w2a8", "w2a8r2", "w4a8", "w4a8r2"]
    total = sum(o * i for o, i in LAYERS.values())
    for row, (out, fan_in) in enumerate(LAYERS.values()):
        plain, branch = problem.options.index("w2a8"), problem.options.index("w2a8r2")
        values = 2 * (out + fan_in)
        size = problem.resources["bytes"]
        assert size[row, branch] - size[row, plain] == values * LOW_RANK_BITS // 8
        bits = problem.resources["avg_weight_bits"]
        assert bits[row, branch] - bits[row, plain] == pytest.approx(values * LOW_RANK_BITS / total)
        ops = problem.resources["bitops"]
        branch_macs = 10 * out * fan_in * values / (out * fan_in)
        assert ops[row, branch] - ops[row, plain] == pytest.approx(branch_macs * LOW_RANK_BITS**2)
        assert problem.cost[row, branch] < problem.cost[row, plain]  # the noise callable got the rank


def test_a_layer_without_room_for_the_rank_cannot_take_the_branch():
    inputs = _inputs({"a": 16, "b": 1, "c": 0})
    problem = build_problem(inputs, _noise, _zero, grid_options([(4, None)], [8], [0, 2]), {"avg_weight_bits": 8.0}, {})
    column = problem.options.index("w4a8r2")
    assert np.isfinite(problem.cost[0, column])
    assert not np.isfinite(problem.cost[1, column]) and not np.isfinite(problem.cost[2, column])


@pytest.mark.parametrize("budget", [2.3, 2.6, 3.0, 3.5, 4.2])
def test_the_solver_buys_a_branch_where_it_is_cheaper_than_bits_and_is_optimal(budget):
    weights = [(2, None), (3, None), (4, None)]
    problem = build_problem(
        _inputs(), _noise, _zero, grid_options(weights, [8], [0, 2, 4]), {"avg_weight_bits": budget}, {"quality": 1.0}
    )
    result = solve_allocation(problem)
    assert result.objective == pytest.approx(_brute_force(problem))
    assert result.usage["avg_weight_bits"] <= budget + 1e-9


def test_a_branch_is_bought_where_it_is_cheaper_than_a_bit():
    # one 64 x 1024 layer: a rank-4 branch stores 4 * 1088 float16 values, 1.06 bits per weight, and
    # (here) cuts the weight noise by 5x, more than the 2x of one more bit; the budget holds W3 or W2 + branch
    inputs = MixedPrecisionInputs(["a"], {"a": 64 * 1024}, {"a": 64}, {"a": 64 * 1024}, 0, max_ranks={"a": 64})

    def noise(layer: str, kind: str, bits: int | None, group: int | None, rank: int = 0, fmt: str = "int") -> float:
        return 0.0 if bits is None or kind != "weight" else 2.0**-bits / (5.0 if rank else 1.0)

    weights = [(2, None), (3, None), (4, None)]
    options = grid_options(weights, [8], [0, 4])
    problem = build_problem(inputs, noise, _zero, options, {"avg_weight_bits": 3.1}, {})
    result = solve_allocation(problem)
    assert result.choice == {"a": "w2a8r4"}
    assert result.usage["avg_weight_bits"] == pytest.approx(2 + 4 * 1088 * 16 / (64 * 1024))
    tight = build_problem(inputs, noise, _zero, options, {"avg_weight_bits": 3.05}, {})
    assert solve_allocation(tight).choice == {"a": "w3a8"}


def test_quantize_only_with_a_branch_quantizes_the_residual_and_restores():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32))
    with torch.no_grad():
        model[0].weight.mul_(torch.linspace(0.1, 3.0, 32))  # a few strong input directions
    x = torch.randn(64, 32)
    reference = model(x)
    original = model[0]
    errors = {}
    for rank in (0, 4, 16):
        with torch.no_grad(), quantize_only(model, "0", 3, None, rank=rank) as layer:
            assert isinstance(layer, QuantLinear) and (layer.low_rank is not None) == (rank > 0)
            errors[rank] = sqnr_db(reference, model(x))
        assert model[0] is original
    assert errors[0] < errors[4] < errors[16]
    assert branch_ranks(original, [0, 4, 64]) == [4]  # 0 is no branch, 64 > min(out, in)
    assert branch_ranks(nn.Conv2d(4, 4, 3, groups=2), [1]) == []


def test_table_keeps_ranks_and_reads_a_table_without_them(tmp_path):
    rows = [
        {"layer": "a", "kind": "weight", "bits": 4, "group_size": None, "sqnr_db": 20.0, "noise": 0.01},
        {"layer": "a", "kind": "weight", "bits": 4, "group_size": None, "sqnr_db": 30.0, "noise": 0.001, "rank": 8},
    ]
    path = SensitivityTable(rows).save_csv(tmp_path / "t.csv")
    table = SensitivityTable.load_csv(path)
    assert table.noise("a", "weight", 4) == 0.01 and table.noise("a", "weight", 4, rank=8) == 0.001
    assert not table.has("a", "weight", 4, rank=16)
    legacy = tmp_path / "legacy.csv"
    header, *lines = path.read_text().splitlines()
    legacy.write_text("\n".join([header.removesuffix(",rank"), lines[0].removesuffix(",0")]) + "\n")
    assert SensitivityTable.load_csv(legacy).noise("a", "weight", 4) == 0.01


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["allocation={ranks: [0, 8]}", "quantize.low_rank={rank: 8}"], "set one of them"),
        (["allocation={ranks: [0, 8]}", "quantize.weight.rounding=gptq"], "not combined with gptq"),
        (["allocation={ranks: [-1]}"], "ranks must be from 0"),
    ],
)
def test_bad_branch_options_are_refused(overrides, message):
    with pytest.raises(SpecError, match=message):
        load_spec(overrides=overrides)


def test_auto_quantize_plans_and_runs_the_branches_it_buys(tmp_path):
    model, calib = _tiny(tmp_path)
    config = AllocationSpec(
        weight_bits=[2, 4],
        group_bits=[],
        ranks=[0, 2],
        content_layers=[],
        budget=BudgetSpec(avg_weight_bits=3.5),
        quantize_family_fp_layers=True,
        pinned={CONV: "w2a8r2"},  # the tiny model's layers are too small to buy one under a budget
    )
    result = diffquant.auto_quantize(model, config, calib, steps=4)
    ranked = {name for name, option in result.allocation.choice.items() if option.endswith("r2")}
    assert CONV in ranked
    assert {n for n, cfg in result.plan.items() if cfg.low_rank is not None} == ranked
    assert result.plan[CONV].low_rank.rank == 2 and result.plan[CONV].output is None
    for name in ranked:
        assert result.module.get_submodule(name).low_rank is not None
    assert any(row.get("rank") == 2 for row in result.sensitivity.rows)
    assert result.allocation.usage["avg_weight_bits"] <= 3.5 + 1e-9


def test_float_format_options_cost_their_exact_bytes():
    inputs = _inputs()
    options = [
        Option(4, None, 8),
        Option(8, None, 8, weight_format="fp8_e4m3"),
        Option(4, 16, 8, weight_format="fp4_e2m1"),
    ]
    problem = build_problem(inputs, _noise, _zero, options, {"avg_weight_bits": 8.0}, {})
    assert problem.options == ["w4a8", "wfp8e4m3a8", "wfp4e2m1a8"]
    total = sum(o * i for o, i in LAYERS.values())
    for row, (out, fan_in) in enumerate(LAYERS.values()):
        if fan_in % 16:  # layer b: 8 input channels hold no NVFP4 block
            assert not np.isfinite(problem.cost[row, 2])
            continue
        for column, option in enumerate(options):
            config = option.weight_config()
            assert problem.resources["bytes"][row, column] == quantized_weight_bytes((out, fan_in), config)
        nvfp4 = problem.resources["avg_weight_bits"][row, 2]
        assert nvfp4 == pytest.approx((4 + 8 / 16) * out * fan_in / total)  # FP8 block scale per 16 values


def test_allocation_offers_float_formats_counts_them_exactly_and_removes_what_the_device_cannot_run(tmp_path):
    model, calib = _tiny(tmp_path)
    config = AllocationSpec(
        weight_bits=[4, 8],
        group_bits=[],
        weight_formats=["fp8_e4m3", "fp4_e2m1"],
        activation_formats=["fp8_e4m3"],
        content_layers=[],
        budget=BudgetSpec(avg_weight_bits=5.0),
        quantize_family_fp_layers=True,
        pinned={CONV: "wfp8e4m3afp8e4m3", LINEAR: "wfp4e2m1a8"},
    )
    mse = QuantizeSpec(weight=WeightConfig(8, observer="mse"))  # NVFP4 keeps its own absmax recipe
    result = diffquant.auto_quantize(model, config, calib, quantize_config=mse, steps=4, device_class="blackwell")
    assert result.plan[LINEAR].weight.observer == "minmax" and result.plan[CONV].weight.observer == "mse"
    assert result.plan[CONV].weight.format == "fp8_e4m3" and result.plan[CONV].activation.format == "fp8_e4m3"
    assert result.plan[LINEAR].weight.format == "fp4_e2m1" and result.plan[LINEAR].weight.group_size == 16
    assert result.allocation.usage["bytes"] == packed_weight_bytes(model.unet, result.plan)["packed"]
    assert "not on a convolution" in result.allocation.removed["wfp4e2m1a8"]
    convs = {n for n, m in model.unet.named_modules() if isinstance(m, nn.Conv2d)}
    assert not any(result.plan[n].weight is not None and result.plan[n].weight.format == "fp4_e2m1" for n in convs)
    formats = {(row["kind"], row["format"]) for row in result.sensitivity.rows}
    assert {("weight", "fp8_e4m3"), ("weight", "fp4_e2m1"), ("activation", "fp8_e4m3")} <= formats
