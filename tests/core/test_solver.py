"""The exact multiple-choice knapsack solver against brute force and HiGHS at relative gap 0.

Each mechanism of ``diffquant.mixed_precision.knapsack`` and ``core_search`` is also run alone on the brute-force
instances (a core that grows from one option, no vertex multipliers beyond 0 and the LP duals, the
HiGHS fallback for every core), so a wrong bound or proof in any of them fails here.
"""

import functools
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from diffquant.mixed_precision import core_search, knapsack
from diffquant.mixed_precision.solver import AllocationInfeasibleError, AllocationProblem, solve_allocation

TOL = 1e-9
RESOURCES = ("avg_weight_bits", "bytes", "bitops", "latency_ms")


def assignments(problem: AllocationProblem):
    """Every assignment meeting ties, pins and availability, as a (count, layers) option-index array."""
    n_l, n_o = len(problem.layers), len(problem.options)
    combos = np.indices((n_o,) * n_l).reshape(n_l, -1).T
    index = {name: i for i, name in enumerate(problem.layers)}
    ok = np.isfinite(problem.cost[np.arange(n_l), combos]).all(axis=1)
    for group in problem.groups:
        first = combos[:, index[group[0]]]
        ok &= np.all([combos[:, index[name]] == first for name in group], axis=0)
    for layer, option in problem.pinned.items():
        ok &= combos[:, index[layer]] == list(problem.options).index(option)
    return combos[ok]


def totals(problem: AllocationProblem, combos: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    return np.asarray(matrix, dtype=float)[np.arange(len(problem.layers)), combos].sum(axis=1)


def within(problem: AllocationProblem, combos: np.ndarray, budgets: dict) -> np.ndarray:
    ok = np.ones(len(combos), dtype=bool)
    for name, limit in budgets.items():
        ok &= totals(problem, combos, problem.resources[name]) <= limit + TOL * max(1.0, abs(limit))
    return ok


def brute_force(problem: AllocationProblem) -> float | None:
    combos = assignments(problem)
    combos = combos[within(problem, combos, problem.budgets)]
    return None if len(combos) == 0 else float(totals(problem, combos, problem.cost).min())


@st.composite
def problems(draw) -> AllocationProblem:
    """Small programs: ties in cost, unavailable options, 0-4 budgets from infeasible to loose, groups, pins."""
    n_l, n_o = draw(st.integers(1, 7)), draw(st.sampled_from([1, 2, 3, 4, 4]))
    while n_o**n_l > 4096:
        n_l -= 1
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    layers, options = [f"l{i}" for i in range(n_l)], [f"o{j}" for j in range(n_o)]
    levels = draw(st.sampled_from([None, 3]))  # few distinct costs: many exact ties
    cost = rng.random((n_l, n_o)) if levels is None else rng.integers(0, levels, (n_l, n_o)).astype(float)
    if draw(
        st.sampled_from([True, True, True, False])
    ):  # more bits, less noise: the usual trade-off, no option dominated
        cost = -np.sort(-cost, axis=1)
    cost[rng.random((n_l, n_o)) < draw(st.sampled_from([0.0, 0.2]))] = np.nan
    bits = np.sort(rng.choice([2.0, 3.0, 4.0, 6.0, 8.0, 16.0], n_o, replace=False))
    params = rng.integers(10, 1000, n_l).astype(float)
    resources = {
        "avg_weight_bits": np.outer(params, bits) / params.sum(),
        "bytes": np.outer(params, bits) / 8 + rng.integers(0, 3) * np.outer(params, 4.0 / bits),
        "bitops": np.outer(params * rng.integers(1, 50, n_l), bits * 8.0),
        "latency_ms": rng.random((n_l, n_o)),
    }
    budgets = {}
    for name in rng.choice(RESOURCES, draw(st.sampled_from([0, 1, 1, 2, 2, 3, 4])), replace=False):
        low, high = resources[name].min(axis=1).sum(), resources[name].max(axis=1).sum()
        budgets[str(name)] = float(low + rng.uniform(-0.05, 1.05) * (high - low))
    groups = [list(rng.choice(layers, 2, replace=False))] if n_l >= 2 and draw(st.booleans()) else []
    pinned = {}
    allowed = np.flatnonzero(np.isfinite(cost[-1]))
    if allowed.size and draw(st.booleans()):
        pinned[layers[-1]] = options[int(rng.choice(allowed))]
    return AllocationProblem(layers, options, cost, resources, budgets, groups, pinned)


def check(problem: AllocationProblem) -> None:
    """The solver's answer is the brute-force optimum, or it refuses exactly when brute force finds none."""
    expected = brute_force(problem)
    try:
        result = solve_allocation(problem)
    except AllocationInfeasibleError as error:
        assert expected is None, f"solver says infeasible, brute force found {expected}"
        check_minimal(problem, error)
        return
    assert expected is not None, f"brute force found nothing, solver returned {result.objective}"
    assert result.objective == pytest.approx(expected, abs=TOL)
    picks = np.array([[problem.options.index(result.choice[name]) for name in problem.layers]])
    assert within(problem, picks, problem.budgets).all()
    assert len(assignments_matching(problem, picks)) == 1
    for name in problem.resources:
        assert result.usage[name] == pytest.approx(totals(problem, picks, problem.resources[name])[0], rel=1e-12)


def assignments_matching(problem: AllocationProblem, picks: np.ndarray) -> np.ndarray:
    combos = assignments(problem)
    return combos[(combos == picks).all(axis=1)]


def check_minimal(problem: AllocationProblem, error: AllocationInfeasibleError) -> None:
    """Each reported minimal budget is the least that resource can be under the other budgets."""
    combos = assignments(problem)
    for name, value in error.minimal.items():
        others = {k: v for k, v in problem.budgets.items() if k != name}
        feasible = combos[within(problem, combos, others)]
        assert value == pytest.approx(totals(problem, feasible, problem.resources[name]).min(), rel=1e-9, abs=TOL)


MECHANISMS = {
    "default": {},
    "core grows from one option": {(knapsack, "_FIRST_CORE"): 1, (knapsack, "_GROWTH"): 1.05},
    "bounds from 0 and the LP duals only": {(core_search, "_KEEP_VERTICES"): 2, (core_search, "_SAMPLE"): 1},
    "HiGHS fallback for every core": {(core_search, "_MAX_STATES"): 0},
}


@pytest.mark.parametrize("mechanism", MECHANISMS)
@settings(max_examples=150, deadline=None)
@given(problem=problems())
def test_matches_brute_force(mechanism, problem):
    with pytest.MonkeyPatch.context() as patch:
        for (module, name), value in MECHANISMS[mechanism].items():
            patch.setattr(module, name, value)
        check(problem)


def bench_like(layers: int, options: int, seed: int, budgets: tuple[str, ...]) -> AllocationProblem:
    """A scaled-down ``bench/allocation.py`` program (tied triples, budgets halfway)."""
    rng = np.random.default_rng(seed)
    bits = np.array([2, 3, 4, 5, 6, 8][:options], dtype=float)
    params = rng.integers(1_000, 1_000_000, layers).astype(float)
    macs = params * rng.integers(1, 64, layers)
    cost = rng.random(layers)[:, None] * np.exp(-bits[None, :] * rng.uniform(0.3, 1.0, layers)[:, None])
    resources = {
        "avg_weight_bits": np.outer(params, bits) / params.sum(),
        "bitops": np.outer(macs, bits * 8),
        "latency_ms": np.outer(params * rng.uniform(0.5, 2.0, layers), 1.0 + bits / 4) / 1e6,
    }
    limits = {}
    for name in budgets:
        low, high = resources[name].min(axis=1).sum(), resources[name].max(axis=1).sum()
        limits[name] = float(low + rng.uniform(0.3, 0.6) * (high - low))
    names = [f"layer{i}" for i in range(layers)]
    groups = [names[i : i + 3] for i in range(0, layers // 4, 3)]
    return AllocationProblem(names, [f"w{int(b)}" for b in bits], cost, resources, limits, groups)


def highs_gap_zero(problem: AllocationProblem) -> float:
    """HiGHS's optimum at relative and absolute gap 0 with rows checked to 1e-10 (``problem`` has no ties)."""
    n_l, n_o = np.shape(problem.cost)
    rows = np.repeat(np.arange(n_l), n_o)
    one_each = coo_matrix((np.ones(n_l * n_o), (rows, np.arange(n_l * n_o))), shape=(n_l, n_l * n_o)).tocsr()
    limits = np.array(list(problem.budgets.values()))
    usage = np.array([problem.resources[name].ravel() / limit for name, limit in problem.budgets.items()])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unrecognized options", category=RuntimeWarning)
        result = milp(
            problem.cost.ravel(),
            constraints=[
                LinearConstraint(one_each, 1, 1),
                LinearConstraint(usage, -np.inf, 1 + TOL * np.maximum(1, np.abs(limits)) / limits),
            ],
            integrality=np.ones(n_l * n_o),
            bounds=Bounds(0, 1),
            options={"mip_rel_gap": 0.0, "mip_abs_gap": 0.0, "mip_feasibility_tolerance": 1e-10},
        )
    assert result.status == 0
    return float(result.fun)


@functools.cache
def medium(seed: int, budgets: tuple[str, ...]) -> tuple[AllocationProblem, float]:
    """A 60-layer program and HiGHS's optimum of it."""
    problem = bench_like(60, 6, seed, budgets)
    return problem, highs_gap_zero(tied_as_rows(problem))


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("budgets", [("avg_weight_bits", "bitops"), ("avg_weight_bits", "bitops", "latency_ms")])
def test_matches_highs_at_gap_zero_on_medium_programs(mechanism, seed, budgets):
    problem, reference = medium(seed, budgets)
    with pytest.MonkeyPatch.context() as patch:
        for (module, name), value in MECHANISMS[mechanism].items():
            patch.setattr(module, name, value)
        result = solve_allocation(problem)
    for group in problem.groups:
        assert len({result.choice[name] for name in group}) == 1
    assert result.objective == pytest.approx(reference, rel=1e-9, abs=1e-12)
    for name, limit in problem.budgets.items():
        assert result.usage[name] <= limit * (1 + TOL)


def tied_as_rows(problem: AllocationProblem) -> AllocationProblem:
    """The same program with each tied group summed into one row (what the solver solves)."""
    index = {name: i for i, name in enumerate(problem.layers)}
    grouped = {name for group in problem.groups for name in group[1:]}
    rows = []
    for name in problem.layers:
        if name in grouped:
            continue
        group = next((g for g in problem.groups if g[0] == name), [name])
        rows.append([index[member] for member in group])
    cost = np.array([problem.cost[r].sum(axis=0) for r in rows])
    resources = {k: np.array([v[r].sum(axis=0) for r in rows]) for k, v in problem.resources.items()}
    return AllocationProblem([f"r{i}" for i in range(len(rows))], problem.options, cost, resources, problem.budgets)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_a_budget_met_exactly_is_feasible_and_one_just_over_is_not(mechanism):
    """5e-8 over budget is over (HiGHS's default row tolerances, 1e-7 and 1e-6, would let it pass)."""
    cost = np.array([[3.0, 1.0, 0.0], [3.0, 1.0, 0.0]])
    size = np.array([[1.0, 2.0, 4.0], [1.0, 2.0, 4.0]])
    with pytest.MonkeyPatch.context() as patch:
        for (module, name), value in MECHANISMS[mechanism].items():
            patch.setattr(module, name, value)
        exact = solve_allocation(
            AllocationProblem(["a", "b"], ["w2", "w4", "w8"], cost, {"bytes": size}, {"bytes": 6.0})
        )
        short = solve_allocation(
            AllocationProblem(["a", "b"], ["w2", "w4", "w8"], cost, {"bytes": size}, {"bytes": 6.0 * (1 - 5e-8)})
        )
    assert exact.objective == pytest.approx(1.0) and exact.usage["bytes"] == 6.0
    assert short.objective == pytest.approx(2.0)


def test_feasibility_program_with_zero_cost_is_solved_without_search():
    """All costs 0 on 300 layers: every row keeps only its smallest option (the others are dominated)."""
    rng = np.random.default_rng(0)
    size = np.outer(rng.integers(1, 100, 300), [2.0, 4.0, 8.0])
    problem = AllocationProblem(
        [f"l{i}" for i in range(300)],
        ["w2", "w4", "w8"],
        np.zeros((300, 3)),
        {"bytes": size},
        {"bytes": size[:, 0].sum()},
    )
    result = solve_allocation(problem)
    assert result.objective == 0.0 and set(result.choice.values()) == {"w2"}


def test_many_identical_rows_are_enumerated_once_per_distinct_partial_sum(monkeypatch):
    """120 layers of 3 kinds: the optimum over option counts, found without HiGHS (equal partial sums merge)."""
    kinds = np.array([[1.0, 0.5, 0.0], [1.25, 0.5, 0.25], [2.0, 1.0, 0.0]])
    kind = np.random.default_rng(0).integers(0, 3, 120)
    size = np.array([2.0, 4.0, 8.0])
    limit = 4.5 * 120 + 1.0
    problem = AllocationProblem(
        [f"l{i}" for i in range(120)],
        ["w2", "w4", "w8"],
        kinds[kind],
        {"bytes": np.tile(size, (120, 1))},
        {"bytes": limit},
    )
    monkeypatch.setattr(knapsack, "_highs", lambda *args: pytest.fail("fell back to HiGHS"))
    result = solve_allocation(problem)
    # Brute force over how many layers of each kind take each option (a kind's layers are interchangeable).
    best = {(0.0, 0.0)}
    for k in range(3):
        n = int((kind == k).sum())
        split = [(a, b, n - a - b) for a in range(n + 1) for b in range(n + 1 - a)]
        best = {
            (c + kinds[k] @ counts, u + size @ counts)
            for c, u in best
            for counts in map(np.array, split)
            if u + size @ counts <= limit
        }
        frontier = sorted(best)
        best, least = set(), np.inf  # keep the Pareto front (lower cost, lower usage)
        for c, u in frontier:
            if u < least:
                best.add((c, u))
                least = u
    assert result.objective == pytest.approx(min(c for c, _ in best), abs=TOL)


def test_time_limit_stops_with_a_runtime_error():
    with pytest.raises(RuntimeError, match="allocation solver stopped: time_limit"):
        solve_allocation(bench_like(200, 6, 0, ("avg_weight_bits", "bitops")), time_limit=1e-9)
