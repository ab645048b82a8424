"""Quality of uniform PTQ on digits-unet: FP32 vs W8A8 / W4A8 / W4A4 with min-max and MSE observers.

Every row samples 2,000 images (200 per class) with DDIM 50 from the same noise (seed 0). The
calibration set is the default spec's: 256 inputs chosen by its strategy from 64 FP trajectories. Writes
``bench/results/quality.json`` and the ``quality`` table of BENCHMARKS.md.

Run: ``.venv/bin/python bench/quality.py`` (about 5 minutes on 2 cores; ``--samples`` to shorten).
"""

from __future__ import annotations

import argparse
import time
from functools import partial

from common import cell, machine, replace_section, write_results

from diffquant.calibration.pool import collect_pool, held_out_indices, subset
from diffquant.calibration.selection import pool_features, select
from diffquant.data import load_digits_split
from diffquant.evaluation import evaluate_model
from diffquant.models.loading import load_model
from diffquant.models.reference import load_classifier
from diffquant.ptq import plan_from_spec, quantize_model
from diffquant.quant.plan import packed_weight_bytes
from diffquant.sampling import denoiser_outputs
from diffquant.spec import load_spec

PROTECTED = "quantize.keep_full_precision=[conv_in, conv_out, time_embedding.*]"
CONFIGS = [
    ("W8A8", "minmax", []),
    ("W8A8", "mse", []),
    ("W4A8", "minmax", []),
    ("W4A8", "mse", []),
    ("W4A4", "minmax", []),
    ("W4A4", "mse", []),
    ("W4A8", "mse", [PROTECTED]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()

    model = load_model("digits-unet")
    classifier = load_classifier()
    real = load_digits_split().held_out_images
    base = load_spec(overrides=[f"sampler.steps={args.steps}", f"evaluate.samples={args.samples}"])
    pool = collect_pool(model, base.calibration.trajectories, args.steps, base.calibration.seed)
    features = pool_features(model.unet, pool, model.conditional, model.family_info.feature_module)
    chosen = select(pool, base.calibration.strategy, base.calibration.size, base.calibration.seed, features)
    calib = subset(pool, chosen)
    sqnr_in = subset(pool, held_out_indices(len(pool), chosen, 256, base.calibration.seed))
    fp_out = denoiser_outputs(model.unet, sqnr_in)
    sizes_fp = sum(p.numel() * 4 for p in model.unet.parameters())

    rows = []
    start = time.perf_counter()
    fp = evaluate_model(model, args.samples, args.steps, 0, 1000, classifier, real)
    rows.append(
        {"name": "FP32", "observer": "-", "bytes": sizes_fp, "seconds": time.perf_counter() - start, **fp.metrics}
    )
    start = time.perf_counter()
    fp2 = evaluate_model(model, args.samples, args.steps, 1, 1000, classifier, real, fp=fp)
    rows.append(
        {
            "name": "FP32, noise seed 1 (noise floor)",
            "observer": "-",
            "bytes": sizes_fp,
            "seconds": time.perf_counter() - start,
            **fp2.metrics,
        }
    )
    for name, observer, extra in CONFIGS:
        w, a = name[1], name[3]
        spec = load_spec(
            overrides=[
                f"quantize.weight.bits={w}",
                f"quantize.activation.bits={a}",
                f"quantize.weight.observer={observer}",
                f"calibration.observer={observer}",
                *extra,
            ]
        )
        start = time.perf_counter()
        plan = plan_from_spec(model, spec.quantize, observer)
        quantized = quantize_model(model, plan, calib, spec.calibration)
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
        label = name + (" (conv_in, conv_out, time_embedding FP)" if extra else "")
        rows.append(
            {
                "name": label,
                "observer": observer,
                "bytes": packed_weight_bytes(model.unet, plan)["packed"],
                "seconds": time.perf_counter() - start,
                **result.metrics,
            }
        )
        print(
            f"{label:48s} {observer:7s} acc {result.metrics['accuracy']:.4f} "
            f"fd_real {result.metrics['fd_real']:.2f} fd_fp {result.metrics['fd_fp']:.2f}",
            flush=True,
        )

    write_results("quality", {"machine": machine(), "rows": rows})
    lines = [
        "## Uniform PTQ quality on digits-unet",
        "",
        f"Command: `.venv/bin/python bench/quality.py` ({args.samples} samples, DDIM {args.steps}, noise seed 0, "
        f"calibration: the default spec's, 256 inputs chosen by {base.calibration.strategy} from 64 FP trajectories). Machine: {machine()}.",
        "FD uses the evaluation classifier's features (project-specific; real-vs-real FD of the training "
        "digits to the held-out digits is 3.55). Bytes: all parameters with quantized weights bit-packed "
        "plus fp32 scales. Seconds: calibration + sampling + metrics for that row.",
        "",
        "| model | observer | accuracy | FD to real | FD to FP | PSNR vs FP (dB) | SQNR (dB) | bytes | x FP32 size | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = partial(cell, r)
        lines.append(
            f"| {r['name']} | {r['observer']} | {f('accuracy', '{:.4f}')} | {f('fd_real', '{:.2f}')} | "
            f"{f('fd_fp', '{:.2f}')} | {f('psnr', '{:.1f}')} | {f('sqnr_db', '{:.1f}')} | {r['bytes']:,} | "
            f"{r['bytes'] / sizes_fp:.3f} | {r['seconds']:.1f} |"
        )
    replace_section("quality", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
