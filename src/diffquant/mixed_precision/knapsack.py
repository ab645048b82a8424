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
3. ``core_search.enumerate_core`` finds the cheapest core assignment costing at most
   ``LB + delta``, if there is one: it is the optimum, since every other assignment costs more.
4. Otherwise ``delta`` grows by half (from 1/1024 of the widest possible cost range if it was 0)
   and step 2 repeats; once ``LB + delta`` exceeds every assignment's cost the search is exhaustive and
   finding nothing means no assignment meets the budgets (the LP can be feasible when the program
   is not). When the enumeration would hold too many partial assignments, HiGHS's branch and bound
   (relative gap 0) solves that core instead.

Tolerances: a budget is met when usage <= ``limits`` (the caller adds its slack). The proof keeps
``_PROOF_SLACK * max(1, |LB|)`` in hand for float rounding in the bound and reduced costs, so the
objective is optimal up to float summation error. Budget rows are divided by a power of two near
their limit (exact, so equal sums stay equal). The HiGHS fallback's answers are checked against the
budgets exactly (over-budget ones are cut off) and it stops at an absolute gap of 1e-6 of ``delta``
(its objective is divided by ``delta``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, linprog, milp
from scipy.sparse import coo_matrix

from diffquant.mixed_precision.core_search import Best, Core, TooLargeError, enumerate_core

_FIRST_CORE = 32
"""Positive reduced costs in the first core (it then grows by half until an assignment survives)."""
_GROWTH = 1.5
_MAX_CUTS = 1000
"""Over-budget answers of HiGHS cut off before the fallback gives up."""
_PROOF_SLACK = 1e-9


class SolverStoppedError(RuntimeError):
    """The solve stopped without an answer (time limit or numerical trouble); ``status`` says which."""

    def __init__(self, status: str) -> None:
        """Keep the status (``time_limit`` or ``error``)."""
        super().__init__(f"allocation solver stopped: {status}")
        self.status = status


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
    # No assignment costs more than every row at its dearest option: a threshold there is exhaustive.
    span = max(float(np.where(program.allowed, scaled.cost, -np.inf).max(axis=1).sum()) - scaled.bound, slack)
    delta = float(positive[min(_FIRST_CORE, positive.size) - 1]) if positive.size else 0.0
    best = Best(np.inf, None)
    while True:
        core = _core(scaled, delta + slack)
        threshold = scaled.bound + delta + 0.5 * slack
        try:
            enumerate_core(core, scaled.lam, scaled.limits, threshold, best, deadline)
        except TimeoutError:
            raise SolverStoppedError("time_limit") from None
        except TooLargeError:
            _highs(core, scaled, max(delta, slack), best, deadline)
            if delta >= top:  # HiGHS solved the whole program
                return best.picks
        if best.value <= threshold or delta >= span:
            return best.picks
        delta = min(delta * _GROWTH if delta > 0 else span / 1024, best.value - scaled.bound)


def _lagrangian(program: ChoiceProgram, deadline: float | None) -> _Scaled | None:
    """Scale the budget rows, solve the LP relaxation, and derive the bound and reduced costs."""
    peak = np.abs(np.where(program.allowed[None], program.usage, 0.0)).max(axis=(1, 2), initial=0.0)
    scale = np.where(np.abs(program.limits) > 0, np.abs(program.limits), peak)
    # A power of two near each budget: dividing by it is exact, so equal sums stay equal.
    scale = np.exp2(np.round(np.log2(np.where(scale > 0, scale, 1.0))))
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


def _core(scaled: _Scaled, limit: float) -> Core:
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
    return Core(
        picks,
        rows,
        options,
        [scaled.cost[g, o] for g, o in zip(rows, options, strict=True)],
        [scaled.usage[:, g, o] for g, o in zip(rows, options, strict=True)],
        float(scaled.cost[every[fixed], picks[fixed]].sum()),
        scaled.usage[:, every[fixed], picks[fixed]].sum(axis=1),
    )


def _highs(core: Core, scaled: _Scaled, unit: float, best: Best, deadline: float | None) -> None:
    """Solve the core with HiGHS's branch and bound (relative gap 0); keep its optimum in ``best`` if cheaper.

    HiGHS accepts rows up to 1e-6 over their bound (tightening that tolerance made it return
    suboptimal answers as optimal), so an answer over a budget is cut off (that one assignment is
    excluded) and the core solved again. The objective is divided by ``unit`` so that HiGHS's
    absolute gap (1e-6) is ``1e-6 * unit``.
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
    for _ in range(_MAX_CUTS):
        result = milp(
            (cost - cost.min()) / unit,
            constraints=constraints,
            integrality=np.ones(row_of.size),
            bounds=Bounds(0.0, 1.0),
            options={"presolve": False, "mip_rel_gap": 0.0, **_remaining(deadline)},
        )
        if result.status == 2:
            return
        if result.status != 0 or result.x is None:
            raise SolverStoppedError("time_limit" if result.status == 1 else "error")
        chosen = np.round(result.x) > 0.5
        if (usage @ chosen <= left).all():
            break
        constraints.append(LinearConstraint(chosen.astype(float), -np.inf, len(core.rows) - 1))
    else:
        raise SolverStoppedError("error")
    picks = core.picks.copy()
    picks[np.array(core.rows)[row_of[chosen]]] = np.concatenate(core.options)[chosen]
    value = float(scaled.cost[np.arange(len(picks)), picks].sum())
    if value < best.value:
        best.value, best.picks = value, picks
