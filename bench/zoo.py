"""digits-dit and digits-t2i: FP, uniform W8A8 / W4A8, mixed precision and BOS-aware quantization.

For each model: FP32 (noise seeds 0 and 1, the noise floor), uniform W8A8 (min-max) and W4A8 (MSE
weights) with the family's full-precision defaults, and mixed precision at an average of 4.0
weight bits with 8-bit inputs (SQNR sensitivity, HiGHS). Every row samples ``--samples`` images
with DDIM ``--steps`` from the same noise; digits-t2i samples use its held-out phrasings.

BOS-aware quantization (MixDQ) on digits-t2i: W8A8 and W4A8 with ``outlier_tokens`` off and with
the first token's cross-attention keys/values kept in float. Because the small text encoder
trained here has no BOS outlier of its own (detection reports the ratio), the same comparison is
also run on a variant whose encoder output for the BOS token is scaled so that its absmax is
``--bos-ratio`` times the other tokens' (SD's CLIP: about 800 against 10-15, so about 60); that
variant is a different FP model, so its own FP row is the baseline for its quantized rows.

Writes ``bench/results/zoo.json`` and the ``zoo`` section of BENCHMARKS.md.

Run: ``.venv/bin/python bench/zoo.py`` (about 20 minutes on 2 cores; ``--samples 500`` to shorten).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from functools import partial

import torch
from common import ROOT, cell, machine, replace_section

from diffquant.calibration.pool import collect_pool, held_out_indices, subset
from diffquant.calibration.selection import pool_features, select
from diffquant.data import load_digits_split
from diffquant.evaluation import EvalResult, evaluate_model
from diffquant.models.loading import DiffusionModel, load_model
from diffquant.models.reference import load_classifier
from diffquant.outlier_tokens import apply_outlier_tokens, detect_outlier_tokens
from diffquant.ptq import auto_quantize, plan_from_spec, quantize_model
from diffquant.quant.plan import LayerPlan, packed_weight_bytes
from diffquant.sampling import Trajectories, denoiser_outputs
from diffquant.spec import CompressionSpec, load_spec

UNIFORM = {
    "W8A8": ["quantize.weight.bits=8", "quantize.activation.bits=8"],
    "W4A8": ["quantize.weight.bits=4", "quantize.weight.observer=mse", "quantize.activation.bits=8"],
}
MIXED = [
    "allocation={weight_bits: [2, 3, 4, 6, 8], activation_bits: [8], budget: {avg_weight_bits: 4.0}}",
    "quantize.weight.observer=mse",
]


class Bench:
    """Shared evaluation state of one model: calibration set, SQNR inputs, FP result."""

    def __init__(self, model: DiffusionModel, args: argparse.Namespace) -> None:
        self.model, self.args = model, args
        self.classifier = load_classifier()
        self.real = load_digits_split().held_out_images
        self.base = load_spec(
            overrides=[f"model.name={model.name}", f"sampler.steps={args.steps}", f"evaluate.samples={args.samples}"]
        )
        cal = self.base.calibration
        pool = collect_pool(model, cal.trajectories, args.steps, cal.seed)
        features = pool_features(model.unet, pool, model.conditional, model.family_info.feature_module)
        chosen = select(pool, cal.strategy, cal.size, cal.seed, features)
        self.calib = subset(pool, chosen)
        self.sqnr_in = subset(pool, held_out_indices(len(pool), chosen, 256, cal.seed))
        self.fp_out = denoiser_outputs(model.unet, self.sqnr_in)
        self.fp_bytes = sum(p.numel() * 4 for p in model.unet.parameters())
        self.fp: EvalResult | None = None

    def evaluate(self, model: DiffusionModel, seed: int = 0, paired: bool = True) -> EvalResult:
        """Sample ``model`` and score it (paired metrics against the FP result when ``paired``)."""
        a = self.args
        return evaluate_model(
            model,
            a.samples,
            a.steps,
            seed,
            1000,
            self.classifier,
            self.real,
            fp=self.fp if paired else None,
            sqnr_inputs=self.sqnr_in if paired else None,
            fp_outputs=self.fp_out if paired else None,
        )

    def fp_rows(self, label: str) -> list[dict]:
        """Rows for the FP model at noise seeds 0 and 1 (sets the FP reference)."""
        rows = []
        start = time.perf_counter()
        self.fp = self.evaluate(self.model, paired=False)
        rows.append(self.row(f"{label} FP32", self.fp, self.fp_bytes, start))
        start = time.perf_counter()
        second = self.evaluate(self.model, seed=1)
        rows.append(self.row(f"{label} FP32, noise seed 1 (noise floor)", second, self.fp_bytes, start))
        return rows

    def quantized_row(self, label: str, spec: CompressionSpec, plan: LayerPlan, start: float) -> dict:
        """Quantize with ``plan``, calibrate, evaluate and return the row."""
        quantized = quantize_model(self.model, plan, self.calib, spec.calibration)
        result = self.evaluate(quantized)
        return self.row(label, result, packed_weight_bytes(self.model.unet, plan)["packed"], start)

    def row(self, label: str, result: EvalResult, size: int, start: float) -> dict:
        """One table row (also printed)."""
        row = {
            "name": label,
            "bytes": size,
            "size_ratio": size / self.fp_bytes,
            "seconds": time.perf_counter() - start,
            **result.metrics,
        }
        print(
            f"{label:60s} acc {row.get('accuracy', float('nan')):.4f} fd_real {row.get('fd_real', float('nan')):.2f} "
            f"sqnr {row.get('sqnr_db', float('nan')):.1f}",
            flush=True,
        )
        return row


def uniform_and_mixed(bench: Bench, label: str) -> list[dict]:
    rows = []
    for name, overrides in UNIFORM.items():
        start = time.perf_counter()
        spec = load_spec(overrides=[f"model.name={bench.model.name}", *overrides, "quantize.outlier_tokens=off"])
        plan = plan_from_spec(bench.model, spec.quantize, spec.calibration.observer)
        rows.append(bench.quantized_row(f"{label} {name} uniform (family FP defaults)", spec, plan, start))
    start = time.perf_counter()
    spec = load_spec(overrides=[f"model.name={bench.model.name}", f"sampler.steps={bench.args.steps}", *MIXED])
    assert spec.allocation is not None
    result = auto_quantize(
        copy.deepcopy(bench.model),
        spec.allocation,
        bench.calib,
        quantize_config=spec.quantize,
        calibration=spec.calibration,
        steps=spec.sampler.steps,
        seed=spec.evaluate.seed,
        classifier=bench.classifier,
    )
    row = bench.quantized_row(f"{label} mixed W4A8 (avg 4.0 weight bits)", spec, result.plan, start)
    row["avg_weight_bits"] = result.allocation.usage.get("avg_weight_bits")
    rows.append(row)
    return rows


def bos_rows(bench: Bench, label: str) -> tuple[list[dict], dict]:
    """W8A8 / W4A8 with outlier tokens off and with the BOS token's keys/values in float."""
    rows = []
    found = detect_outlier_tokens(bench.model, bench.calib.labels, 1)
    detected = detect_outlier_tokens(bench.model, bench.calib.labels, "auto")
    for name, overrides in UNIFORM.items():
        spec = load_spec(overrides=[f"model.name={bench.model.name}", *overrides, "quantize.outlier_tokens=off"])
        plan = plan_from_spec(bench.model, spec.quantize, spec.calibration.observer)
        for variant, used in (
            ("outlier tokens off", plan),
            ("BOS keys/values in float", apply_outlier_tokens(plan, found)),
        ):
            start = time.perf_counter()
            rows.append(bench.quantized_row(f"{label} {name}, {variant}", spec, used, start))
    return rows, detected.to_dict()


def with_bos_outlier(model: DiffusionModel, calib: Trajectories, ratio: float) -> tuple[DiffusionModel, float]:
    """A copy of a text model whose encoder scales the BOS state to ``ratio`` x the others' absmax."""
    probe = detect_outlier_tokens(model, calib.labels, 1)
    absmax = torch.tensor(probe.position_absmax)
    scale = ratio * float(absmax[1:].median()) / float(absmax[0])
    variant = copy.deepcopy(model)

    def scale_bos(module, inputs, output):
        output.last_hidden_state[:, 0] *= scale
        return output

    variant.unet.text_encoder.register_forward_hook(scale_bos)
    variant.name = f"{model.name} (BOS x{scale:.1f})"
    return variant, scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--bos-ratio", type=float, default=60.0)
    parser.add_argument("--models", default="digits-dit,digits-t2i")
    args = parser.parse_args()
    rows: list[dict] = []
    extra: dict = {}
    total = time.perf_counter()
    for name in args.models.split(","):
        bench = Bench(load_model(name), args)
        rows += bench.fp_rows(name)
        rows += uniform_and_mixed(bench, name)
        if bench.model.condition == "text":
            bos, extra["detection"] = bos_rows(bench, name)
            rows += bos
            variant, scale = with_bos_outlier(bench.model, bench.calib, args.bos_ratio)
            extra["injected_scale"] = scale
            injected = Bench(variant, args)
            label = f"{name} with BOS outlier x{args.bos_ratio:g}"
            rows += injected.fp_rows(label)[:1]
            more, extra["injected_detection"] = bos_rows(injected, label)
            rows += more
    seconds = time.perf_counter() - total
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "zoo.json").write_text(
        json.dumps({"machine": machine(), "seconds": seconds, "rows": rows, **extra}, indent=2)
    )
    detection = extra.get("detection", {})
    lines = [
        "## digits-dit and digits-t2i: FP, uniform, mixed precision, BOS-aware",
        "",
        f"Command: `.venv/bin/python bench/zoo.py` ({args.samples} samples, DDIM {args.steps}, noise seed 0; "
        f"calibration: 256 inputs chosen by density_diversity from 64 FP trajectories; {seconds / 60:.0f} min in all). "
        f"Machine: {machine()}.",
        "Accuracy: the digits classifier's agreement with the requested digit (digits-t2i: prompts in phrasings "
        "held out of training). FD to real / to FP on classifier features (comparable only at the same sample count). "
        "Size: all parameters, quantized weights bit-packed, as a share of FP32.",
    ]
    if detection:
        lines.append(
            f"digits-t2i outlier-token detection: position 0's absmax is {detection['ratio']:.2f}x the median of the "
            f"other positions' (threshold 4), so `outlier_tokens: auto` keeps {detection['count']} token(s) in float. "
            f"The 'with BOS outlier' rows scale the encoder's BOS state by {extra['injected_scale']:.1f} "
            f"(to {args.bos_ratio:g}x the others, like SD's CLIP) - a different FP model with its own FP row."
        )
    lines += [
        "",
        "| model | accuracy | FD to real | FD to FP | PSNR vs FP (dB) | SQNR (dB) | x FP32 size | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = partial(cell, r)
        lines.append(
            f"| {r['name']} | {f('accuracy', '{:.4f}')} | {f('fd_real', '{:.2f}')} | {f('fd_fp', '{:.2f}')} | "
            f"{f('psnr', '{:.1f}')} | {f('sqnr_db', '{:.1f}')} | {r['size_ratio']:.3f} | {r['seconds']:.0f} |"
        )
    replace_section("zoo", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
