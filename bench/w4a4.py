"""W4A4 on digits-unet with today's tools: which layers carry the 4-bit input error, and what each recipe buys.

Part 1, per layer (cheap, no sampling): for every layer the W4A4 plan quantizes, the denoiser's
output SQNR (dB, on 256 pool inputs outside the calibration set) with only that layer's input at 4
bits (MSE range, weights float), and at 5 bits (what one more bit buys); the input's range over the
calibration set (min, max); the bits of the symmetric grid the input leaves unused
(``log2(2 max|x| / (max - min))``: about 1 for a post-SiLU input, whose minimum is -0.28) and the
clipping ratio the MSE search chose (``scale * 7 / max|x|``).

Part 2, recipes (the same evaluation as bench/quality.py: 2,000 samples, DDIM 50, noise seed 0):
the error split (W4 with A8, A4 with W8), observers, GPTQ weights, the ``--keep`` most sensitive
inputs of part 1 at 8 bits, and fine-tuning settings. Each row is a spec run by bench/hard_end.py's
harness (library API, as ``diffquant compress``).

Writes ``bench/results/w4a4.json`` and the ``w4a4`` section of BENCHMARKS.md.

Run: ``.venv/bin/python bench/w4a4.py`` (``--part 1`` for the layer table alone, a few minutes;
``--rows`` picks recipe rows by index).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch
from common import ROOT, machine, replace_section, write_results
from hard_end import MSE, W4A4, ModelBench, Row, merged, results_name, run_rows, store, table
from torch import nn

from diffquant.metrics import sqnr_db
from diffquant.models.loading import load_model
from diffquant.ptq import plan_from_spec
from diffquant.quant.modules import QuantConv2d, QuantLinear
from diffquant.quant.plan import set_module
from diffquant.sampling import Trajectories, denoiser_outputs
from diffquant.spec import load_spec

MODEL = "digits-unet"
GROUP = "W4A4 recipes"
GPTQ = "quantize.weight.rounding=gptq"


def layer_inputs(bench: ModelBench, layers: list[str], calib: Trajectories) -> dict[str, torch.Tensor]:
    """Each layer's input over the calibration set, from the float model (what it sees when only it is quantized)."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    unet = bench.model.unet
    handles = [
        unet.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, name=name: seen[name].append(args[0].detach())
        )
        for name in layers
    ]
    try:
        denoiser_outputs(unet, calib, bench.model.conditional)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts) for name, parts in seen.items()}


def sqnr_bands(fp_out: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> dict[str, float]:
    """Denoiser-output SQNR over all inputs and over the noisy (t >= 500) and nearly clean (t < 500) ones."""
    late = t < 500
    return {
        "": sqnr_db(fp_out, out),
        "_noisy": sqnr_db(fp_out[~late], out[~late]),
        "_clean": sqnr_db(fp_out[late], out[late]),
    }


def layer_rows(bench: ModelBench) -> list[dict]:
    """Part 1: one row per quantized layer of the W4A4 plan, worst 4-bit input first."""
    spec = load_spec(overrides=[f"model.name={MODEL}", *W4A4, *MSE])
    calib, sqnr_in, fp_out = bench.calibration(spec)
    plan = plan_from_spec(bench.model, spec.quantize, "mse")
    layers = [name for name, cfg in plan.items() if cfg.activation is not None]
    inputs = layer_inputs(bench, layers, calib)
    unet = copy.deepcopy(bench.model.unet)
    rows = []
    for name in layers:
        x = inputs[name]
        lo, hi = float(x.min()), float(x.max())
        absmax = max(abs(lo), abs(hi))
        row = {"layer": name, "min": lo, "max": hi, "unused_bits": math.log2(2 * absmax / (hi - lo))}
        original = unet.get_submodule(name)
        cls = QuantLinear if isinstance(original, nn.Linear) else QuantConv2d
        for bits in (4, 5):
            layer = cls.from_float(original, None, bits, act_observer="mse")
            layer.input_quantizer.start_observing()
            layer.input_quantizer(x)
            layer.input_quantizer.finish_observing()
            set_module(unet, name, layer)
            try:
                out = denoiser_outputs(unet, sqnr_in, bench.model.conditional)
            finally:
                set_module(unet, name, original)
            row.update({f"sqnr_a{bits}{band}": v for band, v in sqnr_bands(fp_out, out, sqnr_in.t).items()})
            if bits == 4:
                row["clip_ratio"] = float(layer.input_quantizer.scale) * 7 / absmax
        rows.append(row)
        print(
            f"{name:55s} A4 {row['sqnr_a4']:6.1f} dB (t>=500 {row['sqnr_a4_noisy']:6.1f}, t<500 {row['sqnr_a4_clean']:6.1f}) "
            f"A5 {row['sqnr_a5']:6.1f} dB  unused {row['unused_bits']:.2f} bits  clip {row['clip_ratio']:.2f}",
            flush=True,
        )
    return sorted(rows, key=lambda r: r["sqnr_a4"])


def keep_a8(layers: list[str]) -> str:
    """The override that keeps ``layers``' inputs at 8 bits (weights stay at 4)."""
    return f"quantize.overrides=[{{layers: [{', '.join(layers)}], weight_bits: 4, activation_bits: 8}}]"


def recipe_rows(worst: list[str], keep: int) -> list[Row]:
    """Part 2's rows: error split, observers, GPTQ, sensitive inputs at A8, fine-tuning."""
    top = keep_a8(worst[:keep])
    finetune = "finetune={steps: 1500, batch_size: 32, lr: 0.001, scale_lr: 0.0001, rank: 4}"
    rows = [
        ("W4A8, MSE ranges (weight error alone)", ("quantize.weight.bits=4", "quantize.activation.bits=8", *MSE)),
        ("W8A4, MSE ranges (input error alone)", ("quantize.weight.bits=8", "quantize.activation.bits=4", *MSE)),
        ("W4A4, MSE ranges", (*W4A4, *MSE)),
        (
            "W4A4, MSE weights, percentile inputs",
            (*W4A4, "quantize.weight.observer=mse", "calibration.observer=percentile"),
        ),
        ("W4A4, MSE ranges, 512 calibration inputs", (*W4A4, *MSE, "calibration.size=512")),
        ("W4A4, MSE ranges, GPTQ weights", (*W4A4, *MSE, GPTQ)),
        (f"W4A4, MSE ranges, the {keep} worst inputs at A8", (*W4A4, *MSE, top)),
        (f"W4A4, MSE ranges, GPTQ, the {keep} worst inputs at A8", (*W4A4, *MSE, GPTQ, top)),
        ("W4A4, MSE ranges, fine-tuned 1500 steps", (*W4A4, *MSE, finetune)),
        ("W4A4, MSE ranges, GPTQ, fine-tuned 1500 steps", (*W4A4, *MSE, GPTQ, finetune)),
    ]
    return [Row(GROUP, MODEL, label, overrides) for label, overrides in rows]


def layer_table(rows: list[dict], count: int) -> list[str]:
    lines = [
        "| layer | input min | input max | unused grid bits | MSE clip ratio | SQNR A4 only (dB) | t >= 500 | t < 500 "
        "| SQNR A5 only (dB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows[:count]:
        lines.append(
            f"| {r['layer']} | {r['min']:.2f} | {r['max']:.2f} | {r['unused_bits']:.2f} | {r['clip_ratio']:.2f} | "
            f"{r['sqnr_a4']:.1f} | {r['sqnr_a4_noisy']:.1f} | {r['sqnr_a4_clean']:.1f} | {r['sqnr_a5']:.1f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--part", type=int, choices=(1, 2), default=None, help="run one part only")
    parser.add_argument("--keep", type=int, default=4, help="worst inputs kept at 8 bits in the recipe rows")
    parser.add_argument("--rows", default=None, help="comma-separated recipe row indices (default: all)")
    parser.add_argument("--show", type=int, default=15, help="layers listed in the table")
    args = parser.parse_args()
    start = time.perf_counter()
    layers_path = ROOT / "bench" / "results" / "w4a4_layers.json"
    bench = ModelBench(load_model(MODEL), args.samples, args.steps)
    if args.part == 2:
        layers = json.loads(layers_path.read_text())["layers"] if layers_path.is_file() else []
    else:
        layers = layer_rows(bench)
        write_results("w4a4_layers", {"machine": machine(), "layers": layers})
    name = results_name("w4a4", args.samples, args.steps)
    records = merged([], args.samples, name)
    if args.part != 1:
        rows = recipe_rows([r["layer"] for r in layers], args.keep)
        picked = [rows[int(i)] for i in args.rows.split(",")] if args.rows else rows
        if not layers and any(row.label.endswith("at A8") for row in picked):
            parser.error("rows that keep the worst inputs at A8 need the layer table: run --part 1 first")
        run_rows(
            [Row(GROUP, MODEL, "FP32"), *picked],
            args.samples,
            args.steps,
            Path(),
            lambda record: store(name, args.samples, args.steps, record | {"load_avg": os.getloadavg()[0]}),
        )
        order = {row.key: i for i, row in enumerate([Row(GROUP, MODEL, "FP32"), *rows])}
        records = sorted(merged([], args.samples, name), key=lambda r: order.get(r["key"], len(order)))
    seconds = time.perf_counter() - start
    post_silu = [r for r in layers if -0.2786 <= r["min"] < 0]
    lines = [
        "## W4A4 on digits-unet: where the 4-bit input error is, what each recipe buys",
        "",
        f"Command: `.venv/bin/python bench/w4a4.py` (this run {seconds / 60:.0f} min). Machine: {machine()}.",
        f"Per layer ({len(layers)} layers with a quantized input in the W4A4 plan; conv_in, conv_out and the time "
        f"embedding stay float): denoiser-output SQNR with only that layer's input quantized (MSE range, float "
        f"weights), on 256 pool inputs outside the calibration set; the {args.show} worst. {len(post_silu)} layers "
        "read a post-SiLU input (minimum -0.28), which leaves about one bit of the symmetric grid unused.",
        "",
        *layer_table(layers, args.show),
    ]
    if records:
        lines += [
            "",
            f"Recipes ({args.samples} samples, DDIM {args.steps}, the same evaluation as bench/quality.py; "
            f"'worst inputs' are the first {args.keep} layers of the table above):",
            "",
            *table(records, [GROUP]),
        ]
    if name == "w4a4":
        replace_section("w4a4", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
