"""Calibration-set selection strategies compared where activations matter.

For calibration sizes 32, 128 and 512, settings W8A6 and W8A4 (uniform) and W4A8 with conv_in,
conv_out and the time embedding kept at W8A8, and every strategy with 3 selection seeds: FD to FP
and condition accuracy (mean and std over seeds), and selection time. One pool (64 FP
trajectories, DDIM 50, the default spec's) and one set of pool features serve every row.
Writes ``bench/results/calibration.json`` and the ``calibration`` table of BENCHMARKS.md.

Run: ``.venv/bin/python bench/calibration.py`` (about 30 minutes on 2 cores with the default
1,000 samples; ``--samples``, ``--sizes``, ``--seeds`` to shorten).
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import machine, replace_section, write_results

from diffquant.calibration.pool import collect_pool, subset
from diffquant.calibration.selection import STRATEGIES, SelectionParams, pool_features, select
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--sizes", default="32,128,512")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    strategies = args.strategies.split(",")

    model = load_model("digits-unet")
    classifier = load_classifier()
    real = load_digits_split().held_out_images
    base = load_spec()
    steps = base.sampler.steps
    start = time.perf_counter()
    pool = collect_pool(model, base.calibration.trajectories, steps, base.calibration.seed)
    pool_seconds = time.perf_counter() - start
    start = time.perf_counter()
    features = pool_features(model.unet, pool, model.conditional)
    feature_seconds = time.perf_counter() - start
    fp = evaluate_model(model, args.samples, steps, 0, 1000, classifier, real)
    params = SelectionParams()

    rows = []
    for setting, overrides in SETTINGS.items():
        spec = load_spec(overrides=overrides)
        plan = plan_from_spec(model, spec.quantize)
        for size in sizes:
            for strategy in strategies:
                runs = []
                for seed in range(args.seeds):
                    start = time.perf_counter()
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

    out = {
        "machine": machine(),
        "samples": args.samples,
        "pool_seconds": pool_seconds,
        "feature_seconds": feature_seconds,
        "fp": fp.metrics,
        "rows": rows,
    }
    write_results("calibration", out)
    lines = [
        "## Calibration-set selection",
        "",
        f"Command: `.venv/bin/python bench/calibration.py` ({args.samples} samples, DDIM {steps}, noise seed 0; "
        f"pool: {len(pool)} inputs from {base.calibration.trajectories} FP trajectories, collected in "
        f"{pool_seconds:.1f} s; mid-block features of the pool in {feature_seconds:.1f} s). Machine: {machine()}.",
        f"Mean +- std over {args.seeds} selection seeds. FP at this sample count: accuracy "
        f"{fp.metrics['accuracy']:.4f}, FD to real {fp.metrics['fd_real']:.2f}. Select s: the strategy alone "
        "(features are computed once per pool and shared).",
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
    print("\n".join(lines))


if __name__ == "__main__":
    main()
