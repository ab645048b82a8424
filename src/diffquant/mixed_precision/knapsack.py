"""Exact multiple-choice knapsack with budget rows: LP duals, reduced-cost fixing, bounded enumeration.

The program: each row ``g`` (a layer, or tied layers merged into one row) takes exactly one option
``o`` it is allowed; for each budget ``r``, ``sum_g usage[r, g, o_g] <= limits[r]``; minimise
``sum_g cost[g, o_g]``. This is the allocation program once tied groups are merged and pins are
turned into allowed options.

Method (exact, for any number of budget rows):

1. Solve the LP relaxation (HiGHS dual simplex through ``scipy.optimize.linprog``). Its budget
   duals ``lam >= 0`` give, in numpy, the Lagrangian bound
   ``LB = sum_g min_o (cost + lam . usage)[g, o] - lam . limits`` and reduced costs
   ``d[g, o] = (cost + lam . usage)[g, o] - min_o (cost + lam . usage)[g, o] >= 0``. The bound is valid
   for any ``lam >= 0``, so it does not depend on the LP's accuracy.
2. Every assignment within the budgets costs at least ``LB + sum_g d[g, o_g]``, so one that costs at
   most ``LB + delta`` uses only options with ``d <= delta`` (the core). Rows with a single such
   option are fixed; options another option of the same row dominates (no more cost, no more of any
   budget) are dropped.
3. The core is enumerated row by row, all partial assignments at once (numpy), keeping only those
   whose lower bound is at most ``LB + delta``. The bound of a partial assignment is the Lagrangian
   bound of the rows still open, ``max_mu [sum_open min_o (cost + mu . usage) - mu . (budget left)]``,
   over multipliers ``mu`` at the vertices of that piecewise-linear function (intersections of the
   rows' break lines: the LP bound of the open rows when every vertex is used), a subset of which is
   evaluated per row: those that give the best bound on a sample of the partial assignments. Any
   ``mu >= 0`` gives a valid bound, so the subset only costs pruning, never correctness.
4. If an assignment survives, the cheapest survivor is optimal: every other assignment costs more
   than ``LB + delta``. Otherwise ``delta`` grows by half and step 2 repeats. When the enumeration
   would hold more than ``_MAX_STATES`` partial assignments, or the core is the whole program and
   nothing costs less than ``LB + delta``, HiGHS's branch and bound (relative gap 0) solves the core.

Tolerances: a budget is met when usage <= ``limits`` (the caller adds its slack). The proof keeps
``_PROOF_SLACK * max(1, |LB|)`` in hand for float rounding in the bound and reduced costs, so the
objective is optimal up to float summation error (about 1e-15 relative). The HiGHS fallback checks
rows to ``_FEASIBILITY`` relative to each budget's scale and stops at an absolute gap of ``1e-6`` of
``delta`` (its objective is divided by ``delta``).
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, linprog, milp
from scipy.sparse import coo_matrix

_FIRST_CORE = 32
"""Positive reduced costs in the first core (it then grows by half until an assignment survives)."""
_GROWTH = 1.5
_MAX_STATES = 200_000
"""Partial assignments held at once before the core goes to HiGHS."""
_SAMPLE = 16
"""Partial assignments per row on which every vertex multiplier is tried."""
_MAX_VERTICES = 50_000
"""Vertex multipliers kept when there are more (a seeded sample; any subset gives a valid bound)."""
_KEEP_VERTICES = 2048
"""Vertex multipliers used per enumeration: those with the best bound at the core's start."""
_CHUNK = 16_384
_FEASIBILITY = 1e-10
"""HiGHS's row feasibility tolerance, relative to each budget row's scale (its default is 1e-6 absolute)."""
_PROOF_SLACK = 1e-9


class SolverStoppedError(RuntimeError):
    """The solve stopped without an answer (time limit or numerical trouble); ``status`` says which."""

    def __init__(self, status: str) -> None:
        """Keep the status (``time_limit`` or ``error``)."""
        super().__init__(f"allocation solver stopped: {status}")
        self.status = status


class _TooLargeError(Exception):
    """The enumeration would hold more than ``_MAX_STATES`` partial assignments."""


@dataclass(frozen=True)
class ChoiceProgram:
    """One option per row under budget rows.

    Attributes:
        cost: (rows, options) objective; entries where ``allowed`` is False are ignored.
        allowed: (rows, options) options a row may take.
        usage: (budgets, rows, options) resource use.
        limits: (budgets,) upper bounds, slack included.
    """

    cost: np.ndarray
    allowed: np.ndarray
    usage: np.ndarray
    limits: np.ndarray


@dataclass
class _Scaled:
    """The program with each budget row divided by its scale, and its Lagrangian data."""

    cost: np.ndarray
    allowed: np.ndarray
    usage: np.ndarray
    limits: np.ndarray
    lam: np.ndarray
    bound: float
    reduced: np.ndarray


@dataclass
class _Core:
    """Open rows (in enumeration order) with their kept options; the other rows fixed."""

    picks: np.ndarray
    rows: list[int]
    options: list[np.ndarray]
    cost: list[np.ndarray]
    usage: list[np.ndarray]
    fixed_cost: float
    fixed_usage: np.ndarray


def solve_choice(program: ChoiceProgram, time_limit: float | None = None) -> np.ndarray | None:
    """The exact optimum: the option index per row, or None when no assignment meets the budgets.

    Args:
        program: The program.
        time_limit: Seconds for the whole solve.

    Returns:
        The chosen option per row (None when infeasible).

    Raises:
        SolverStoppedError: When the time limit passes or HiGHS fails.
    """
    deadline = None if time_limit is None else time.monotonic() + time_limit
    if not program.allowed.any(axis=1).all():
        return None
    scaled = _lagrangian(program, deadline)
    if scaled is None:
        return None
    slack = _PROOF_SLACK * max(1.0, abs(scaled.bound))
    positive = np.sort(scaled.reduced[np.isfinite(scaled.reduced) & (scaled.reduced > slack)])
    top = float(positive[-1]) if positive.size else 0.0
    delta = float(positive[min(_FIRST_CORE, positive.size) - 1]) if positive.size else 0.0
    best = _Best(np.inf, None)
    while True:
        whole = delta >= top
        core = _core(scaled, delta + slack)
        threshold = scaled.bound + delta + 0.5 * slack
        try:
            _enumerate(core, scaled, threshold, best, deadline)
            if best.value > threshold and whole:
                _highs(core, scaled, max(delta, slack), best, deadline)
        except _TooLargeError:
            _highs(core, scaled, max(delta, slack), best, deadline)
        if whole or best.value <= threshold:
            return best.picks
        delta = min(delta * _GROWTH, best.value - scaled.bound)


def _lagrangian(program: ChoiceProgram, deadline: float | None) -> _Scaled | None:
    """Scale the budget rows, solve the LP relaxation, and derive the bound and reduced costs."""
    peak = np.abs(np.where(program.allowed[None], program.usage, 0.0)).max(axis=(1, 2), initial=0.0)
    scale = np.where(np.abs(program.limits) > 0, np.abs(program.limits), peak)
    scale = np.where(scale > 0, scale, 1.0)
    usage = program.usage / scale[:, None, None]
    limits = program.limits / scale
    cost = np.where(program.allowed, program.cost, 0.0)
    lam = _lp_duals(cost, program.allowed, usage, limits, deadline)
    if lam is None:
        return None
    priced = np.where(program.allowed, cost + np.tensordot(lam, usage, axes=1), np.inf)
    floor = priced.min(axis=1)
    bound = float(floor.sum() - lam @ limits)
    return _Scaled(cost, program.allowed, usage, limits, lam, bound, priced - floor[:, None])


def _remaining(deadline: float | None) -> dict[str, float]:
    if deadline is None:
        return {}
    left = deadline - time.monotonic()
    if left <= 0:
        raise SolverStoppedError("time_limit")
    return {"time_limit": left}


def _lp_duals(
    cost: np.ndarray, allowed: np.ndarray, usage: np.ndarray, limits: np.ndarray, deadline: float | None
) -> np.ndarray | None:
    """Budget duals (>= 0) of the LP relaxation; None when the LP (so the program) is infeasible."""
    if len(limits) == 0:
        return np.zeros(0)
    rows, cols = np.nonzero(allowed)
    one_each = coo_matrix((np.ones(rows.size), (rows, np.arange(rows.size))), shape=(allowed.shape[0], rows.size))
    # HiGHS's presolve costs more than it saves on these programs (one equality row per layer).
    result = linprog(
        cost[rows, cols],
        A_ub=usage[:, rows, cols],
        b_ub=limits,
        A_eq=one_each.tocsr(),
        b_eq=np.ones(allowed.shape[0]),
        bounds=(0.0, 1.0),
        method="highs-ds",
        options={"presolve": False, **_remaining(deadline)},
    )
    if result.status == 2:
        return None
    if result.status != 0:
        raise SolverStoppedError("time_limit" if result.status == 1 else "error")
    return np.maximum(-np.asarray(result.ineqlin.marginals, dtype=float), 0.0)


def _undominated(cost: np.ndarray, usage: np.ndarray) -> np.ndarray:
    """Mask of a row's options that no other option dominates (ties keep the first)."""
    no_worse = (cost[:, None] <= cost[None, :]) & (usage[:, :, None] <= usage[:, None, :]).all(axis=0)
    better = (cost[:, None] < cost[None, :]) | (usage[:, :, None] < usage[:, None, :]).any(axis=0)
    earlier = np.tri(len(cost), k=-1, dtype=bool).T
    return ~(no_worse & (better | earlier)).any(axis=0)


def _core(scaled: _Scaled, limit: float) -> _Core:
    """Rows whose options with reduced cost <= limit are more than one (others fixed at their best)."""
    keep = scaled.reduced <= limit
    picks = np.argmin(scaled.reduced, axis=1)
    rows, options = [], []
    for g in np.flatnonzero(keep.sum(axis=1) > 1):
        kept = np.flatnonzero(keep[g])
        kept = kept[_undominated(scaled.cost[g, kept], scaled.usage[:, g, kept])]
        if kept.size > 1:
            rows.append(int(g))
            options.append(kept)
        else:
            picks[g] = kept[0]
    spread = [float(scaled.lam @ np.ptp(scaled.usage[:, g, o], axis=1)) for g, o in zip(rows, options, strict=True)]
    order = np.argsort(spread, kind="stable")[::-1]
    rows = [rows[i] for i in order]
    options = [options[i] for i in order]
    fixed = np.ones(len(picks), dtype=bool)
    fixed[rows] = False
    every = np.arange(len(picks))
    return _Core(
        picks,
        rows,
        options,
        [scaled.cost[g, o] for g, o in zip(rows, options, strict=True)],
        [scaled.usage[:, g, o] for g, o in zip(rows, options, strict=True)],
        float(scaled.cost[every[fixed], picks[fixed]].sum()),
        scaled.usage[:, every[fixed], picks[fixed]].sum(axis=1),
    )


def _vertices(core: _Core, lam: np.ndarray, left: np.ndarray) -> np.ndarray:
    """Multipliers (>= 0) at the vertices of the open rows' Lagrangian function, with ``lam`` and 0.

    Only budgets with a positive dual vary (the others stay at 0). A vertex is where as many break
    lines (two options of one row cost the same at ``mu``) or axes (``mu_r = 0``) meet as there are
    varying budgets. Of these, the ``_KEEP_VERTICES`` that bound the open rows best with the budget
    ``left`` are returned (first ``0`` and ``lam``).
    """
    active = np.flatnonzero(lam > 0)
    m = active.size
    candidates = [np.zeros(len(lam)), lam]
    if m == 0:
        return np.array(candidates)
    normals, offsets = [np.eye(m)], [np.zeros(m)]
    for cost, usage in zip(core.cost, core.usage, strict=True):
        i, j = np.triu_indices(len(cost), 1)
        normals.append((usage[active][:, i] - usage[active][:, j]).T)
        offsets.append(cost[j] - cost[i])
    normal, offset = np.concatenate(normals), np.concatenate(offsets)
    count = math.comb(len(offset), m)
    if count <= _MAX_VERTICES:
        chosen = np.array(list(itertools.combinations(range(len(offset)), m)), dtype=int).reshape(-1, m)
    else:
        chosen = np.random.default_rng(0).integers(0, len(offset), size=(_MAX_VERTICES, m))
    system = normal[chosen]
    solvable = np.abs(np.linalg.det(system)) > 1e-300
    mu = np.linalg.solve(system[solvable], offset[chosen[solvable]][..., None])[..., 0]
    mu = mu[(mu >= 0).all(axis=1) & np.isfinite(mu).all(axis=1)]
    full = np.zeros((len(mu), len(lam)))
    full[:, active] = mu
    value = -full @ left
    for cost, usage in zip(core.cost, core.usage, strict=True):
        value += (cost[None, :] + full @ usage).min(axis=1)
    keep = np.argsort(-value, kind="stable")[: _KEEP_VERTICES - len(candidates)]
    return np.concatenate([np.array(candidates), full[keep]])


@dataclass
class _Completions:
    """For each open row ``k`` and multiplier ``v``: rows ``k..`` each at their cheapest option under ``v``.

    ``value[k, v]`` is the Lagrangian value of those rows, ``cost``/``usage`` what those options cost and
    use (a feasible completion when the budget left covers ``usage``), ``least[k]`` the least usage of
    rows ``k..`` per budget, ``choice[k, v]`` the option index row ``k`` takes.
    """

    mu: np.ndarray
    value: np.ndarray
    cost: np.ndarray
    usage: np.ndarray
    least: np.ndarray
    choice: np.ndarray


def _completions(core: _Core, mu: np.ndarray) -> _Completions:
    n, n_b, n_v = len(core.rows), len(core.fixed_usage), len(mu)
    value, cost = np.zeros((n + 1, n_v)), np.zeros((n + 1, n_v))
    usage, least = np.zeros((n + 1, n_b, n_v)), np.zeros((n + 1, n_b))
    choice = np.zeros((n, n_v), dtype=int)
    for k in range(n - 1, -1, -1):
        priced = core.cost[k][None, :] + mu @ core.usage[k]
        choice[k] = priced.argmin(axis=1)
        value[k] = value[k + 1] + priced[np.arange(n_v), choice[k]]
        cost[k] = cost[k + 1] + core.cost[k][choice[k]]
        usage[k] = usage[k + 1] + core.usage[k][:, choice[k]]
        least[k] = least[k + 1] + core.usage[k].min(axis=1)
    return _Completions(mu, value, cost, usage, least, choice)


@dataclass
class _Best:
    """The cheapest assignment found so far (value inf and picks None before the first)."""

    value: float
    picks: np.ndarray | None


def _enumerate(core: _Core, scaled: _Scaled, threshold: float, best: _Best, deadline: float | None) -> None:
    """Improve ``best`` to the cheapest core assignment if one costs at most ``threshold``.

    Partial assignments (one per surviving combination of the first ``k`` open rows) are kept while
    their bound is at most ``min(threshold, best.value)``; a sample of them is completed at every
    vertex multiplier to find cheaper assignments early.

    Raises:
        _TooLargeError: When more than ``_MAX_STATES`` partial assignments survive a row.
    """
    limits = scaled.limits
    if not core.rows:
        if (core.fixed_usage <= limits).all() and core.fixed_cost < best.value:
            best.value, best.picks = core.fixed_cost, core.picks
        return
    done = _completions(core, _vertices(core, scaled.lam, limits - core.fixed_usage))
    useful = np.array([0, 1])
    cost, usage = np.array([core.fixed_cost]), core.fixed_usage[:, None]
    trail: list[np.ndarray] = []
    for k in range(len(core.rows)):
        _remaining(deadline)
        cost = (cost[:, None] + core.cost[k][None, :]).ravel()
        usage = (usage[:, :, None] + core.usage[k][:, None, :]).reshape(len(limits), -1)
        alive = np.flatnonzero((usage + done.least[k + 1][:, None] <= limits[:, None]).all(axis=0))
        if alive.size > _MAX_STATES:
            raise _TooLargeError
        trail.append(alive)
        sample = np.unique(np.linspace(0, alive.size - 1, min(_SAMPLE, alive.size)).astype(int))
        useful = np.union1d(
            useful, _try_sample(core, done, k, cost[alive], usage[:, alive], sample, trail, limits, best)
        )
        bound = _bound(done, k, cost[alive], limits[:, None] - usage[:, alive], useful)
        trail[-1] = alive = alive[bound <= min(threshold, best.value)]
        if alive.size == 0:
            return
        cost, usage = cost[alive], usage[:, alive]
    state = int(np.argmin(cost))
    if cost[state] < best.value:
        best.value, best.picks = float(cost[state]), _backtrack(core, trail, state)


def _bound(done: _Completions, k: int, cost: np.ndarray, left: np.ndarray, useful: np.ndarray) -> np.ndarray:
    """Lower bound of each partial assignment (rows up to ``k``): its cost + the best Lagrangian of the rest."""
    parts = [
        cost[s : s + _CHUNK] + (done.value[k + 1][None, useful] - left[:, s : s + _CHUNK].T @ done.mu[useful].T).max(1)
        for s in range(0, len(cost), _CHUNK)
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


def _try_sample(
    core: _Core,
    done: _Completions,
    k: int,
    cost: np.ndarray,
    usage: np.ndarray,
    sample: np.ndarray,
    trail: list[np.ndarray],
    limits: np.ndarray,
    best: _Best,
) -> np.ndarray:
    """Complete sampled partial assignments at every multiplier; keep the cheapest feasible one in ``best``.

    Returns:
        The multipliers that give the sampled assignments their best bound.
    """
    left = limits[:, None] - usage[:, sample]
    top = (done.value[k + 1][None, :] - left.T @ done.mu.T).argmax(axis=1)
    total = cost[sample][:, None] + done.cost[k + 1][None, :]
    fits = (done.usage[k + 1][None, :, :] <= left.T[:, :, None]).all(axis=1)
    total = np.where(fits, total, np.inf)
    if total.size and total.min() < best.value:
        row, vertex = np.unravel_index(int(total.argmin()), total.shape)
        picks = _backtrack(core, trail, int(sample[row]))
        for i in range(k + 1, len(core.rows)):
            picks[core.rows[i]] = core.options[i][done.choice[i, vertex]]
        best.value, best.picks = float(total.min()), picks
    return top


def _backtrack(core: _Core, trail: list[np.ndarray], state: int) -> np.ndarray:
    """The assignment of the partial state ``state`` at the last level of ``trail`` (other open rows at 0)."""
    picks = core.picks.copy()
    for k in range(len(trail) - 1, -1, -1):
        parent, option = divmod(int(trail[k][state]), len(core.cost[k]))
        picks[core.rows[k]] = core.options[k][option]
        state = parent
    return picks


def _highs(core: _Core, scaled: _Scaled, unit: float, best: _Best, deadline: float | None) -> None:
    """Solve the core with HiGHS's branch and bound (relative gap 0); keep its optimum in ``best`` if cheaper.

    The objective is divided by ``unit`` so that HiGHS's absolute gap (1e-6) is ``1e-6 * unit``.
    """
    left = scaled.limits - core.fixed_usage
    if not core.rows:
        if (left >= 0).all() and core.fixed_cost < best.value:
            best.value, best.picks = core.fixed_cost, core.picks
        return
    row_of = np.concatenate([np.full(len(o), i) for i, o in enumerate(core.options)])
    cost = np.concatenate(core.cost)
    usage = np.concatenate(core.usage, axis=1)
    one_each = coo_matrix((np.ones(row_of.size), (row_of, np.arange(row_of.size))), shape=(len(core.rows), row_of.size))
    constraints = [LinearConstraint(one_each.tocsr(), 1.0, 1.0)]
    if len(left):
        constraints.append(LinearConstraint(usage, -np.inf, left))
    # scipy passes options it does not list to HiGHS verbatim (with a RuntimeWarning): the row and
    # integrality tolerance must be tighter than HiGHS's default 1e-6 for the answer to be exact.
    options = {"presolve": False, "mip_rel_gap": 0.0, "mip_feasibility_tolerance": _FEASIBILITY}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unrecognized options", category=RuntimeWarning)
        result = milp(
            (cost - cost.min()) / unit,
            constraints=constraints,
            integrality=np.ones(row_of.size),
            bounds=Bounds(0.0, 1.0),
            options={**options, **_remaining(deadline)},
        )
    if result.status == 2:
        return
    if result.status != 0 or result.x is None:
        raise SolverStoppedError("time_limit" if result.status == 1 else "error")
    picks = core.picks.copy()
    chosen = np.flatnonzero(np.round(result.x) > 0.5)
    picks[np.array(core.rows)[row_of[chosen]]] = np.concatenate(core.options)[chosen]
    value = float(scaled.cost[np.arange(len(picks)), picks].sum())
    if value < best.value:
        best.value, best.picks = value, picks
