"""Scale of the allocation integer program: 2,000 layers x 8 options, two budget constraints.

Random sensitivities and sizes (seeded); budgets on average weight bits and BitOps set halfway
between their minimum and maximum. Reports the median of 5 solves (HiGHS through
``scipy.optimize.milp``) and writes the ``allocation`` table of BENCHMARKS.md.

Run: ``.venv/bin/python bench/allocation.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from common import ROOT, machine, replace_section

from diffquant.mixed_precision.solver import AllocationProblem, solve_allocation


def make_problem(layers: int, options: int, seed: int, tied: int) -> AllocationProblem:
    rng = np.random.default_rng(seed)
    bits = np.array([2, 3, 4, 5, 6, 7, 8, 16][:options], dtype=float)
    params = rng.integers(1_000, 1_000_000, layers).astype(float)
    macs = params * rng.integers(1, 64, layers)
    sensitivity = rng.random(layers)[:, None] * np.exp(-bits[None, :] * rng.uniform(0.3, 1.0, layers)[:, None])
    avg = np.outer(params, bits) / params.sum()
    bitops = np.outer(macs, bits * 8)
    budgets = {}
    for name, usage in (("avg_weight_bits", avg), ("bitops", bitops)):
        low, high = usage.min(1).sum(), usage.max(1).sum()
        budgets[name] = float(low + 0.5 * (high - low))
    names = [f"layer{i}" for i in range(layers)]
    groups = [names[i : i + 3] for i in range(0, 3 * tied, 3)]
    return AllocationProblem(
        names, [f"w{int(b)}" for b in bits], sensitivity, {"avg_weight_bits": avg, "bitops": bitops}, budgets, groups
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=2000)
    parser.add_argument("--options", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results = []
    for tied in (0, 100):
        times = []
        for seed in range(args.repeats):
            problem = make_problem(args.layers, args.options, seed, tied)
            start = time.perf_counter()
            answer = solve_allocation(problem)
            times.append(time.perf_counter() - start)
            assert answer.usage["avg_weight_bits"] <= problem.budgets["avg_weight_bits"] * (1 + 1e-6)
        results.append({"tied_groups": tied, "seconds": times, "median": statistics.median(times)})
        print(
            f"{args.layers} layers x {args.options} options, {tied} tied groups of 3: median "
            f"{statistics.median(times):.3f} s ({', '.join(f'{t:.3f}' for t in times)})",
            flush=True,
        )
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "allocation.json").write_text(
        json.dumps({"machine": machine(), "runs": results}, indent=2)
    )
    lines = [
        "## Allocation integer program at scale",
        "",
        f"Command: `.venv/bin/python bench/allocation.py` ({args.layers} layers x {args.options} options, budgets on "
        f"average weight bits and BitOps, {args.repeats} seeded random instances each). Machine: {machine()}.",
        "",
        "| tied groups (3 layers each) | median s | all runs (s) |",
        "|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['tied_groups']} | {r['median']:.3f} | {', '.join(f'{t:.3f}' for t in r['seconds'])} |")
    replace_section("allocation", "\n".join(lines))


if __name__ == "__main__":
    main()
