"""Classifier-free guidance on the reference models: why it looked broken, and what W8A8 loses as it grows.

For digits-unet and digits-t2i at guidance 1, 2 and 4 (DDIM, noise seed 0): the full-precision
model with the shipped scheduler config (``clip_sample: true``) and with DDIM's x0 clipping off,
and, with clipping off, W8A8 (the default spec's plan) calibrated on a pool sampled at that
guidance (both halves). Accuracy and FD to real use the digits classifier, FD to FP and PSNR the
full-precision samples from the same noise. Writes ``bench/results/guidance.json`` and the
``guidance`` section of BENCHMARKS.md.

Run: ``.venv/bin/python bench/guidance.py`` (``--samples 500 --steps 25`` by default; about ten
minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

from common import cell, machine, replace_section, write_results

import diffquant
from diffquant.data import load_digits_split
from diffquant.evaluation import evaluate_model
from diffquant.models.reference import load_classifier
from diffquant.spec import CalibrationSpec, QuantizeSpec, SamplerSpec

MODELS = ("digits-unet", "digits-t2i")
GUIDANCE = (1.0, 2.0, 4.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--trajectories", type=int, default=32, help="FP trajectories in each calibration pool")
    args = parser.parse_args()

    classifier = load_classifier()
    real = load_digits_split().held_out_images
    rows: list[dict] = []
    began = time.perf_counter()
    for name in MODELS:
        shipped = diffquant.load_model(name)
        unclipped = dataclasses.replace(shipped, scheduler_config={**shipped.scheduler_config, "clip_sample": False})
        for guidance in GUIDANCE:
            sampler = SamplerSpec(steps=args.steps, guidance=guidance)

            def evaluate(model, fp=None, sampler=sampler):
                return evaluate_model(model, args.samples, sampler, 0, 500, classifier, real, fp=fp)

            clipped = evaluate(shipped)
            rows.append({"model": name, "guidance": guidance, "variant": "FP, clip_sample true", **clipped.metrics})
            fp = evaluate(unclipped)
            rows.append({"model": name, "guidance": guidance, "variant": "FP, clip_sample false", **fp.metrics})
            pool = diffquant.collect_pool(unclipped, args.trajectories, sampler, seed=0)
            calibration = diffquant.select_calibration(pool, unclipped, CalibrationSpec(size=256)).calibration
            quantized = dataclasses.replace(unclipped, unet=copy.deepcopy(unclipped.unet))
            diffquant.quantize(quantized, QuantizeSpec(), calibration)
            w8a8 = evaluate(quantized, fp)
            rows.append({"model": name, "guidance": guidance, "variant": "W8A8, clip_sample false", **w8a8.metrics})
            for row in rows[-3:]:
                print(
                    f"{name:12s} g={guidance:.0f} {row['variant']:24s} acc {row['accuracy']:.3f} "
                    f"fd_real {row['fd_real']:.2f} fd_fp {row.get('fd_fp', float('nan')):.3f}",
                    flush=True,
                )
    seconds = time.perf_counter() - began
    write_results("guidance", {"machine": machine(), "args": vars(args), "seconds": seconds, "rows": rows})
    lines = [
        "## Classifier-free guidance on the reference models",
        "",
        f"`.venv/bin/python bench/guidance.py` ({args.samples} samples, DDIM {args.steps} steps, noise seed 0; "
        f"W8A8 calibrated on 256 inputs from {args.trajectories} trajectories sampled at the same guidance, "
        f"both halves). {machine()}; {seconds:.0f} s.",
        "",
        "| model | guidance | variant | accuracy | FD to real | FD to FP | PSNR (dB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['guidance']:g} | {row['variant']} | {cell(row, 'accuracy')} | "
            f"{cell(row, 'fd_real', '{:.2f}')} | {cell(row, 'fd_fp')} | {cell(row, 'psnr', '{:.1f}')} |"
        )
    replace_section("guidance", "\n".join(lines))


if __name__ == "__main__":
    main()
