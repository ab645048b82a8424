"""GPTQ vs round-to-nearest weights on digits-unet: uniform W3A8 and W4A8, through the library API.

Both roundings use the same calibration set (the default spec's: 256 inputs chosen from 64 FP
trajectories) and the same evaluation (DDIM, noise seed 0, classes cycling 0-9). Writes
``bench/results/gptq.json``.

Run: ``.venv/bin/python bench/gptq.py`` (``--samples 500`` by default; about two minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import time

from common import machine, write_results

import diffquant
from diffquant.calibration.pool import collect_pool, held_out_indices, subset
from diffquant.calibration.selection import pool_features, select
from diffquant.data import load_digits_split
from diffquant.evaluation import evaluate_model
from diffquant.models.reference import load_classifier
from diffquant.sampling import denoiser_outputs
from diffquant.spec import load_spec

CONFIGS = [("W3A8", 3, 8), ("W4A8", 4, 8)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()

    model = diffquant.load_model("digits-unet")
    classifier = load_classifier()
    real = load_digits_split().held_out_images
    base = load_spec(overrides=[f"sampler.steps={args.steps}", f"evaluate.samples={args.samples}"])
    pool = collect_pool(model, base.calibration.trajectories, args.steps, base.calibration.seed)
    features = pool_features(model.unet, pool, model.conditional, model.family_info.feature_module)
    chosen = select(pool, base.calibration.strategy, base.calibration.size, base.calibration.seed, features)
    calib = subset(pool, chosen)
    sqnr_in = subset(pool, held_out_indices(len(pool), chosen, 256, base.calibration.seed))
    fp_out = denoiser_outputs(model.unet, sqnr_in)
    fp = evaluate_model(model, args.samples, args.steps, 0, 1000, classifier, real)
    rows = [{"name": "FP32", "rounding": "-", **fp.metrics}]
    print(f"{'FP32':6s} {'-':8s} acc {fp.metrics['accuracy']:.4f} fd_real {fp.metrics['fd_real']:.2f}", flush=True)
    for name, w_bits, a_bits in CONFIGS:
        for rounding in ("nearest", "gptq"):
            spec = load_spec(
                overrides=[
                    f"quantize.weight.bits={w_bits}",
                    f"quantize.activation.bits={a_bits}",
                    f"quantize.weight.rounding={rounding}",
                ]
            )
            start = time.perf_counter()
            quantized = copy.deepcopy(model)
            diffquant.quantize(quantized, spec.quantize, calib, calibration=spec.calibration)
            seconds = time.perf_counter() - start
            result = evaluate_model(
                quantized,
                args.samples,
                args.steps,
                0,
                1000,
                classifier,
                real,
                fp=fp,
                sqnr_inputs=sqnr_in,
                fp_outputs=fp_out,
            )
            m = result.metrics
            rows.append({"name": name, "rounding": rounding, "quantize_seconds": seconds, **m})
            print(
                f"{name:6s} {rounding:8s} acc {m['accuracy']:.4f} fd_real {m['fd_real']:.2f} fd_fp {m['fd_fp']:.2f} "
                f"sqnr {m.get('sqnr_db', float('nan')):.1f} dB quantize {seconds:.1f} s",
                flush=True,
            )
    write_results("gptq", {"machine": machine(), "samples": args.samples, "steps": args.steps, "rows": rows})


if __name__ == "__main__":
    main()
