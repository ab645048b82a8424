"""How layer noise adds up: which sum of per-layer sensitivities predicts a plan's real error.

The allocation's quality term adds each layer's measured noise (the denoiser-output noise power with
only that layer quantized, :mod:`diffquant.mixed_precision.sensitivity`). ``allocation.noise_sum:
power`` adds the powers (independent errors); ``amplitude`` adds their square roots (errors that add
coherently; the triangle inequality's bound). This benchmark draws random W{2,3,4,6,8}A8 plans per
reference model (each plan draws its lowest width from 2, 2, 3, 4 and each layer a width at or above it;
the model family's float layers stay float, round-to-nearest, MSE weight ranges), quantizes each, and
measures what each sum should predict:

- the one-step denoiser-output SQNR on 256 held-out pool inputs (the quantity the sensitivity measures);
- the PSNR of ``--samples`` final samples (DDIM 50) against FP samples from the same noise (the allocation's
  own final-sample probe, :func:`diffquant.mixed_precision.content.final_sample_probe`).

It prints Spearman's rank correlation of each sum with each measurement (higher: the sum orders plans
like the measurement does), and the ratio of the real one-step noise power to each prediction.
The per-layer sensitivities are bench/low_bits.py's zoo tables (cached under
``$DIFFQUANT_HOME/cache/bench-low-bits``; measured on first use).

Run: ``.venv/bin/python bench/noise_sum.py`` (about 11 min on one core; ``--models``, ``--plans``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import statistics
import time

import torch
from common import machine, replace_section, write_results
from low_bits import ZOO_MIXED, Bench
from scipy.stats import spearmanr

from diffquant.metrics import sqnr_db
from diffquant.mixed_precision.content import final_sample_probe
from diffquant.ptq import plan_from_spec, quantize_model
from diffquant.quant.plan import LayerPlan, packed_weight_bytes
from diffquant.sampling import denoiser_outputs
from diffquant.spec import load_spec

WIDTHS = (2, 3, 4, 6, 8)


def measure(name: str, args: argparse.Namespace) -> dict:
    """Random plans of one model: predicted sums and measured errors."""
    bench = Bench(name, argparse.Namespace(samples=2000, steps=50))
    model = bench.model
    common = [f"model.name={name}", "quantize.weight.observer=mse", "quantize.weight.rounding=nearest"]
    spec = load_spec(overrides=[*common, "quantize.weight.bits=4"])
    base = plan_from_spec(model, spec.quantize, spec.calibration.observer)
    size = packed_weight_bytes(model.unet, base)["packed"]
    mixed = load_spec(overrides=[*common, ZOO_MIXED.format(bytes=size), "allocation.content_metric=classifier_kl"])
    table = bench.sensitivity(mixed)
    with torch.no_grad():  # the FP samples, once
        probe = final_sample_probe(model, "ssim", None, args.samples, spec.sampler, args.seed, set(), psnr_all=True)
    rng = random.Random(args.seed)
    plans = []
    for index in range(args.plans):
        low = rng.choice([2, 2, 3, 4])
        widths = [b for b in WIDTHS if b >= low]
        plan, power, amplitude = LayerPlan(), 0.0, 0.0
        for layer, cfg in base.items():
            if cfg.weight is None:
                plan[layer] = cfg
                continue
            bits = rng.choice(widths)
            plan[layer] = dataclasses.replace(cfg, weight=cfg.weight.model_copy(update={"bits": bits}))
            parts = [("weight", bits)] + ([("activation", cfg.activation.bits)] if cfg.activation else [])
            for kind, b in parts:
                value = table.noise(layer, kind, b)
                power += value
                amplitude += math.sqrt(value)
        quantized = quantize_model(model, plan, bench.calib, spec.calibration)
        with torch.no_grad():
            one_step = sqnr_db(bench.fp_out, denoiser_outputs(quantized.unet, bench.sqnr_in, model.conditional))
            final = probe(quantized.unet, "")["psnr_db"]
        plans.append({"lowest": low, "power": power, "amplitude": amplitude, "sqnr_db": one_step, "psnr_db": final})
        print(
            f"{name} plan {index}: power {power:.5f} amplitude {amplitude:.4f} "
            f"SQNR {one_step:.2f} dB PSNR {final:.2f} dB",
            flush=True,
        )
    out = {"model": name, "plans": plans}
    for key in ("power", "amplitude"):
        predicted = [-p[key] for p in plans]
        out[f"rho_{key}_sqnr"] = float(spearmanr(predicted, [p["sqnr_db"] for p in plans]).statistic)
        out[f"rho_{key}_psnr"] = float(spearmanr(predicted, [p["psnr_db"] for p in plans]).statistic)
    real = [10 ** (-p["sqnr_db"] / 10) for p in plans]
    out["ratio_power"] = [r / p["power"] for r, p in zip(real, plans, strict=True)]
    out["ratio_amplitude"] = [r / p["amplitude"] ** 2 for r, p in zip(real, plans, strict=True)]
    return out


def report(results: list[dict], args: argparse.Namespace, seconds: float) -> str:
    """The BENCHMARKS.md section."""
    lines = [
        "## How layer noise adds up (`allocation.noise_sum`)",
        "",
        f"Command: `.venv/bin/python bench/noise_sum.py` ({args.plans} random W{{2,3,4,6,8}}A8 plans per model, "
        f"final-sample PSNR on {args.samples} samples, DDIM 50, noise seed {args.seed}; {seconds / 60:.0f} min). "
        f"Machine: {machine()}.",
        "Spearman's rank correlation of each sum of per-layer noise with the plan's measured one-step SQNR and "
        "final-sample PSNR against FP (1: orders the plans exactly as the measurement does); real one-step noise "
        "power over each prediction (median, min-max).",
        "",
        "| model | rho power / one-step SQNR | rho amplitude / one-step SQNR | rho power / final PSNR "
        "| rho amplitude / final PSNR | real / power sum | real / amplitude sum squared |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratios = []
        for key in ("ratio_power", "ratio_amplitude"):
            values = r[key]
            ratios.append(f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})")
        lines.append(
            f"| {r['model']} | {r['rho_power_sqnr']:.2f} | {r['rho_amplitude_sqnr']:.2f} | {r['rho_power_psnr']:.2f} "
            f"| {r['rho_amplitude_psnr']:.2f} | {ratios[0]} | {ratios[1]} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="digits-unet,digits-dit,digits-t2i")
    parser.add_argument("--plans", type=int, default=64, help="random plans per model")
    parser.add_argument("--samples", type=int, default=100, help="final samples per plan")
    parser.add_argument("--seed", type=int, default=777, help="noise and plan seed")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    results = [measure(name, args) for name in args.models.split(",")]
    seconds = time.perf_counter() - start
    write_results("noise_sum", {"machine": machine(), "args": vars(args), "seconds": seconds, "models": results})
    body = report(results, args, seconds)
    replace_section("noise_sum", body)
    print(body)


if __name__ == "__main__":
    main()
