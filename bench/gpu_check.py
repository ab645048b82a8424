"""End to end on one GPU through the library API: SD 1.5's U-Net at full width, bfloat16, guidance 7.5, 20 steps.

The SD 1.5-layout pipeline of :mod:`sd_layout` (random weights; at ``--width 1`` its U-Net has
SD 1.5's 859.5M parameters; 64x64 latents; a 1-layer CLIP text encoder; a tiny 2-level VAE, so
that it is a latent model as SD is: samples are not clamped and are decoded for the image metrics,
``--no-vae`` leaves it out) is written to a temporary folder and put through the library API only (``diffquant.load_model``, ``collect_pool``,
``select_calibration``, ``quantize``, ``export_onnx``, ``check_parity`` and the core's
``evaluate_model``): neither Prefect nor MLflow is imported, which the script asserts at the end
through ``sys.modules``. It needs torch (with CUDA for ``--device cuda``), diffusers,
transformers, onnx and onnxruntime besides diffquant's core dependencies.

Stages, each timed, with its peak memory (``torch.cuda.max_memory_allocated``, reset at the
stage's start, on a GPU; the sampled RSS always):

1. ``write_model``: the random-weight pipeline (not part of a user's run; reported apart);
2. ``load``: ``load_model(path=..., device=..., dtype=...)``;
3. ``collect_pool``: ``--trajectories`` guided DDIM trajectories (both halves recorded);
4. ``select_calibration``: density-diversity selection of ``--size`` inputs, ``--sqnr-inputs`` held out;
5. ``evaluate_fp``: ``--samples`` guided samples and the FP outputs on the held-out inputs;
6. ``quantize``: W8A8 uniform (``QuantizeSpec()``), ranges from the calibration set;
7. ``evaluate_quantized``: the same samples from the same noise; PSNR/SSIM of the decoded images
   and of the latents against FP's, SQNR of the denoiser outputs;
8. ``agreement``: the fake-quant denoiser on ``--agreement-inputs`` calibration inputs (spread
   over the set) on the device in the run's dtype, then the same module (the same quantized
   weights and scales) moved to the CPU in float32: max absolute error, max error / max |CPU
   output|, and relative L2 error of the device's outputs against the CPU's. On a GPU also a
   float32 copy on the GPU against the CPU (the device difference without the dtype's);
9. ``export`` (``--export``): ``export_onnx`` of the CPU float32 module and ``check_parity`` on
   ``--parity-inputs`` calibration inputs (outputs only).

Prints a table and writes ``bench/results/gpu_check.json`` (``gpu_check_cpu.json`` on the CPU, or
``--out``); ``--benchmarks`` also writes the ``gpu-check`` section of BENCHMARKS.md
(``gpu-check-cpu`` for a CPU run, so a CPU smoke never replaces GPU numbers).

Run on a GPU (should finish in under 8 minutes): ``python bench/gpu_check.py --benchmarks``;
add ``--export`` for the ONNX export and parity (traced and checked on the CPU, minutes at full
width). On a CPU, at a tiny width (as ``tests/integration/test_gpu_check.py`` does):
``python bench/gpu_check.py --device cpu --width 0.03125 --sample-size 16 --steps 2``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from common import ROOT, replace_section
from sd_layout import save_sd_layout, unet_parameters, write_prompts

import diffquant
from diffquant.evaluation import evaluate_model
from diffquant.memory import PeakMemory
from diffquant.sampling import Trajectories, denoiser_outputs
from diffquant.spec import CalibrationSpec, QuantizeSpec, SamplerSpec

FORBIDDEN = ("prefect", "mlflow")


class Stages:
    """Seconds and peak memory of named blocks of work."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.records: dict[str, dict[str, Any]] = {}

    @contextmanager
    def stage(self, name: str):
        """Time the block and measure its peak memory; print one line when it ends."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        with PeakMemory(self.device) as peak:
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        use = peak.result
        assert use is not None
        self.records[name] = {
            "seconds": time.perf_counter() - start,
            "peak_rss_mb": use.peak_rss_bytes / 2**20,
            "peak_cuda_mb": None if use.peak_cuda_bytes is None else use.peak_cuda_bytes / 2**20,
        }
        print(f"{name}: {self.records[name]['seconds']:.1f} s", flush=True)


def errors(output: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """How far ``output`` is from ``reference``: max abs, max abs / max |reference|, relative L2."""
    diff = (output.double() - reference.double()).abs()
    scale = float(reference.double().abs().max()) or 1.0
    return {
        "max_abs": float(diff.max()),
        "max_abs_over_max_ref": float(diff.max()) / scale,
        "relative_l2": float(diff.norm() / (reference.double().norm() or 1.0)),
        "reference_max_abs": scale,
    }


def spread(traj: Trajectories, n: int) -> Trajectories:
    """``n`` inputs of ``traj`` spread evenly over it (the calibration set is in pool order: over the steps)."""
    index = torch.linspace(0, len(traj) - 1, min(n, len(traj))).round().long()
    return Trajectories(traj.x[index], traj.t[index], traj.labels[index])


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's description."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every stage; the record the JSON holds."""
    device = torch.device(args.device)
    stages = Stages(device)
    sampler = SamplerSpec(name="ddim", steps=args.steps, guidance=args.guidance)
    calibration = CalibrationSpec(size=args.size, batch_size=args.batch, trajectories=args.trajectories)
    stored = torch.bfloat16 if args.width >= 0.5 else torch.float32  # halves the folder at full width
    with stages.stage("write_model"):
        folder = save_sd_layout(
            work / "sd", args.width, args.sample_size, args.text_layers, 0, stored, vae=not args.no_vae
        )
        prompts = write_prompts(work / "prompts.txt")
    with stages.stage("load"):
        model = diffquant.load_model(path=folder, prompts=prompts, device=args.device, dtype=args.dtype)
    with stages.stage("collect_pool"):
        pool = diffquant.collect_pool(model, args.trajectories, sampler, seed=0, batch_size=args.batch)
    with stages.stage("select_calibration"):
        chosen = diffquant.select_calibration(pool, model, calibration, sqnr_inputs=args.sqnr_inputs)
    with stages.stage("evaluate_fp"):
        fp = evaluate_model(model, args.samples, sampler, 0, args.batch, None, None, description="Sampling (fp)")
        fp_outputs = denoiser_outputs(model.unet, chosen.sqnr, model.conditional, args.batch)
    with stages.stage("quantize"):
        result = diffquant.quantize(model, QuantizeSpec(), chosen.calibration, calibration=calibration)
    with stages.stage("evaluate_quantized"):
        quantized = evaluate_model(
            model,
            args.samples,
            sampler,
            0,
            args.batch,
            None,
            None,
            fp=fp,
            sqnr_inputs=chosen.sqnr,
            fp_outputs=fp_outputs,
            description="Sampling (quantized)",
        )
    inputs = spread(chosen.calibration, args.agreement_inputs)
    agreement: dict[str, Any] = {"inputs": len(inputs)}
    with stages.stage("agreement"):
        on_device = denoiser_outputs(model.unet, inputs, model.conditional, args.batch)
        model.to("cpu", torch.float32)  # the same quantized weights and scales, in float32 on the CPU
        on_cpu = denoiser_outputs(model.unet, inputs, model.conditional, args.batch)
        agreement[f"{device.type}_{args.dtype}_vs_cpu_float32"] = errors(on_device, on_cpu)
        if device.type == "cuda":
            copied = dataclasses.replace(model, unet=copy.deepcopy(model.unet)).to(device, torch.float32)
            on_device32 = denoiser_outputs(copied.unet, inputs, model.conditional, args.batch)
            agreement["cuda_float32_vs_cpu_float32"] = errors(on_device32, on_cpu)
            del copied
    parity = None
    if args.export:
        with stages.stage("export"):
            info = diffquant.export_onnx(model, result.plan, work / "onnx" / "model.onnx")
            config = diffquant.ParityConfig(samples=0, batch_size=args.batch)
            report = diffquant.check_parity(info.path, model, spread(chosen.calibration, args.parity_inputs), config)
            outputs = report.outputs
            parity = {
                "passed": report.passed,
                "provider": report.provider,
                "inputs": args.parity_inputs,
                "max_abs": outputs.max_abs,
                "p999_abs": outputs.p999_abs,
                "fraction_over": outputs.fraction_over,
                "tolerance": outputs.tolerance,
                "failures": report.failures(),
            }
    loaded = sorted({m.split(".")[0] for m in sys.modules} & set(FORBIDDEN))
    assert not loaded, f"the library API imported {', '.join(loaded)}"
    seconds = sum(v["seconds"] for k, v in stages.records.items() if k != "write_model")
    return {
        "device": device_name(device),
        "device_type": device.type,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "command": "python bench/gpu_check.py " + " ".join(sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "benchmarks")},
        "unet_parameters": unet_parameters(args.width),
        "pool": len(pool),
        "quantized_layers": len(result.plan.quantized_layers()),
        "stages": stages.records,
        "seconds_without_write": seconds,
        "metrics": {"fp": fp.metrics, "quantized": quantized.metrics},
        "agreement": agreement,
        "parity": parity,
        "forbidden_modules_loaded": loaded,
    }


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def table(record: dict[str, Any]) -> str:
    """The record as markdown: stage times and memory, metrics, agreement."""
    s = record["settings"]
    lines = [
        f"`{record['command']}`; {record['device']}, {record['dtype']}, torch {record['torch']}; U-Net "
        f"{record['unet_parameters'] / 1e6:.1f}M parameters (width {s['width']:g}), {s['sample_size']}x{s['sample_size']} "
        f"latents, guidance {s['guidance']:g}, {s['steps']} DDIM steps, pool of {record['pool']} inputs "
        f"({s['trajectories']} trajectories), {s['size']} calibration inputs, {s['samples']} samples, W8A8 uniform "
        f"({record['quantized_layers']} layers quantized). Library API only; prefect/mlflow imported: "
        f"{', '.join(record['forbidden_modules_loaded']) or 'none'}.",
        "",
        "| stage | seconds | peak GPU MB (torch) | peak RSS MB |",
        "|---|---|---|---|",
    ]
    for name, r in record["stages"].items():
        lines.append(f"| {name} | {r['seconds']:.1f} | {_mb(r['peak_cuda_mb'])} | {_mb(r['peak_rss_mb'])} |")
    lines.append(f"| total without write_model | {record['seconds_without_write']:.1f} | | |")
    q = record["metrics"]["quantized"]
    lines += [
        "",
        "Quantized vs FP: "
        + ", ".join(f"{k} {v:.4g}" for k, v in q.items() if isinstance(v, float) and math.isfinite(v))
        + ".",
        "",
        f"Agreement of the fake-quant denoiser on {record['agreement']['inputs']} calibration inputs:",
        "",
        "| comparison | max abs | max abs / max abs(CPU) | relative L2 |",
        "|---|---|---|---|",
    ]
    for name, e in record["agreement"].items():
        if isinstance(e, dict):
            lines.append(f"| {name} | {e['max_abs']:.3g} | {e['max_abs_over_max_ref']:.3g} | {e['relative_l2']:.3g} |")
    if record["parity"] is not None:
        p = record["parity"]
        lines += [
            "",
            f"ONNX parity ({p['provider']}, {p['inputs']} inputs): {'passed' if p['passed'] else 'FAILED'}, max abs "
            f"{p['max_abs']:.3g}, p99.9 {p['p999_abs']:.3g}, {p['fraction_over']:.2e} over {p['tolerance']:.3g}.",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--width", type=float, default=1.0, help="fraction of SD 1.5's channels (1: 859.5M params)")
    parser.add_argument("--sample-size", type=int, default=64, help="latent height and width")
    parser.add_argument("--text-layers", type=int, default=1)
    parser.add_argument("--no-vae", action="store_true", help="no VAE: samples are not decoded (not a latent model)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--trajectories", type=int, default=4)
    parser.add_argument("--size", type=int, default=32, help="calibration inputs")
    parser.add_argument("--sqnr-inputs", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8, help="evaluation samples")
    parser.add_argument("--batch", type=int, default=16, help="denoiser inputs per forward")
    parser.add_argument("--agreement-inputs", type=int, default=8)
    parser.add_argument("--export", action="store_true", help="also export ONNX and check parity (on the CPU)")
    parser.add_argument("--parity-inputs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/gpu_check[_cpu].json)")
    parser.add_argument("--benchmarks", action="store_true", help="write the gpu-check section of BENCHMARKS.md")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="diffquant-gpu-check-") as work:
        record = run(args, Path(work))
    record["wall_s"] = time.perf_counter() - start
    cuda = record["device_type"] == "cuda"
    out = args.out or ROOT / "bench" / "results" / ("gpu_check.json" if cuda else "gpu_check_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    body = table(record)
    print(body)
    print(f"wall {record['wall_s']:.1f} s; wrote {out}")
    if args.benchmarks:
        title = "## GPU check: SD 1.5-layout U-Net end to end" if cuda else "## GPU check script, CPU smoke run"
        replace_section("gpu-check" if cuda else "gpu-check-cpu", f"{title}\n\n{body}")


if __name__ == "__main__":
    main()
