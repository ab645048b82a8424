"""The integer program against brute force on random small instances."""

import itertools

import numpy as np
import pytest

from diffquant.mixed_precision.solver import AllocationInfeasibleError, AllocationProblem, solve_allocation


def brute_force(problem: AllocationProblem):
    """Best objective over every assignment (None when infeasible)."""
    n_l, n_o = len(problem.layers), len(problem.options)
    index = {n: i for i, n in enumerate(problem.layers)}
    best = None
    for combo in itertools.product(range(n_o), repeat=n_l):
        if any(not np.isfinite(problem.cost[i, o]) for i, o in enumerate(combo)):
            continue
        if any(len({combo[index[name]] for name in group}) > 1 for group in problem.groups):
            continue
        if any(problem.options[combo[index[layer]]] != option for layer, option in problem.pinned.items()):
            continue
        if any(
            sum(problem.resources[r][i, o] for i, o in enumerate(combo)) > limit + 1e-9
            for r, limit in problem.budgets.items()
        ):
            continue
        value = sum(problem.cost[i, o] for i, o in enumerate(combo))
        best = value if best is None else min(best, value)
    return best


def random_problem(rng: np.random.Generator) -> AllocationProblem:
    n_l, n_o = int(rng.integers(2, 6)), int(rng.integers(2, 5))
    layers = [f"l{i}" for i in range(n_l)]
    options = [f"o{j}" for j in range(n_o)]
    cost = rng.random((n_l, n_o)) * rng.integers(1, 10)
    if rng.random() < 0.3:
        cost[rng.integers(n_l), rng.integers(n_o)] = np.nan  # an option one layer cannot take
    bits = np.sort(rng.choice([2, 3, 4, 6, 8], size=n_o, replace=False) if n_o <= 5 else rng.integers(2, 9, n_o))
    params = rng.integers(10, 1000, n_l)
    resources = {
        "avg_weight_bits": np.outer(params, bits) / params.sum(),
        "bytes": np.outer(params, bits) / 8,
        "bitops": np.outer(params * rng.integers(1, 50, n_l), bits * 8.0),
    }
    names = list(rng.choice(list(resources), size=int(rng.integers(1, 4)), replace=False))
    budgets = {}
    for name in names:
        low, high = resources[name].min(1).sum(), resources[name].max(1).sum()
        budgets[name] = float(low + rng.random() * (high - low) * 1.1 - 0.05 * (high - low))
    groups = []
    if n_l >= 3 and rng.random() < 0.5:
        groups.append(list(rng.choice(layers, size=2, replace=False)))
    pinned = {}
    allowed = [o for o in range(n_o) if np.isfinite(cost[-1, o])]
    if rng.random() < 0.3:
        pinned[layers[-1]] = options[int(rng.choice(allowed))]
    return AllocationProblem(layers, options, cost, resources, budgets, groups, pinned)


def test_matches_brute_force_on_random_instances():
    rng = np.random.default_rng(0)
    solved = infeasible = 0
    for _ in range(300):
        problem = random_problem(rng)
        expected = brute_force(problem)
        if expected is None:
            with pytest.raises(AllocationInfeasibleError):
                solve_allocation(problem)
            infeasible += 1
            continue
        result = solve_allocation(problem)
        assert result.objective == pytest.approx(expected, abs=1e-7)
        for name, limit in problem.budgets.items():
            assert result.usage[name] <= limit + 1e-7
        for group in problem.groups:
            assert len({result.choice[layer] for layer in group}) == 1
        for layer, option in problem.pinned.items():
            assert result.choice[layer] == option
        solved += 1
    assert solved >= 200 and infeasible >= 10


def test_infeasible_budget_names_smallest_feasible_value():
    layers, options = ["a", "b"], ["w2", "w4", "w8"]
    bits = np.array([[2, 4, 8], [2, 4, 8]], dtype=float)
    problem = AllocationProblem(
        layers, options, np.zeros((2, 3)), {"avg_weight_bits": bits / 2}, {"avg_weight_bits": 1.5}, pinned={"a": "w8"}
    )
    with pytest.raises(
        AllocationInfeasibleError, match=r"avg_weight_bits <= 1.5 cannot be met.*smallest feasible value is 5"
    ) as info:
        solve_allocation(problem)
    assert info.value.minimal == {"avg_weight_bits": pytest.approx(5.0)}


def test_budget_trades_quality_for_size():
    layers, options = ["a", "b", "c"], ["w4", "w8"]
    cost = np.array([[5.0, 0.0], [1.0, 0.0], [2.0, 0.0]])  # 'a' is sensitive
    bits = np.array([[4, 8]] * 3, dtype=float) / 3
    result = solve_allocation(AllocationProblem(layers, options, cost, {"avg": bits}, {"avg": 16 / 3}))
    assert result.choice == {"a": "w8", "b": "w4", "c": "w4"}
    assert result.usage["avg"] == pytest.approx(16 / 3)


def test_bad_input():
    with pytest.raises(ValueError, match="shape"):
        solve_allocation(AllocationProblem(["a"], ["x", "y"], np.zeros((2, 2))))
    with pytest.raises(ValueError, match="unknown resource"):
        solve_allocation(AllocationProblem(["a"], ["x"], np.zeros((1, 1)), budgets={"bytes": 1.0}))
    with pytest.raises(ValueError, match="unknown option"):
        solve_allocation(AllocationProblem(["a"], ["x"], np.zeros((1, 1)), pinned={"a": "z"}))
    with pytest.raises(ValueError, match="cannot take"):
        solve_allocation(AllocationProblem(["a"], ["x", "y"], np.array([[0.0, np.nan]]), pinned={"a": "y"}))


def test_overlapping_tied_groups_are_united_and_conflicting_pins_refused():
    layers, options = ["a", "b", "c", "d"], ["w4", "w8"]
    cost = np.array([[0.0, 1.0], [5.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    size = np.array([[4.0, 8.0]] * 4)
    problem = AllocationProblem(layers, options, cost, {"bytes": size}, {"bytes": 32.0}, [["a", "b"], ["b", "c"]])
    result = solve_allocation(problem)
    assert len({result.choice[n] for n in "abc"}) == 1
    assert result.objective == pytest.approx(brute_force(problem))
    pinned = AllocationProblem(
        layers, options, cost, {"bytes": size}, {}, [["a", "b"], ["b", "c"]], {"a": "w4", "c": "w8"}
    )
    with pytest.raises(AllocationInfeasibleError, match="pinned to different options"):
        solve_allocation(pinned)


def test_a_pin_on_an_option_a_tied_layer_cannot_take_is_infeasible():
    """The merged row's option is unavailable (NaN for one member): the pin must not force it at cost 0."""
    cost = np.array([[1.0, 0.5], [np.nan, 0.2], [0.3, 0.1]])
    size = np.array([[4.0, 8.0], [4.0, 8.0], [4.0, 8.0]])
    problem = AllocationProblem(
        ["a", "b", "c"], ["w4", "w8"], cost, {"bytes": size}, {"bytes": 100.0}, [["a", "b"]], {"a": "w4"}
    )
    with pytest.raises(AllocationInfeasibleError, match="pinned to option 'w4'"):
        solve_allocation(problem)
    untied = AllocationProblem(["a", "b", "c"], ["w4", "w8"], cost, {"bytes": size}, {"bytes": 100.0}, (), {"a": "w4"})
    assert solve_allocation(untied).choice == {"a": "w4", "b": "w8", "c": "w8"}
