"""Calibration-set selection strategies compared where activations matter.

For calibration sizes 32, 128 and 512, settings W8A6 and W8A4 (uniform) and W4A8 with conv_in,
conv_out and the time embedding kept at W8A8, and every strategy with 3 selection seeds: FD to FP
and condition accuracy (mean and std over seeds), and selection time. One pool (64 FP
trajectories, DDIM 50, the default spec's) and one set of pool features serve every row.

``density_diversity`` is EDA-DM's official TDAC (:mod:`diffquant.calibration.selection`, features
of the mid-block attention's input). ``density_diversity_v0`` is the library's selection before
issue 16, now the strategy ``density_diversity_kcenter`` (the same weight formula on each
timestep's mean feature, then farthest-point selection inside each timestep), run here on the
features it used then: the mid block's output (``calibration.feature_module: mid_block``).
Writes ``bench/results/calibration.json`` and the ``calibration`` table of BENCHMARKS.md.

Run: ``.venv/bin/python bench/calibration.py`` (about 30 minutes on 2 cores with the default
1,000 samples; ``--samples``, ``--sizes``, ``--seeds``, ``--settings``, ``--strategies`` to shorten;
rows are measured in the order of ``--settings`` and ``--strategies``). The JSON and the table are
rewritten after every row, so a stopped run leaves the rows it measured, and the table says how many
of the requested rows those are.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import machine, replace_section, write_results

from diffquant.calibration.pool import collect_pool, subset
from diffquant.calibration.selection import (
    STRATEGIES,
    SelectionParams,
    pool_features,
    select,
    select_density_diversity_kcenter,
)
from diffquant.data import load_digits_split
from diffquant.evaluation import evaluate_model
from diffquant.models.loading import load_model
from diffquant.models.reference import load_classifier
from diffquant.ptq import plan_from_spec, quantize_model
from diffquant.spec import load_spec

PROTECT_8BIT = "quantize.overrides=[{layers: [conv_in, conv_out, 'time_embedding.*'], weight_bits: 8}]"
SETTINGS = {
    "W8A6": ["quantize.weight.bits=8", "quantize.activation.bits=6"],
    "W8A4": ["quantize.weight.bits=8", "quantize.activation.bits=4"],
    "W4A8 (conv_in/out, time emb. W8A8)": ["quantize.weight.bits=4", "quantize.activation.bits=8", PROTECT_8BIT],
}
V0 = "density_diversity_v0"
V0_FEATURE_MODULE = "mid_block"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--sizes", default="32,128,512")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--strategies", default=",".join([*(s for s in STRATEGIES if s != "density_diversity_kcenter"), V0])
    )
    parser.add_argument("--settings", default="W8A6,W8A4,W4A8", help="settings by their first word, in order")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    strategies = args.strategies.split(",")
    by_word = {name.split()[0]: name for name in SETTINGS}
    settings = [by_word[word] for word in args.settings.split(",")]

    model = load_model("digits-unet")
    classifier = load_classifier()
    real = load_digits_split().held_out_images
    base = load_spec()
    steps = base.sampler.steps
    start = time.perf_counter()
    pool = collect_pool(model, base.calibration.trajectories, steps, base.calibration.seed)
    pool_seconds = time.perf_counter() - start
    start = time.perf_counter()
    features = pool_features(model.unet, pool, model.conditional, model.family_info.feature_module)
    feature_seconds = time.perf_counter() - start
    v0_features = pool_features(model.unet, pool, model.conditional, V0_FEATURE_MODULE) if V0 in strategies else None
    fp = evaluate_model(model, args.samples, steps, 0, 1000, classifier, real)
    params = SelectionParams()

    rows: list[dict] = []
    context = {
        "args": args,
        "pool": len(pool),
        "trajectories": base.calibration.trajectories,
        "steps": steps,
        "pool_seconds": pool_seconds,
        "feature_seconds": feature_seconds,
        "fp": fp,
        "requested": len(settings) * len(sizes) * len(strategies),
    }
    for setting in settings:
        spec = load_spec(overrides=SETTINGS[setting])
        plan = plan_from_spec(model, spec.quantize)
        for size in sizes:
            for strategy in strategies:
                runs = []
                for seed in range(args.seeds):
                    start = time.perf_counter()
                    if strategy == V0:
                        chosen = select_density_diversity_kcenter(pool.t, v0_features, size, seed, params)
                    else:
                        chosen = select(pool, strategy, size, seed, features, params)
                    select_seconds = time.perf_counter() - start
                    quantized = quantize_model(model, plan, subset(pool, chosen), spec.calibration)
                    result = evaluate_model(quantized, args.samples, steps, 0, 1000, classifier, real, fp=fp)
                    runs.append({"seed": seed, "select_seconds": select_seconds, **result.metrics})
                row = {"setting": setting, "size": size, "strategy": strategy, "runs": runs}
                for key in ("fd_fp", "accuracy", "select_seconds"):
                    values = [r[key] for r in runs]
                    row[f"{key}_mean"] = statistics.fmean(values)
                    row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
                rows.append(row)
                print(
                    f"{setting:36s} {size:4d} {strategy:18s} FD-FP {row['fd_fp_mean']:7.3f}+-{row['fd_fp_std']:.3f} "
                    f"acc {row['accuracy_mean']:.4f}+-{row['accuracy_std']:.4f}",
                    flush=True,
                )
                _write(rows, context)


def _write(rows: list[dict], context: dict) -> None:
    """Write the JSON and the BENCHMARKS.md table of the rows measured so far."""
    args, fp = context["args"], context["fp"]
    write_results(
        "calibration",
        {
            "machine": machine(),
            "samples": args.samples,
            "pool_seconds": context["pool_seconds"],
            "feature_seconds": context["feature_seconds"],
            "fp": fp.metrics,
            "requested_rows": context["requested"],
            "rows": rows,
        },
    )
    done = len(rows)
    partial = (
        f" This table holds {done} of the {context['requested']} rows the command was asked for "
        f"(`--settings {args.settings} --sizes {args.sizes} --strategies {args.strategies}`): the run was stopped "
        "there."
        if done < context["requested"]
        else ""
    )
    lines = [
        "## Calibration-set selection",
        "",
        f"Command: `.venv/bin/python bench/calibration.py --samples {args.samples} --settings {args.settings} "
        f"--sizes {args.sizes} --seeds {args.seeds} --strategies {args.strategies}` (DDIM {context['steps']}, noise "
        f"seed 0; pool: {context['pool']} inputs from {context['trajectories']} FP trajectories, collected in "
        f"{context['pool_seconds']:.1f} s; mid-attention input features of the pool in "
        f"{context['feature_seconds']:.1f} s). Machine: {machine()}.{partial}",
        f"Mean +- std over {args.seeds} selection seeds. FP at this sample count: accuracy "
        f"{fp.metrics['accuracy']:.4f}, FD to real {fp.metrics['fd_real']:.2f}. Select s: the strategy alone "
        "(features are computed once per pool and shared). `density_diversity` is EDA-DM's official TDAC "
        f"(per-sample features, random draws within a timestep); `{V0}` is the selection before issue 16 "
        "(mean feature per timestep of the mid block's output, k-center within a timestep), the library's "
        "`density_diversity_kcenter` on those features.",
        "",
        "| setting | size | strategy | FD to FP | accuracy | select s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['size']} | {r['strategy']} | {r['fd_fp_mean']:.3f} +- {r['fd_fp_std']:.3f} | "
            f"{r['accuracy_mean']:.4f} +- {r['accuracy_std']:.4f} | {r['select_seconds_mean']:.3f} |"
        )
    replace_section("calibration", "\n".join(lines))


if __name__ == "__main__":
    main()
