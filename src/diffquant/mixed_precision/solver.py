"""Mixed-precision bit allocation as a 0/1 integer program, solved exactly.

Variables ``x[l, o]`` say that layer ``l`` takes option ``o``. The program minimises
``sum(cost[l, o] * x[l, o])`` subject to:

- exactly one option per layer;
- for each budget ``r``: ``sum(resources[r][l, o] * x[l, o]) <= budgets[r]`` (average weight bits
  is a resource whose per-layer value is ``bits * params_l / total_params``), met to a relative
  slack of ``_TOL``;
- tied groups: every layer of a group takes the same option;
- pins: a layer takes a given option;
- options that a layer cannot take (``cost`` is NaN or inf) are fixed to 0.

Tied layers are merged into one row and pins become the only option of their row; the remaining
multiple-choice knapsack is solved by :mod:`diffquant.mixed_precision.knapsack` (LP duals from HiGHS,
reduced-cost fixing, bounded enumeration of the few rows left; HiGHS's branch and bound at relative
gap 0 as the fallback).

An infeasible program raises :class:`AllocationInfeasibleError` naming, for each budget that cannot be
met, the smallest value that can (found by minimising that resource under the other constraints).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from diffquant.errors import DiffquantError
from diffquant.mixed_precision.knapsack import ChoiceProgram, SolverStoppedError, solve_choice

_TOL = 1e-9


class AllocationInfeasibleError(DiffquantError):
    """No assignment meets every budget; the message names the smallest feasible budgets."""

    def __init__(self, message: str, minimal: Mapping[str, float]) -> None:
        """Keep the smallest feasible value of each violated budget in ``minimal``."""
        super().__init__(message)
        self.minimal = dict(minimal)


@dataclass
class AllocationProblem:
    """A layer x option choice problem.

    Attributes:
        layers: Layer names (rows).
        options: Option names (columns).
        cost: (layers, options) objective; NaN or inf marks options a layer cannot take.
        resources: Resource name -> (layers, options) usage.
        budgets: Resource name -> upper bound on total usage (resources without a budget are
            only reported).
        groups: Lists of layer names that must take the same option.
        pinned: Layer name -> option name it must take.
    """

    layers: Sequence[str]
    options: Sequence[str]
    cost: np.ndarray
    resources: dict[str, np.ndarray] = field(default_factory=dict)
    budgets: dict[str, float] = field(default_factory=dict)
    groups: Sequence[Sequence[str]] = ()
    pinned: Mapping[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        """Check shapes and names.

        Raises:
            ValueError: On inconsistent input.
        """
        shape = (len(self.layers), len(self.options))
        if np.shape(self.cost) != shape:
            raise ValueError(f"cost has shape {np.shape(self.cost)}, expected {shape}")
        for name, usage in self.resources.items():
            if np.shape(usage) != shape:
                raise ValueError(f"resource {name!r} has shape {np.shape(usage)}, expected {shape}")
        unknown = set(self.budgets) - set(self.resources)
        if unknown:
            raise ValueError(f"budget on unknown resource {sorted(unknown)[0]!r}")
        names = set(self.layers)
        for group in self.groups:
            for layer in group:
                if layer not in names:
                    raise ValueError(f"tied group names unknown layer {layer!r}")
        for layer, option in self.pinned.items():
            if layer not in names:
                raise ValueError(f"pin names unknown layer {layer!r}")
            if option not in self.options:
                raise ValueError(f"layer {layer!r} pinned to unknown option {option!r}")
            row, col = list(self.layers).index(layer), list(self.options).index(option)
            if not np.isfinite(self.cost[row, col]):
                raise ValueError(f"layer {layer!r} is pinned to option {option!r}, which it cannot take")


@dataclass(frozen=True)
class Allocation:
    """The solver's answer.

    ``removed`` (option -> why, for the layers that lost it) lists the candidates the device class
    cannot run; ``notes`` (note -> layers) says how the class runs chosen options that are not
    integer kernels there (both empty without a device class).
    """

    choice: dict[str, str]
    objective: float
    usage: dict[str, float]
    status: str
    removed: dict[str, str] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)
    unavailable: list[dict[str, str]] = field(default_factory=list)
    """(layer, option) pairs taken out before solving, each with its reason (e.g. missing latency)."""


def _merge_tied(problem: AllocationProblem) -> tuple[AllocationProblem, list[list[int]]]:
    """Merge each set of tied layers into one row (exact: they must take the same option).

    Costs and resources of a merged row are the sums over its layers (an option one member
    cannot take stays NaN); overlapping groups are united.

    Returns:
        The reduced problem (no groups) and, per reduced row, the original layer indices.

    Raises:
        AllocationInfeasibleError: If layers of one group are pinned to different options.
    """
    index = {name: i for i, name in enumerate(problem.layers)}
    parent = list(range(len(problem.layers)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for group in problem.groups:
        root = find(index[group[0]])
        for other in group[1:]:
            parent[find(index[other])] = root
    components: dict[int, list[int]] = {}
    for i in range(len(problem.layers)):
        components.setdefault(find(i), []).append(i)
    members = list(components.values())
    if len(members) == len(problem.layers):
        return problem, [[i] for i in range(len(problem.layers))]
    cost = np.asarray(problem.cost, dtype=float)
    names = [problem.layers[m[0]] for m in members]
    pinned: dict[str, str] = {}
    for name, member in zip(names, members, strict=True):
        pins = {problem.pinned[problem.layers[i]] for i in member if problem.layers[i] in problem.pinned}
        if len(pins) > 1:
            raise AllocationInfeasibleError(
                f"infeasible allocation: tied layers around {name!r} are pinned to different options "
                f"({', '.join(sorted(pins))})",
                {},
            )
        if pins:
            pinned[name] = pins.pop()
    order = np.concatenate(members)
    starts = np.cumsum([0] + [len(m) for m in members[:-1]])

    def merged(matrix: np.ndarray) -> np.ndarray:
        return np.add.reduceat(np.asarray(matrix, dtype=float)[order], starts, axis=0)

    reduced = AllocationProblem(
        names,
        problem.options,
        merged(cost),
        {k: merged(v) for k, v in problem.resources.items()},
        dict(problem.budgets),
        (),
        pinned,
    )
    return reduced, members


def _allowed(problem: AllocationProblem) -> np.ndarray:
    """Options each row may take: finite cost, and only its pinned option when it is pinned."""
    allowed = np.isfinite(np.asarray(problem.cost, dtype=float))
    index = {name: i for i, name in enumerate(problem.layers)}
    for layer, option in problem.pinned.items():
        row, col = index[layer], list(problem.options).index(option)
        if not allowed[row, col]:
            raise AllocationInfeasibleError(
                f"infeasible allocation: {layer!r} is pinned to option {option!r}, which it (or a layer tied to it) "
                "cannot take",
                {},
            )
        allowed[row] = False
        allowed[row, col] = True
    return allowed


def _solve(
    objective: np.ndarray, problem: AllocationProblem, budgets: Mapping[str, float], time_limit: float | None
) -> tuple[np.ndarray | None, str]:
    """Minimise ``objective`` (rows x options) under ``budgets``: the option per row, or None and why."""
    limits = np.array([budgets[r] for r in budgets], dtype=float)
    n_l, n_o = len(problem.layers), len(problem.options)
    usage = np.array([np.asarray(problem.resources[r], dtype=float) for r in budgets]).reshape(len(limits), n_l, n_o)
    program = ChoiceProgram(objective, _allowed(problem), usage, limits + _TOL * np.maximum(1.0, np.abs(limits)))
    try:
        picks = solve_choice(program, time_limit)
    except SolverStoppedError as stopped:
        return None, stopped.status
    return (None, "infeasible") if picks is None else (picks, "optimal")


def solve_allocation(problem: AllocationProblem, time_limit: float | None = None) -> Allocation:
    """Solve the allocation program exactly.

    Args:
        problem: The problem.
        time_limit: Optional solver time limit in seconds.

    Returns:
        The chosen option per layer, objective value and resource usage.

    Raises:
        ValueError: On inconsistent input.
        AllocationInfeasibleError: When no assignment meets the budgets.
        RuntimeError: When the solver stops without a solution (time limit, error).
    """
    problem.validate()
    reduced, members = _merge_tied(problem)
    cost = np.asarray(reduced.cost, dtype=float)
    picks, status = _solve(np.where(np.isfinite(cost), cost, 0.0), reduced, reduced.budgets, time_limit)
    if picks is None:
        if status == "infeasible":
            raise _infeasible(reduced, time_limit)
        raise RuntimeError(f"allocation solver stopped: {status}")
    chosen = np.empty(len(problem.layers), dtype=int)
    for member, k in zip(members, picks, strict=True):
        chosen[member] = k
    rows = np.arange(len(problem.layers))
    choice = {layer: problem.options[k] for layer, k in zip(problem.layers, chosen, strict=True)}
    usage = {name: float(np.asarray(res, dtype=float)[rows, chosen].sum()) for name, res in problem.resources.items()}
    return Allocation(choice, float(np.asarray(problem.cost, dtype=float)[rows, chosen].sum()), usage, status)


def _infeasible(problem: AllocationProblem, time_limit: float | None) -> AllocationInfeasibleError:
    minimal: dict[str, float] = {}
    for name, limit in problem.budgets.items():
        others = {k: v for k, v in problem.budgets.items() if k != name}
        usage = np.asarray(problem.resources[name], dtype=float)
        picks, _ = _solve(usage, problem, others, time_limit)
        if picks is not None:
            smallest = float(usage[np.arange(len(picks)), picks].sum())
            if smallest > limit * (1 + _TOL) + _TOL:
                minimal[name] = smallest
    if minimal:
        parts = [
            f"{name} <= {problem.budgets[name]:g} cannot be met; the smallest feasible value is {value:.6g}"
            for name, value in minimal.items()
        ]
        return AllocationInfeasibleError("infeasible budget: " + "; ".join(parts), minimal)
    if len(problem.budgets) > 1:
        return AllocationInfeasibleError(
            "infeasible budget: each budget can be met alone but not all together; relax one of "
            + ", ".join(problem.budgets),
            minimal,
        )
    return AllocationInfeasibleError("infeasible allocation: pins, tied groups and allowed options conflict", minimal)
