"""Mixed-precision bit allocation as a 0/1 integer program (``scipy.optimize.milp``, HiGHS).

Variables ``x[l, o]`` say that layer ``l`` takes option ``o``. The program minimises
``sum(cost[l, o] * x[l, o])`` subject to:

- exactly one option per layer;
- for each budget ``r``: ``sum(resources[r][l, o] * x[l, o]) <= budgets[r]`` (average weight bits
  is a resource whose per-layer value is ``bits * params_l / total_params``);
- tied groups: every layer of a group takes the same option;
- pins: a layer takes a given option;
- options that a layer cannot take (``cost`` is NaN or inf) are fixed to 0.

An infeasible program raises :class:`AllocationInfeasibleError` naming, for each budget that cannot be
met, the smallest value that can (found by minimising that resource under the other constraints).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix, csr_matrix, vstack

from diffquant.errors import DiffquantError

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


def _equalities(problem: AllocationProblem) -> tuple[csr_matrix, np.ndarray]:
    """One option per layer (tied groups are merged away before solving)."""
    n_l, n_o = len(problem.layers), len(problem.options)
    rows = np.repeat(np.arange(n_l), n_o)
    matrix = coo_matrix((np.ones(n_l * n_o), (rows, np.arange(n_l * n_o))), shape=(n_l, n_l * n_o)).tocsr()
    return matrix, np.ones(n_l)


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
    reduced = AllocationProblem(
        names,
        problem.options,
        np.stack([cost[m].sum(axis=0) for m in members]),
        {
            k: np.stack([np.asarray(v, dtype=float)[m].sum(axis=0) for m in members])
            for k, v in problem.resources.items()
        },
        dict(problem.budgets),
        (),
        pinned,
    )
    return reduced, members


def _bounds(problem: AllocationProblem) -> tuple[np.ndarray, np.ndarray]:
    n_o = len(problem.options)
    cost = np.asarray(problem.cost, dtype=float)
    upper = np.isfinite(cost).astype(float).ravel()
    lower = np.zeros_like(upper)
    index = {name: i for i, name in enumerate(problem.layers)}
    for layer, option in problem.pinned.items():
        k = index[layer] * n_o + list(problem.options).index(option)
        if not upper[k]:
            raise AllocationInfeasibleError(
                f"infeasible allocation: {layer!r} is pinned to option {option!r}, which it (or a layer tied to it) "
                "cannot take",
                {},
            )
        upper[index[layer] * n_o : (index[layer] + 1) * n_o] = 0.0
        upper[k], lower[k] = 1.0, 1.0
    return lower, upper


def _solve(
    objective: np.ndarray, problem: AllocationProblem, budgets: Mapping[str, float], time_limit: float | None
) -> tuple[np.ndarray | None, str]:
    eq, rhs = _equalities(problem)
    constraints = [LinearConstraint(eq, rhs, rhs)]
    if budgets:
        usage = vstack([csr_matrix(np.asarray(problem.resources[r], dtype=float).ravel()) for r in budgets])
        limits = np.array([budgets[r] for r in budgets], dtype=float)
        constraints.append(LinearConstraint(usage, -np.inf, limits + _TOL * np.maximum(1.0, np.abs(limits))))
    lower, upper = _bounds(problem)
    # HiGHS's presolve costs seconds on multiple-choice programs of thousands of layers and
    # gains nothing here; the relative MIP gap stays at HiGHS's default of 1e-4.
    options: dict[str, float | bool] = {"presolve": False}
    if time_limit:
        options["time_limit"] = time_limit
    result = milp(
        objective,
        constraints=constraints,
        integrality=np.ones_like(objective),
        bounds=Bounds(lower, upper),
        options=options,
    )
    if result.status == 0 and result.x is not None:
        return np.round(result.x).astype(int), "optimal"
    return None, {1: "time_limit", 2: "infeasible", 3: "unbounded"}.get(result.status, "error")


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
    objective = np.where(np.isfinite(cost), cost, 0.0).ravel()
    x, status = _solve(objective, reduced, reduced.budgets, time_limit)
    if x is None:
        if status == "infeasible":
            raise _infeasible(reduced, time_limit)
        raise RuntimeError(f"allocation solver stopped: {status}")
    n_o = len(problem.options)
    picks = x.reshape(len(reduced.layers), n_o).argmax(axis=1)
    full = np.zeros((len(problem.layers), n_o))
    for member, k in zip(members, picks, strict=True):
        full[member, k] = 1.0
    x = full.ravel()
    full_cost = np.asarray(problem.cost, dtype=float)
    objective = np.where(np.isfinite(full_cost), full_cost, 0.0).ravel()
    choice = {layer: problem.options[k] for layer, k in zip(problem.layers, full.argmax(axis=1), strict=True)}
    usage = {name: float(np.asarray(res, dtype=float).ravel() @ x) for name, res in problem.resources.items()}
    return Allocation(choice, float(objective @ x), usage, status)


def _infeasible(problem: AllocationProblem, time_limit: float | None) -> AllocationInfeasibleError:
    minimal: dict[str, float] = {}
    for name, limit in problem.budgets.items():
        others = {k: v for k, v in problem.budgets.items() if k != name}
        usage = np.asarray(problem.resources[name], dtype=float).ravel()
        x, _ = _solve(usage, problem, others, time_limit)
        if x is not None and usage @ x > limit * (1 + _TOL) + _TOL:
            minimal[name] = float(usage @ x)
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
