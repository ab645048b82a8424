"""Activation shift, SmoothQuant and SVDQuant's low-rank branch on the reference models.

Part 1, layers (``shift`` rows): every layer whose input comes out of a SiLU / GELU / GEGLU (the
ResNet convolutions and time projections, DiT's adaLN and feed-forward output Linear, the
cross-attention U-Net's feed-forward output) has only its input quantized (weights in float,
per-tensor min-max over the calibration inputs, A8 / A6 / A4), once as is and once with the
per-channel shift, built as diffquant builds them (explicit padding included); the table gives the
mean SQNR of the layer outputs on those inputs and the gain.

Part 2, models: for each model and setting (W8A8: min-max weights and inputs; W4A8: MSE weights,
min-max inputs; W4A4: MSE weights and inputs), with the family's full-precision layers and the
default calibration set (256 inputs chosen from 64 FP trajectories), through ``diffquant.quantize``:
naive, shift, SmoothQuant alpha 0.5, SmoothQuant with the per-layer alpha search, SVDQuant
(smoothing 0.5 + rank ``--rank`` branch in float16) and everything (shift + searched smoothing +
branch). Every row samples ``--samples`` images with DDIM ``--steps`` from the same noise as FP.
Size: packed bytes over FP32; BitOps relative to the naive plan of the same setting.

Writes ``bench/results/outliers.json`` and the ``outliers`` section of BENCHMARKS.md.

Run: ``PYTHONPATH=bench .venv/bin/python bench/outliers.py`` (``--samples 500`` to explore;
``--models digits-unet`` and ``--settings W4A4`` to narrow it).
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import math
import time
from functools import partial

import torch
from common import cell, machine, replace_section, write_results
from torch import nn

import diffquant
from diffquant.calibration.pool import collect_pool, held_out_indices, subset
from diffquant.calibration.selection import pool_features, select
from diffquant.data import load_digits_split
from diffquant.evaluation import EvalResult, evaluate_model
from diffquant.mixed_precision.costs import layer_macs, plan_bitops
from diffquant.models.loading import DiffusionModel, load_model
from diffquant.models.reference import load_classifier
from diffquant.quant.plan import ActivationConfig, LayerConfig, LayerPlan, apply_plan
from diffquant.sampling import denoiser_outputs
from diffquant.spec import load_spec

SETTINGS = {
    "W8A8": ["quantize.weight.bits=8", "quantize.activation.bits=8"],
    "W4A8": ["quantize.weight.bits=4", "quantize.weight.observer=mse", "quantize.activation.bits=8"],
    "W4A4": [
        "quantize.weight.bits=4",
        "quantize.weight.observer=mse",
        "quantize.activation.bits=4",
        "calibration.observer=mse",
    ],
}
METHODS = {
    "naive": ("naive", []),
    "shift": ("shift", ["quantize.activation.shift=channel"]),
    "smooth": ("smooth 0.5", ["quantize.smooth={alpha: 0.5}"]),
    "search": ("smooth searched", ["quantize.smooth={search: true}"]),
    "svd": (
        "SVDQuant (smooth 0.5 + rank RANK)",
        ["quantize.smooth={alpha: 0.5}", "quantize.low_rank={rank: RANK}"],
    ),
    "combo": (
        "shift + smooth 0.5 + rank RANK",
        ["quantize.activation.shift=channel", "quantize.smooth={alpha: 0.5}", "quantize.low_rank={rank: RANK}"],
    ),
    "all": (
        "all (shift + searched smooth + rank RANK)",
        ["quantize.activation.shift=channel", "quantize.smooth={search: true}", "quantize.low_rank={rank: RANK}"],
    ),
}
"""Method key -> (row label, spec overrides); ``RANK`` is ``--rank``."""
ACTIVATED = {
    "digits-unet": {"post-SiLU": ["*resnets.*.conv1", "*resnets.*.conv2", "*time_emb_proj"]},
    "digits-dit": {"post-SiLU": ["*norm1.linear"], "post-GELU": ["*ff.net.2"]},
    "digits-t2i": {
        "post-SiLU": ["*resnets.*.conv1", "*resnets.*.conv2", "*time_emb_proj"],
        "post-GEGLU": ["*ff.net.2"],
    },
}
LAYER_BITS = (8, 6, 4)


class Bench:
    """Calibration set, SQNR inputs and the FP result of one model."""

    def __init__(self, model: DiffusionModel, args: argparse.Namespace) -> None:
        self.model, self.args = model, args
        self.classifier = load_classifier()
        self.real = load_digits_split().held_out_images
        base = load_spec(overrides=[f"model.name={model.name}", f"sampler.steps={args.steps}"])
        cal = base.calibration
        pool = collect_pool(model, cal.trajectories, args.steps, cal.seed)
        features = pool_features(model.unet, pool, model.conditional, model.family_info.feature_module)
        chosen = select(pool, cal.strategy, cal.size, cal.seed, features)
        self.calib = subset(pool, chosen)
        self.sqnr_in = subset(pool, held_out_indices(len(pool), chosen, 256, cal.seed))
        self.fp_out = denoiser_outputs(model.unet, self.sqnr_in)
        self.fp_bytes = sum(p.numel() * 4 for p in model.unet.parameters())
        x, t, y = self.calib.x[:1], self.calib.t[:1], self.calib.labels[:1]
        self.macs = layer_macs(model.unet, (x, t, y if model.conditional else None))
        self.fp = None if args.sqnr_only else self.evaluate(model, paired=False)

    def sqnr(self, model: DiffusionModel) -> dict[str, float]:
        """SQNR (dB) of the denoiser's output on the held-out pool inputs, against FP (no sampling)."""
        out = denoiser_outputs(model.unet, self.sqnr_in, model.conditional)
        noise = float((out - self.fp_out).pow(2).sum())
        return {"sqnr_db": 10 * math.log10(float(self.fp_out.pow(2).sum()) / max(noise, 1e-30))}

    def evaluate(self, model: DiffusionModel, paired: bool = True) -> EvalResult:
        """Sample ``model`` and score it (paired metrics against the FP result when ``paired``)."""
        a = self.args
        return evaluate_model(
            model,
            a.samples,
            a.steps,
            0,
            1000,
            self.classifier,
            self.real,
            fp=self.fp if paired else None,
            sqnr_inputs=self.sqnr_in if paired else None,
            fp_outputs=self.fp_out if paired else None,
        )


def _layer_inputs(unet: nn.Module, names: list[str], calib, conditional: bool) -> dict[str, torch.Tensor]:
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [
        unet.get_submodule(name).register_forward_pre_hook(lambda _m, args, name=name: inputs[name].append(args[0]))
        for name in names
    ]
    try:
        with torch.no_grad():
            denoiser_outputs(unet, calib, conditional, 256)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(values) for name, values in inputs.items()}


def _sqnr(layer: nn.Module, x: torch.Tensor, bits: int, shift: bool) -> float:
    """SQNR (dB) of the layer's output with only its input quantized (per tensor, min-max), as diffquant builds it."""
    holder = nn.Module()
    holder.layer = copy.deepcopy(layer)
    apply_plan(holder, LayerPlan({"layer": LayerConfig(None, ActivationConfig(bits), shift=shift)}))
    quantized = holder.layer
    with torch.no_grad():
        if shift:
            axis = -1 if isinstance(layer, nn.Linear) else 1
            rows = x.movedim(axis, -1).reshape(-1, x.shape[axis])
            lo, hi = rows.amin(0), rows.amax(0)
            if quantized.input_transform.pad is not None:  # zero padding: the layer sees zeros too
                lo, hi = lo.clamp(max=0), hi.clamp(min=0)
            quantized.input_transform.shift.copy_((lo + hi) / 2)
        quantized.input_quantizer.start_observing()
        quantized(x)
        quantized.input_quantizer.finish_observing()
        reference, output = layer(x), quantized(x)
    return 10 * math.log10(float(reference.pow(2).sum()) / float((output - reference).pow(2).sum()))


def layer_rows(bench: Bench) -> list[dict]:
    """Part 1: mean SQNR of post-activation layers' outputs, input-only quantization, with and without shift."""
    rows = []
    unet = bench.model.unet
    for kind, patterns in ACTIVATED[bench.model.name].items():
        names = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        inputs = _layer_inputs(unet, names, bench.calib, bench.model.conditional)
        for bits in LAYER_BITS:
            plain = [_sqnr(unet.get_submodule(n), inputs[n], bits, False) for n in names]
            shifted = [_sqnr(unet.get_submodule(n), inputs[n], bits, True) for n in names]
            row = {
                "model": bench.model.name,
                "inputs": kind,
                "layers": len(names),
                "bits": bits,
                "sqnr_db": sum(plain) / len(plain),
                "sqnr_shift_db": sum(shifted) / len(shifted),
                "min_gain_db": min(s - p for s, p in zip(shifted, plain, strict=True)),
            }
            rows.append(row)
            print(
                f"{row['model']:12s} {kind:11s} A{bits} {len(names):3d} layers: SQNR {row['sqnr_db']:.1f} -> "
                f"{row['sqnr_shift_db']:.1f} dB (min gain {row['min_gain_db']:+.1f})",
                flush=True,
            )
    return rows


def model_rows(bench: Bench, settings: list[str], methods: list[str], rank: int) -> list[dict]:
    """Part 2: every (setting, method) through diffquant.quantize, sampled and scored."""
    rows = []
    name = bench.model.name
    for setting in settings:
        naive_bitops = None
        for method in methods:
            label, extra = METHODS[method]
            overrides = [f"model.name={name}", *SETTINGS[setting], *(o.replace("RANK", str(rank)) for o in extra)]
            spec = load_spec(overrides=overrides)
            start = time.perf_counter()
            quantized = copy.deepcopy(bench.model)
            result = diffquant.quantize(quantized, spec.quantize, bench.calib, calibration=spec.calibration)
            quantize_seconds = time.perf_counter() - start
            metrics = bench.sqnr(quantized) if bench.args.sqnr_only else bench.evaluate(quantized).metrics
            bitops = plan_bitops(bench.model.unet, result.plan, bench.macs)
            naive_bitops = naive_bitops or bitops
            folded = sum(1 for c in result.plan.values() if c.smooth is not None and c.smooth.into is not None)
            smoothed = sum(1 for c in result.plan.values() if c.smooth is not None)
            row = {
                "model": name,
                "setting": setting,
                "method": label.replace("RANK", str(rank)),
                "size_ratio": result.packed_bytes / bench.fp_bytes,
                "bitops_ratio": bitops / naive_bitops,
                "smoothed": smoothed,
                "folded": folded,
                "quantize_seconds": quantize_seconds,
                **metrics,
            }
            rows.append(row)
            print(
                f"{name:12s} {setting} {row['method']:45s} acc {row.get('accuracy', float('nan')):.4f} "
                f"fd_real {row.get('fd_real', float('nan')):.2f} "
                f"fd_fp {row.get('fd_fp', float('nan')):.2f} sqnr {row.get('sqnr_db', float('nan')):.1f} "
                f"size {row['size_ratio']:.3f} bitops x{row['bitops_ratio']:.3f} quantize {quantize_seconds:.0f} s",
                flush=True,
            )
    return rows


def _header(args: argparse.Namespace, seconds: float, title: str) -> list[str]:
    options = " ".join(
        f"--{k.replace('_', '-')} {v}" if not isinstance(v, bool) else f"--{k.replace('_', '-')}"
        for k, v in vars(args).items()
        if v and k != "no_write"
    )
    return [
        f"## {title}",
        "",
        f"Command: `PYTHONPATH=bench .venv/bin/python bench/outliers.py {options}` (DDIM {args.steps}; calibration: "
        f"the default 256 inputs chosen by density_diversity from 64 FP trajectories; {seconds / 60:.0f} min in all; "
        f"raw numbers in `bench/results/{_result_name(args)}.json`). Machine: {machine()}, shared with other jobs "
        "(seconds are wall time under that load; the quality columns do not depend on it).",
        "",
    ]


def _layer_table(layers: list[dict]) -> list[str]:
    lines = [
        "Layers whose input comes out of a SiLU / GELU / GEGLU, only the input quantized (per tensor, min-max), "
        "mean SQNR of the layer output over the calibration inputs:",
        "",
        "| model | inputs | layers | bits | SQNR dB | with shift dB | gain dB | smallest gain dB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in layers:
        gain = r["sqnr_shift_db"] - r["sqnr_db"]
        lines.append(
            f"| {r['model']} | {r['inputs']} | {r['layers']} | A{r['bits']} | {r['sqnr_db']:.1f} | "
            f"{r['sqnr_shift_db']:.1f} | {gain:+.1f} | {r['min_gain_db']:+.1f} |"
        )
    return [*lines, ""]


MODEL_NOTE = (
    "Family FP layers; W8A8 min-max, W4A8 MSE weights, W4A4 MSE weights and inputs. Size: packed bytes / FP32 "
    "bytes; BitOps relative to the naive row of the same setting (a branch charged at 16 x 16 bits); smoothed "
    "(folded): layers smoothed, and how many of them fold 1/s into a norm or the previous layer."
)


def _survey_markdown(args: argparse.Namespace, layers: list[dict], models: list[dict], seconds: float) -> str:
    lines = _header(args, seconds, "Outlier methods, survey: denoiser-output SQNR (no sampling)")
    lines += _layer_table(layers)
    lines += [
        f"Whole models, SQNR of the denoiser output on 256 held-out pool inputs against FP. {MODEL_NOTE}",
        "",
        "| model | setting | method | SQNR dB | size | BitOps | smoothed (folded) | quantize s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in models:
        lines.append(
            f"| {r['model']} | {r['setting']} | {r['method']} | {r['sqnr_db']:.1f} | {r['size_ratio']:.3f} | "
            f"{r['bitops_ratio']:.3f} | {r['smoothed']} ({r['folded']}) | {r['quantize_seconds']:.0f} |"
        )
    return "\n".join(lines)


def _sampled_markdown(
    args: argparse.Namespace, fps: dict, layers: list[dict], models: list[dict], seconds: float
) -> str:
    lines = _header(args, seconds, "Outlier methods: activation shift, SmoothQuant, SVDQuant's low-rank branch")
    lines += _layer_table(layers) if layers else []
    lines += [
        f"Whole models, {args.samples} samples from the same noise as FP (seed 0). FD to real / to FP on classifier "
        f"features at this sample count. {MODEL_NOTE}",
        "",
        "| model | setting | method | accuracy | FD to real | FD to FP | SQNR dB | size | BitOps | smoothed (folded) "
        "| quantize s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, fp in fps.items():
        lines.append(f"| {name} | FP32 | - | {fp['accuracy']:.4f} | {fp['fd_real']:.2f} | - | - | 1.000 | - | - | - |")
        for r in (r for r in models if r["model"] == name):
            f = partial(cell, r)
            lines.append(
                f"| {name} | {r['setting']} | {r['method']} | {f('accuracy', '{:.4f}')} | {f('fd_real', '{:.2f}')} | "
                f"{f('fd_fp', '{:.2f}')} | {f('sqnr_db', '{:.1f}')} | {r['size_ratio']:.3f} | {r['bitops_ratio']:.3f} | "
                f"{r['smoothed']} ({r['folded']}) | {r['quantize_seconds']:.0f} |"
            )
    return "\n".join(lines)


def _result_name(args: argparse.Namespace) -> str:
    name = "outliers_survey" if args.sqnr_only else "outliers"
    return f"{name}_{args.tag}" if args.tag else name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--models", default="digits-unet,digits-dit,digits-t2i")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated: {', '.join(METHODS)}")
    parser.add_argument("--no-layers", action="store_true", help="skip part 1")
    parser.add_argument("--no-write", action="store_true", help="print only (exploring)")
    parser.add_argument("--tag", default="", help="suffix of the result file and BENCHMARKS.md section (partial runs)")
    parser.add_argument(
        "--sqnr-only", action="store_true", help="score by denoiser-output SQNR only (no sampling; a quick survey)"
    )
    args = parser.parse_args()
    start = time.perf_counter()
    layers, models, fps = [], [], {}
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    for name in args.models.split(","):
        bench = Bench(load_model(name), args)
        if bench.fp is not None:
            fps[name] = bench.fp.metrics
            print(f"{name:12s} FP32 acc {fps[name]['accuracy']:.4f} fd_real {fps[name]['fd_real']:.2f}", flush=True)
        if not args.no_layers:
            layers += layer_rows(bench)
        models += model_rows(bench, args.settings.split(","), methods, args.rank)
    seconds = time.perf_counter() - start
    if args.sqnr_only:
        markdown = _survey_markdown(args, layers, models, seconds)
    else:
        markdown = _sampled_markdown(args, fps, layers, models, seconds)
    print(markdown)
    if not args.no_write:
        record = {"machine": machine(), "args": vars(args), "seconds": seconds, "fp": fps, "layers": layers}
        write_results(_result_name(args), {**record, "models": models})
        replace_section(_result_name(args).replace("_", "-"), markdown)


if __name__ == "__main__":
    main()
