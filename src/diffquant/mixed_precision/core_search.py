"""Bounded enumeration of a multiple-choice knapsack's core (the rows ``knapsack`` leaves open).

Partial assignments of the first ``k`` open rows are held as numpy arrays (cost, usage per budget)
and extended one row at a time. One is dropped when its usage plus the least usage of the rows
still open exceeds a budget, when its lower bound exceeds the threshold or the cheapest complete
assignment found so far, or when another has the same cost and usage (same completions). The bound
is its cost plus the Lagrangian bound of the open rows,
``max_mu [sum_open min_o (cost + mu . usage) - mu . (budget left)]``, over multipliers ``mu`` at the
vertices of that piecewise-linear function (intersections of the rows' break lines, where two
options cost the same at ``mu``): with every vertex it is the LP bound of the open rows. Per row,
every kept vertex is tried on a sample of the partial assignments; the vertices that bound those
best join the set used for all of them, and each sampled assignment completed at each vertex (every
open row at its cheapest option there) is a candidate complete assignment. Any ``mu >= 0`` gives a
valid bound, so which vertices are used costs pruning, never correctness.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import numpy as np

_MAX_STATES = 200_000
"""Partial assignments held at once before the core goes to HiGHS."""
_SAMPLE = 16
"""Partial assignments per row on which every vertex multiplier is tried."""
_MAX_VERTICES = 50_000
"""Vertex multipliers kept when there are more (a seeded sample; any subset gives a valid bound)."""
_KEEP_VERTICES = 2048
"""Vertex multipliers used per enumeration: those with the best bound at the core's start."""
_CHUNK = 16_384


class TooLargeError(Exception):
    """The enumeration would hold more than ``_MAX_STATES`` partial assignments."""


@dataclass
class Core:
    """Open rows (in enumeration order) with their kept options; the other rows fixed.

    Attributes:
        picks: Option index per row of the whole program (the fixed rows' choice; open rows' entries
            are placeholders).
        rows: Open rows, in the order they are enumerated.
        options: Per open row, the option indices it keeps.
        cost: Per open row, those options' costs.
        usage: Per open row, those options' usage, (budgets, kept options).
        fixed_cost: Summed cost of the fixed rows.
        fixed_usage: Summed usage of the fixed rows per budget.
    """

    picks: np.ndarray
    rows: list[int]
    options: list[np.ndarray]
    cost: list[np.ndarray]
    usage: list[np.ndarray]
    fixed_cost: float
    fixed_usage: np.ndarray


@dataclass
class Best:
    """The cheapest assignment found so far (value inf and picks None before the first)."""

    value: float
    picks: np.ndarray | None


def _vertices(core: Core, lam: np.ndarray, left: np.ndarray) -> np.ndarray:
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


def _completions(core: Core, mu: np.ndarray) -> _Completions:
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


def enumerate_core(
    core: Core, lam: np.ndarray, limits: np.ndarray, threshold: float, best: Best, deadline: float | None
) -> None:
    """Improve ``best`` to the cheapest core assignment if one costs at most ``threshold``.

    Partial assignments (one per surviving combination of the first ``k`` open rows) are kept while
    their bound is at most ``min(threshold, best.value)``; a sample of them is completed at every
    vertex multiplier to find cheaper assignments early.

    Raises:
        TooLargeError: When more than ``_MAX_STATES`` partial assignments survive a row.
        TimeoutError: When ``deadline`` (``time.monotonic()``) passes.
    """
    if not core.rows:
        if (core.fixed_usage <= limits).all() and core.fixed_cost < best.value:
            best.value, best.picks = core.fixed_cost, core.picks
        return
    done = _completions(core, _vertices(core, lam, limits - core.fixed_usage))
    useful = np.array([0, 1])
    cost, usage = np.array([core.fixed_cost]), core.fixed_usage[:, None]
    trail: list[np.ndarray] = []
    for k in range(len(core.rows)):
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError
        cost = (cost[:, None] + core.cost[k][None, :]).ravel()
        usage = (usage[:, :, None] + core.usage[k][:, None, :]).reshape(len(limits), -1)
        alive = np.flatnonzero((usage + done.least[k + 1][:, None] <= limits[:, None]).all(axis=0))
        if alive.size > _MAX_STATES:
            raise TooLargeError
        trail.append(alive)
        sample = np.unique(np.linspace(0, alive.size - 1, min(_SAMPLE, alive.size)).astype(int))
        useful = np.union1d(
            useful, _try_sample(core, done, k, cost[alive], usage[:, alive], sample, trail, limits, best)
        )
        bound, tightest = _bound(done, k, cost[alive], limits[:, None] - usage[:, alive], useful)
        kept = bound <= min(threshold, best.value)
        useful = np.union1d([0, 1], tightest[kept])  # the multipliers the survivors need
        alive = alive[kept]
        # Partial assignments with the same cost and usage have the same completions: keep one.
        _, first = np.unique(np.vstack([cost[alive], usage[:, alive]]), axis=1, return_index=True)
        trail[-1] = alive = alive[np.sort(first)]
        if alive.size == 0:
            return
        cost, usage = cost[alive], usage[:, alive]
    state = int(np.argmin(cost))
    if cost[state] < best.value:
        best.value, best.picks = float(cost[state]), _backtrack(core, trail, state)


def _bound(
    done: _Completions, k: int, cost: np.ndarray, left: np.ndarray, useful: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Lower bound of each partial assignment (rows up to ``k``): its cost + the best Lagrangian of the rest.

    Returns:
        The bounds and, for each, the multiplier (index into ``done.mu``) that gives it.
    """
    bounds, tightest = [np.zeros(0)], [np.zeros(0, dtype=int)]
    for s in range(0, len(cost), _CHUNK):
        value = done.value[k + 1][None, useful] - left[:, s : s + _CHUNK].T @ done.mu[useful].T
        best = value.argmax(axis=1)
        bounds.append(cost[s : s + _CHUNK] + value[np.arange(len(best)), best])
        tightest.append(useful[best])
    return np.concatenate(bounds), np.concatenate(tightest)


def _try_sample(
    core: Core,
    done: _Completions,
    k: int,
    cost: np.ndarray,
    usage: np.ndarray,
    sample: np.ndarray,
    trail: list[np.ndarray],
    limits: np.ndarray,
    best: Best,
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


def _backtrack(core: Core, trail: list[np.ndarray], state: int) -> np.ndarray:
    """The assignment of partial state ``state`` at the last level of ``trail`` (later open rows keep ``core.picks``)."""
    picks = core.picks.copy()
    for k in range(len(trail) - 1, -1, -1):
        parent, option = divmod(int(trail[k][state]), len(core.cost[k]))
        picks[core.rows[k]] = core.options[k][option]
        state = parent
    return picks
