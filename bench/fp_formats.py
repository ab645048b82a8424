"""Floating-point formats on the reference models: FP8 W8A8 vs INT8 W8A8 vs FP32, and FP6 / FP4 weights.

For each model (digits-unet, digits-dit, digits-t2i): FP32 (noise seeds 0 and 1: the noise
floor), INT8 W8A8 and FP8 E4M3 W8A8, both with per-channel weights and per-tensor inputs (min-max
ranges, the family's full-precision defaults, outlier tokens off). The issue's target: FP8 W8A8
within 0.5 accuracy points of FP32 on every model.

On digits-unet also the other formats at 8-bit inputs: FP8 E5M2 W8A8; 6-bit weights as INT6,
FP6 E3M2 and FP6 E2M3 (per-channel scales); 4-bit weights as NVFP4 (E2M1 in blocks of 16, FP8
block scales, a float32 global scale) and as INT4 in groups of 16 (float32 scales). The NVFP4 row
quantizes the U-Net's convolutions too, which TensorRT would not run in FP4 (GEMM only): it
measures the format, not a deployable plan for it.

Every row samples ``--samples`` images with DDIM ``--steps`` from the same noise (seed 0), with the
calibration set and metrics of ``bench/zoo.py`` / ``bench/quality.py``. Writes
``bench/results/fp_formats.json`` and the ``fp_formats`` section of BENCHMARKS.md.

Run: ``.venv/bin/python bench/fp_formats.py`` (about 30 minutes on 2 idle cores). The FP rows of each model
run first (pool, calibration set, FP reference, saved to a temporary folder), then every quantized row
against them; ``--processes N`` runs both stages over N worker processes (rows are independent, so the
numbers do not depend on N; on a shared machine it takes a larger share of the cores).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import torch
from common import cell, machine, replace_section, write_results
from zoo import Bench

from diffquant.data import load_digits_split
from diffquant.evaluation import EvalResult
from diffquant.models.loading import load_model
from diffquant.models.reference import load_classifier
from diffquant.ptq import plan_from_spec
from diffquant.sampling import Trajectories
from diffquant.spec import load_spec
from diffquant.storage import load_safetensors, save_safetensors

W8A8 = ["quantize.weight.bits=8", "quantize.activation.bits=8"]
FP8 = ["quantize.weight.format=fp8_e4m3", "quantize.activation.format=fp8_e4m3", "export.device_class=ada"]
REQUIRED = {
    "INT8 W8A8": W8A8,
    "FP8 E4M3 W8A8": [*W8A8, *FP8],
}
NVFP4 = [
    "quantize.weight.bits=4",
    "quantize.weight.format=fp4_e2m1",
    "quantize.weight.granularity=per_group",
    "quantize.weight.group_size=16",
    "export.device_class=blackwell",
]
STUDY = {
    "FP8 E5M2 W8A8": [*W8A8, "quantize.weight.format=fp8_e5m2", "quantize.activation.format=fp8_e5m2"],
    "INT6 W6A8": ["quantize.weight.bits=6"],
    "FP6 E3M2 W6, A8 INT8": ["quantize.weight.bits=6", "quantize.weight.format=fp6_e3m2", "export.device_class=ada"],
    "FP6 E2M3 W6, A8 INT8": ["quantize.weight.bits=6", "quantize.weight.format=fp6_e2m3", "export.device_class=ada"],
    "INT4 W4 (groups of 16), A8 INT8": [
        "quantize.weight.bits=4",
        "quantize.weight.granularity=per_group",
        "quantize.weight.group_size=16",
    ],
    "NVFP4 W4, A8 INT8": NVFP4,
    "NVFP4 W4, A8 FP8 E4M3": [*NVFP4, "quantize.activation.format=fp8_e4m3"],
}


def spec_for(model_name: str, overrides: list[str], steps: int):
    """The spec of one row (outlier tokens off, as the uniform rows of ``bench/zoo.py``).

    E5M2 runs on no device class, so its spec is validated with INT formats and the formats set after.
    """
    e5m2 = [o for o in overrides if o.endswith("fp8_e5m2")]
    base = [o for o in overrides if o not in e5m2]
    spec = load_spec(
        overrides=[f"model.name={model_name}", f"sampler.steps={steps}", *base, "quantize.outlier_tokens=off"]
    )
    if e5m2:
        quantize = spec.quantize.model_copy(
            update={
                "weight": spec.quantize.weight.model_copy(update={"format": "fp8_e5m2"}),
                "activation": spec.quantize.activation.model_copy(update={"format": "fp8_e5m2"}),
            }
        )
        spec = spec.model_copy(update={"quantize": quantize})
    return spec


class SavedBench(Bench):
    """A :class:`Bench` whose calibration set, SQNR inputs and FP reference come from :func:`prepare`'s folder."""

    def __init__(self, model, args: argparse.Namespace, folder: Path) -> None:
        self.model, self.args = model, args
        self.classifier = load_classifier()
        self.real = load_digits_split().held_out_images
        self.base = load_spec(overrides=[f"model.name={model.name}", f"sampler.steps={args.steps}"])
        data = load_safetensors(folder / f"{model.name}.safetensors")
        self.calib = Trajectories(data["calib_x"], data["calib_t"], data["calib_labels"])
        self.sqnr_in = Trajectories(data["sqnr_x"], data["sqnr_t"], data["sqnr_labels"])
        self.fp_out = data["fp_out"]
        self.fp_bytes = sum(p.numel() * 4 for p in model.unet.parameters())
        metrics = json.loads((folder / f"{model.name}.json").read_text())
        self.fp = EvalResult(data["fp_samples"], data.get("fp_labels"), metrics)


def prepare(name: str, args: argparse.Namespace, folder: Path) -> list[dict]:
    """Stage 1 for one model: calibration set, SQNR inputs, FP outputs and the FP rows, saved to ``folder``."""
    torch.set_num_threads(args.threads)
    bench = Bench(load_model(name), args)
    rows = bench.fp_rows(name)
    rows[1]["accuracy_points_vs_fp"] = 100 * (rows[1]["accuracy"] - rows[0]["accuracy"])
    assert bench.fp is not None
    tensors = {
        **{f"calib_{k}": v for k, v in bench.calib.to_tensors().items()},
        **{f"sqnr_{k}": v for k, v in bench.sqnr_in.to_tensors().items()},
        "fp_out": bench.fp_out,
        "fp_samples": bench.fp.samples,
    }
    if bench.fp.labels is not None:
        tensors["fp_labels"] = bench.fp.labels
    save_safetensors({k: v.contiguous() for k, v in tensors.items()}, folder / f"{name}.safetensors")
    (folder / f"{name}.json").write_text(json.dumps(bench.fp.metrics))
    return rows


def quantized_row(name: str, label: str, overrides: list[str], args: argparse.Namespace, folder: Path) -> dict:
    """Stage 2: one quantized row of ``name``, evaluated against the FP reference :func:`prepare` saved."""
    torch.set_num_threads(args.threads)
    bench = SavedBench(load_model(name), args, folder)
    start = time.perf_counter()
    spec = spec_for(name, overrides, args.steps)
    plan = plan_from_spec(bench.model, spec.quantize, spec.calibration.observer)
    row = bench.quantized_row(f"{name} {label}", spec, plan, start)
    row["accuracy_points_vs_fp"] = 100 * (row["accuracy"] - bench.fp.metrics["accuracy"])
    return row


def run_all(args: argparse.Namespace, folder: Path) -> list[dict]:
    """Both stages over ``args.processes`` worker processes; rows in model order, FP rows first."""
    names = args.models.split(",")
    jobs = [(name, label, overrides) for name in names for label, overrides in configs_for(name, args).items()]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.processes, mp_context=context) as pool:
        fp_rows = dict(zip(names, pool.map(prepare, names, [args] * len(names), [folder] * len(names)), strict=True))
        futures = [pool.submit(quantized_row, name, label, overrides, args, folder) for name, label, overrides in jobs]
        done = [future.result() for future in futures]
    rows: list[dict] = []
    for name in names:
        rows += fp_rows[name] + [row for (model, _, _), row in zip(jobs, done, strict=True) if model == name]
    return rows


def configs_for(name: str, args: argparse.Namespace) -> dict[str, list[str]]:
    """The quantized rows of ``name``: the required ones, and the format study on ``--study-model``."""
    return REQUIRED | (STUDY if name == args.study_model else {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--models", default="digits-unet,digits-dit,digits-t2i")
    parser.add_argument("--study-model", default="digits-unet", help="model that also gets the FP6/FP4/E5M2 rows")
    parser.add_argument("--processes", type=int, default=1, help="worker processes (rows run in parallel)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per worker")
    args = parser.parse_args()
    total = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fp-formats-") as tmp:
        rows = run_all(args, Path(tmp))
    seconds = time.perf_counter() - total
    write_results("fp_formats", {"machine": machine(), "seconds": seconds, "samples": args.samples, "rows": rows})
    lines = [
        "## Floating-point formats: FP8 W8A8 vs INT8 W8A8, FP6 and NVFP4 weights",
        "",
        f"Command: `.venv/bin/python bench/fp_formats.py` ({args.samples} samples, DDIM {args.steps}, noise seed 0; "
        f"calibration: 256 inputs chosen by density_diversity from 64 FP trajectories, min-max ranges; the family's "
        f"full-precision layers; outlier tokens off; {seconds / 60:.0f} min in all over {args.processes} worker "
        f"process(es) of {args.threads} thread(s); timings noisy: shared machine). Machine: {machine()}.",
        "Weights per output channel (NVFP4 and INT4-g16: blocks of 16 input channels), inputs per tensor. "
        "'pts vs FP' is the accuracy difference to the model's FP32 row in percentage points (target for FP8 "
        "W8A8: within 0.5). The NVFP4 rows on digits-unet quantize its convolutions too (a format study: "
        "TensorRT runs FP4 on GEMMs only). Size: all parameters, quantized weights bit-packed with their scales, "
        "as a share of FP32.",
        "",
        "| model | accuracy | pts vs FP | FD to real | FD to FP | PSNR vs FP (dB) | SQNR (dB) | x FP32 size | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = partial(cell, r)
        lines.append(
            f"| {r['name']} | {f('accuracy', '{:.4f}')} | {f('accuracy_points_vs_fp', '{:+.2f}')} | "
            f"{f('fd_real', '{:.2f}')} | {f('fd_fp', '{:.2f}')} | {f('psnr', '{:.1f}')} | {f('sqnr_db', '{:.1f}')} | "
            f"{r['size_ratio']:.3f} | {r['seconds']:.0f} |"
        )
    replace_section("fp_formats", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
