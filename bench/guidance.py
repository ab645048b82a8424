"""Classifier-free guidance on the reference models: why it looked broken, and what quantization loses as it grows.

For digits-unet and digits-t2i at guidance 1, 2 and 4 (DDIM, noise seed 0): the full-precision
model with DDIM's x0 clipping forced on (``sampler.clip_sample: true``, what the shipped scheduler
configs say) and forced off, then, with the default ``clip_sample: auto`` (the config's clipping
unguided, off when guided), W8A8 (the default spec's plan), W4A8 (``configs/digits-unet-w4a8.yaml``'s
plan) and mixed precision at an average of 4.0 weight bits (``configs/digits-unet-mixed-w4a8.yaml``'s
allocation; sensitivity probes sampled at the same guidance), each calibrated on a pool sampled at
that guidance (both halves). Accuracy and FD to real use the digits classifier; FD to FP and PSNR
compare with the full-precision samples of the same sampler from the same noise. Writes
``bench/results/guidance.json`` and the ``guidance`` section of BENCHMARKS.md.

Run: ``.venv/bin/python bench/guidance.py`` (``--samples 500 --steps 25`` by default).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from pathlib import Path

from common import cell, machine, replace_section, write_results

import diffquant
from diffquant.data import load_digits_split
from diffquant.evaluation import evaluate_model
from diffquant.models.reference import load_classifier
from diffquant.ptq import auto_quantize
from diffquant.spec import CalibrationSpec, SamplerSpec, load_spec

MODELS = ("digits-unet", "digits-t2i")
GUIDANCE = (1.0, 2.0, 4.0)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def quantized_variants(model, calibration, sampler: SamplerSpec, classifier):
    """Yield ``(label, quantized copy, packed bytes)`` for W8A8, W4A8 and the mixed W4A8 allocation."""
    for label, preset in (("W8A8", "digits-unet-w8a8.yaml"), ("W4A8", "digits-unet-w4a8.yaml")):
        spec = load_spec(CONFIGS / preset, [f"model.name={model.name}", "quantize.keep_full_precision=null"])
        quantized = dataclasses.replace(model, unet=copy.deepcopy(model.unet))
        result = diffquant.quantize(quantized, spec.quantize, calibration, calibration=spec.calibration)
        yield label, quantized, result.packed_bytes
    spec = load_spec(CONFIGS / "digits-unet-mixed-w4a8.yaml", [f"model.name={model.name}"])
    assert spec.allocation is not None
    quantized = dataclasses.replace(model, unet=copy.deepcopy(model.unet))
    result = auto_quantize(
        quantized,
        spec.allocation,
        calibration,
        quantize_config=spec.quantize,
        calibration=spec.calibration,
        steps=sampler,
        classifier=classifier,
    )
    yield "mixed W4A8 (avg 4.0 weight bits)", quantized, result.quantized.packed_bytes


def publish(rows: list[dict], args: argparse.Namespace, seconds: float, planned: int) -> None:
    """Write the JSON and the BENCHMARKS section from the rows measured so far (called after each guidance)."""
    write_results("guidance", {"machine": machine(), "args": vars(args), "seconds": seconds, "rows": rows})
    lines = [
        "## Classifier-free guidance on the reference models",
        "",
        f"`.venv/bin/python bench/guidance.py` ({args.samples} samples, DDIM {args.steps} steps, noise seed 0; "
        f"quantized rows calibrated on 256 inputs from {args.trajectories} trajectories sampled at the same "
        "guidance, both halves, and sampled with `clip_sample: auto`: the config's clipping at guidance 1, "
        f"off when guided; FD to FP and PSNR against FP with the same sampler). {machine()}; {seconds:.0f} s"
        + ("." if len(rows) == planned else f"; a partial run: {len(rows)} of {planned} rows."),
        "",
        "| model | guidance | variant | weight bytes | accuracy | FD to real | FD to FP | PSNR (dB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['guidance']:g} | {row['variant']} | {cell(row, 'bytes', '{:,}')} | "
            f"{cell(row, 'accuracy')} | {cell(row, 'fd_real', '{:.2f}')} | {cell(row, 'fd_fp')} | "
            f"{cell(row, 'psnr', '{:.1f}')} |"
        )
    replace_section("guidance", "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--trajectories", type=int, default=32, help="FP trajectories in each calibration pool")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    args = parser.parse_args()

    classifier = load_classifier()
    real = load_digits_split().held_out_images
    rows: list[dict] = []
    began = time.perf_counter()
    planned = len(args.models) * len(GUIDANCE) * 5
    for name in args.models:
        model = diffquant.load_model(name)
        for guidance in GUIDANCE:
            sampler = SamplerSpec(steps=args.steps, guidance=guidance)

            def evaluate(model, fp=None, sampler=sampler):
                return evaluate_model(model, args.samples, sampler, 0, 500, classifier, real, fp=fp)

            for clip in (True, False):
                forced = evaluate(model, sampler=sampler.model_copy(update={"clip_sample": clip}))
                variant = f"FP, clip_sample {str(clip).lower()}"
                rows.append({"model": name, "guidance": guidance, "variant": variant, **forced.metrics})
            fp = evaluate(model)
            pool = diffquant.collect_pool(model, args.trajectories, sampler, seed=0)
            calibration = diffquant.select_calibration(
                pool, model, CalibrationSpec(size=min(256, len(pool) // 2))
            ).calibration
            for variant, quantized, size in quantized_variants(model, calibration, sampler, classifier):
                result = evaluate(quantized, fp)
                rows.append({"model": name, "guidance": guidance, "variant": variant, "bytes": size, **result.metrics})
            for row in rows[-5:]:
                print(
                    f"{name:12s} g={guidance:.0f} {row['variant']:34s} acc {row['accuracy']:.3f} "
                    f"fd_real {row['fd_real']:.2f} fd_fp {row.get('fd_fp', float('nan')):.3f}",
                    flush=True,
                )
            publish(rows, args, time.perf_counter() - began, planned)


if __name__ == "__main__":
    main()
