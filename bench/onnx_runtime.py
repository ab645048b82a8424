"""ONNX export on onnxruntime (CPU): our Q/DQ exports vs FP32 and vs onnxruntime's own quantize_static.

Part 1, digits-unet: FP32, our W8A8 (min-max, per-channel) and W4A8 (MSE) exports in TensorRT's
form, our W8A8 in the onnxruntime form (``export.target: onnxruntime``: output quantizers on the
Conv2d layers, UINT8 activations, INT32 biases, so onnxruntime fuses ``QLinearConv``), and
onnxruntime's ``quantize_static`` (QDQ, per-channel, symmetric activations and weights) on our FP32
export with the MinMax and Percentile calibrators, over all op types (its default) and restricted
to Conv/MatMul/Gemm, fed the same calibration inputs. For each: accuracy and FD to real digits of
DDIM samples drawn through onnxruntime (same noise for all), initializer bytes, file size, and
latency of one denoiser call at batch 1 and 32 (median of ``--runs`` after ``--warmup``).

Part 2, latency only: the same UNet2DModel design at 32x32 with untrained weights (seeded random
init, >= 10M parameters): FP32 vs our W8A8 exports (both forms) vs onnxruntime's best-configured
INT8 at batch 32, with the op types onnxruntime's optimizer leaves in each graph (what it fused).

Writes ``bench/results/export.json`` and the ``export`` section of BENCHMARKS.md (between its
``<!-- export:start -->`` / ``<!-- export:end -->`` markers). ``--part 1`` or ``--part 2`` runs one
part and keeps the other part's last results from the JSON; ``--scratch DIR`` keeps the ONNX files
(default: a fresh temporary folder).

Run: ``.venv/bin/python bench/onnx_runtime.py [--part 1|2|all]`` (part 1 about 10 minutes on 2
cores, ``--samples`` to shorten; part 2 about 5 minutes).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from common import ROOT, machine, replace_section, write_results

from diffquant.calibration.pool import collect_pool, subset
from diffquant.calibration.selection import pool_features, select
from diffquant.data import load_digits_split
from diffquant.evaluation import generate
from diffquant.export.onnx import export_onnx, onnx_weight_bytes
from diffquant.export.parity import OrtDenoiser, check_parity
from diffquant.export.rules import check_rules
from diffquant.metrics import condition_accuracy, frechet_distance
from diffquant.models.loading import DiffusionModel, load_model
from diffquant.models.reference import DIGITS_UNET_CONFIG, SCHEDULER_CONFIG, load_classifier
from diffquant.ptq import plan_from_spec, quantize_model
from diffquant.quant.plan import packed_weight_bytes
from diffquant.sampling import Trajectories
from diffquant.spec import load_spec

THREADS = 2
CONV_MATMUL = ["Conv", "MatMul", "Gemm"]
RESULTS = ROOT / "bench" / "results" / "export.json"
ORT_FORM = "ours W8A8 (onnxruntime form)"
ORT_FORM_PERCENTILE = "ours W8A8 (onnxruntime form, percentile)"
logger = logging.getLogger("bench.onnx_runtime")


def session(path: Path, optimized_path: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feeds(traj: Trajectories, batch: int) -> dict[str, np.ndarray]:
    idx = torch.arange(batch) % len(traj)
    return {
        "sample": traj.x[idx].numpy(),
        "timestep": traj.t[idx].numpy(),
        "class_labels": traj.labels[idx].numpy(),
    }


def latencies(
    paths: dict[str, Path], traj: Trajectories, batch: int, warmup: int, runs: int, rounds: int
) -> dict[str, list[float]]:
    """Milliseconds of one denoiser call at ``batch`` for each model, ``rounds`` x ``runs`` each.

    The rounds interleave the models, so that load from other processes on a shared machine hits
    every model alike; report the median.
    """
    inputs = feeds(traj, batch)
    sessions = {name: session(path) for name, path in paths.items()}
    for sess in sessions.values():
        for _ in range(warmup):
            sess.run(None, inputs)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, sess in sessions.items():
            for _ in range(runs):
                start = time.perf_counter()
                sess.run(None, inputs)
                times[name].append(1000 * (time.perf_counter() - start))
    return times


def fused_ops(path: Path) -> dict[str, int]:
    """Op types in the graph onnxruntime actually runs (after its optimizer)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "opt.onnx"
        session(path, out)
        counts = collections.Counter(n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node)
    keep = ("Conv", "MatMul", "Gemm", "QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QuantizeLinear")
    keep += ("DequantizeLinear", "MatMulNBits", "FusedConv", "QLinearAdd", "DynamicQuantizeMatMul", "FusedMatMul")
    return {k: v for k, v in sorted(counts.items()) if k in keep}


class Reader:
    """onnxruntime CalibrationDataReader over our calibration inputs, in batches."""

    def __init__(self, traj: Trajectories, batch: int = 32) -> None:
        self.batches = [
            {
                "sample": traj.x[i : i + batch].numpy(),
                "timestep": traj.t[i : i + batch].numpy(),
                "class_labels": traj.labels[i : i + batch].numpy(),
            }
            for i in range(0, len(traj), batch)
        ]
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch of inputs, None at the end."""
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return self.batches[self.position - 1]

    def rewind(self) -> None:
        """Start over."""
        self.position = 0


def ort_quantize(fp_path: Path, out: Path, traj: Trajectories, method: str, op_types: list[str] | None) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(fp_path),
        str(out),
        Reader(traj),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, method),
        op_types_to_quantize=op_types,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    return out


def sample_metrics(path: Path, model: DiffusionModel, args, classifier, real) -> dict[str, float]:
    ort_model = dataclasses.replace(model, unet=OrtDenoiser(session(path)))
    start = time.perf_counter()
    images, labels = generate(ort_model, args.samples, args.steps, 0, 500, "Sampling (onnxruntime)")
    return {
        "accuracy": condition_accuracy(classifier, images, labels),
        "fd_real": frechet_distance(classifier, real, images),
        "sampling_seconds": time.perf_counter() - start,
    }


def big_unet() -> DiffusionModel:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    config = {**DIGITS_UNET_CONFIG, "sample_size": 32, "block_out_channels": (128, 256, 256)}
    unet = UNet2DModel(**config).eval().requires_grad_(False)
    return DiffusionModel("unet-32x32-random", unet, SCHEDULER_CONFIG, Path("."), "-", 10, (1, 32, 32))


def calibration_set(model: DiffusionModel, steps: int) -> Trajectories:
    """The default spec's calibration inputs for ``model`` (its family's feature module)."""
    base = load_spec(overrides=[f"sampler.steps={steps}"])
    pool = collect_pool(model, base.calibration.trajectories, steps, base.calibration.seed)
    features = pool_features(model.unet, pool, model.conditional, model.family_info.feature_module)
    return subset(pool, select(pool, base.calibration.strategy, base.calibration.size, base.calibration.seed, features))


def ours(
    model: DiffusionModel,
    calib: Trajectories,
    path: Path,
    overrides: list[str],
    observer: str = "minmax",
    target: str = "tensorrt",
    parity: bool = True,
) -> tuple[Path, int, dict | None]:
    """Quantize ``model`` with the spec ``overrides``, export for ``target``, check rules (and parity).

    Returns:
        ``(onnx path, plan packed bytes, parity outputs report or None)``.
    """
    spec = load_spec(overrides=overrides)
    plan = plan_from_spec(model, spec.quantize, observer, target)
    quantized = quantize_model(model, plan, calib, spec.calibration)
    out = export_onnx(quantized, plan, path, target=target).path
    violations = check_rules(out, plan)
    assert violations == [], f"{path.name}: {violations[0]}"
    report = None
    if parity:
        checked = check_parity(out, quantized, calib)
        report = checked.to_dict()["outputs"]
        logger.info(
            "%s: parity %s (max %.3g, mean %.2g)", path.name, checked.passed, report["max_abs"], report["mean_abs"]
        )
    return out, packed_weight_bytes(model.unet, plan)["packed"], report


def part_digits(args: argparse.Namespace, tmp: Path) -> dict:
    """Part 1: digits-unet, accuracy / FD / bytes / latency of FP32, ours and quantize_static."""
    load = os.getloadavg()[0]
    model = load_model("digits-unet")
    classifier = load_classifier()
    real = load_digits_split().held_out_images
    calib = calibration_set(model, args.steps)

    rows: list[dict] = []
    fp_path = export_onnx(model, None, tmp / "fp32.onnx").path
    # quantize_static (onnxruntime 1.32) writes QuantizeLinear nodes that fail type inference at opset 21
    # (INT8 output_dtype with a UINT8 zero point on Transposes): give it the same FP graph at opset 20
    peer_fp_path = export_onnx(model, None, tmp / "fp32_opset20.onnx", opset=20).path
    entries: list[tuple[str, Path, int | None]] = [("FP32", fp_path, None)]
    parity = {}
    for name, w, a, observer, target in (
        ("ours W8A8", 8, 8, "minmax", "tensorrt"),
        ("ours W4A8", 4, 8, "mse", "tensorrt"),
        (ORT_FORM, 8, 8, "minmax", "onnxruntime"),
        (ORT_FORM_PERCENTILE, 8, 8, "percentile", "onnxruntime"),
    ):
        # percentile: weights stay min-max (per channel), activations (inputs and outputs) use the percentile observer
        weight_observer = "minmax" if observer == "percentile" else observer
        overrides = [
            f"quantize.weight.bits={w}",
            f"quantize.activation.bits={a}",
            f"quantize.weight.observer={weight_observer}",
            f"calibration.observer={observer}",
        ]
        file = tmp / f"{name.split()[1]}{'_ort' if target == 'onnxruntime' else ''}_{observer}.onnx"
        path, packed, report = ours(model, calib, file, overrides, observer, target)
        parity[name] = report
        entries.append((name, path, packed))
    for method in ("MinMax", "Percentile"):
        for ops, label in ((None, "all ops"), (CONV_MATMUL, "Conv/MatMul/Gemm")):
            out = tmp / f"ort_{method}_{'all' if ops is None else 'cmg'}.onnx"
            start = time.perf_counter()
            ort_quantize(peer_fp_path, out, calib, method, ops)
            logger.info("quantize_static %s %s: %.1fs", method, label, time.perf_counter() - start)
            entries.append((f"ORT quantize_static {method}, {label}", out, None))

    paths = {name: path for name, path, _ in entries}
    b1 = latencies(paths, calib, 1, args.warmup, args.runs, args.rounds)
    b32 = latencies(paths, calib, 32, args.warmup, args.runs, args.rounds)
    for name, path, packed in entries:
        row = {
            "name": name,
            "onnx_weight_bytes": onnx_weight_bytes(path),
            "file_bytes": path.stat().st_size,
            "plan_packed_bytes": packed,
            "latency_b1_ms": statistics.median(b1[name]),
            "latency_b32_ms": statistics.median(b32[name]),
            **sample_metrics(path, model, args, classifier, real),
        }
        rows.append(row)
        logger.info(
            "%-45s acc %.4f fd %.2f b1 %.2f ms b32 %.2f ms bytes %s",
            name,
            row["accuracy"],
            row["fd_real"],
            row["latency_b1_ms"],
            row["latency_b32_ms"],
            f"{row['onnx_weight_bytes']:,}",
        )
    fp_row = rows[0]
    for row in rows:
        row["b1_x_fp32"] = row["latency_b1_ms"] / fp_row["latency_b1_ms"]
        row["b32_x_fp32"] = row["latency_b32_ms"] / fp_row["latency_b32_ms"]
    torch_fp = generate(model, args.samples, args.steps, 0, 500, "Sampling (PyTorch FP32)")
    torch_fp_metrics = {
        "accuracy": condition_accuracy(classifier, torch_fp[0], torch_fp[1]),
        "fd_real": frechet_distance(classifier, real, torch_fp[0]),
    }
    shown = {"FP32", "ours W8A8", ORT_FORM, "ORT quantize_static MinMax, Conv/MatMul/Gemm"}
    digits_ops = {name: fused_ops(path) for name, path, _ in entries if name in shown}
    return {
        "machine": machine(),
        "onnxruntime": ort.__version__,
        "samples": args.samples,
        "steps": args.steps,
        "runs": args.runs * args.rounds,
        "warmup": args.warmup,
        "load_average": load,
        "rows": rows,
        "torch_fp32": torch_fp_metrics,
        "parity": parity,
        "digits_ops": digits_ops,
    }


def part_latency(args: argparse.Namespace, tmp: Path) -> dict:
    """Part 2: the 32x32 >= 10M-parameter U-Net, latency at batch 32 and the ops onnxruntime runs."""
    load = os.getloadavg()[0]
    big = big_unet()
    params = sum(p.numel() for p in big.unet.parameters())
    g = torch.Generator().manual_seed(0)
    n = 64
    big_calib = Trajectories(
        torch.randn((n, 1, 32, 32), generator=g), torch.randint(0, 1000, (n,), generator=g), torch.arange(n) % 10
    )
    w8a8 = ["quantize.weight.bits=8", "quantize.activation.bits=8"]
    big_fp = export_onnx(big, None, tmp / "big_fp32.onnx").path
    big_ours, _, _ = ours(big, big_calib, tmp / "big_w8a8.onnx", w8a8, parity=False)
    big_ort_form, _, parity = ours(big, big_calib, tmp / "big_w8a8_ort.onnx", w8a8, target="onnxruntime")
    big_peer_fp = export_onnx(big, None, tmp / "big_fp32_opset20.onnx", opset=20).path
    big_ort = ort_quantize(big_peer_fp, tmp / "big_ort.onnx", big_calib, "MinMax", CONV_MATMUL)
    models = [
        ("FP32", big_fp),
        ("ours W8A8", big_ours),
        (ORT_FORM, big_ort_form),
        ("ORT quantize_static MinMax, Conv/MatMul/Gemm", big_ort),
    ]
    times = latencies(dict(models), big_calib, 32, 1, args.big_runs, args.big_rounds)
    big_rows = []
    for name, path in models:
        big_rows.append(
            {
                "name": name,
                "latency_b32_ms": statistics.median(times[name]),
                "times_ms": times[name],
                "onnx_weight_bytes": onnx_weight_bytes(path),
                "ops": fused_ops(path),
            }
        )
        logger.info("32x32 %s: median %.1f ms of %d", name, big_rows[-1]["latency_b32_ms"], len(times[name]))
    for row in big_rows:
        row["b32_x_fp32"] = row["latency_b32_ms"] / big_rows[0]["latency_b32_ms"]
    return {
        "parameters": params,
        "rows": big_rows,
        "runs": args.big_runs * args.big_rounds,
        "load_average": load,
        "machine": machine(),
        "onnxruntime": ort.__version__,
        "parity_ort_form": parity,
    }


def render(result: dict) -> str:
    """The BENCHMARKS.md ``export`` section from the results JSON (either part may be missing)."""
    lines = ["## ONNX export on onnxruntime (CPU)", ""]
    if result.get("rows"):
        torch_fp = result["torch_fp32"]
        runs, warmup = result.get("runs", 15), result.get("warmup", 3)
        load = f" Load average at start: {result['load_average']:.1f}." if "load_average" in result else ""
        lines += [
            f"Command: `.venv/bin/python bench/onnx_runtime.py --part 1` ({result['samples']} samples, DDIM "
            f"{result['steps']}, noise seed 0, sampled through onnxruntime {result['onnxruntime']} CPU, {THREADS} "
            "threads; calibration: the default spec's 256 inputs for ours and for quantize_static). "
            f"Machine: {result['machine']}.{load}",
            f"PyTorch FP32 at the same noise: accuracy {torch_fp['accuracy']:.4f}, FD to real "
            f"{torch_fp['fd_real']:.2f}. Latency: one denoiser call, median of {runs} (interleaved rounds over "
            f"the models) after {warmup} warmup. Weight bytes: ONNX initializers (INT4 packed); plan bytes: the plan's packed count. "
            f"{ORT_FORM}: `export.target: onnxruntime` (output Q/DQ on the quantized Conv2d layers, UINT8 "
            "activations with zero point 128, INT32 biases); min-max observers like ours W8A8; the percentile row "
            "calibrates activations with `calibration.observer=percentile` (99.99th).",
            "",
            "| model | accuracy | FD to real | weight bytes | plan bytes | file bytes | b1 ms | b1 x FP32 | b32 ms | "
            "b32 x FP32 |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["rows"]:
            plan_bytes = f"{r['plan_packed_bytes']:,}" if r["plan_packed_bytes"] else "-"
            lines.append(
                f"| {r['name']} | {r['accuracy']:.4f} | {r['fd_real']:.2f} | {r['onnx_weight_bytes']:,} | "
                f"{plan_bytes} | {r['file_bytes']:,} | {r['latency_b1_ms']:.2f} | {r['b1_x_fp32']:.2f} | "
                f"{r['latency_b32_ms']:.2f} | {r['b32_x_fp32']:.2f} |"
            )
        ops = result.get("digits_ops", {})
        if ops:
            lines += ["", "digits-unet ops after onnxruntime's optimizer:", ""]
            for name, counts in ops.items():
                lines.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    big = result.get("big")
    if big:
        runs = big.get("runs", 5)
        load = f" Load average at start: {big['load_average']:.1f}." if "load_average" in big else ""
        lines += [
            "",
            "Latency only (`--part 2`): UNet2DModel of the digits-unet design at 32x32, block_out_channels "
            f"(128, 256, 256), {big['parameters'] / 1e6:.1f}M untrained parameters (seed 0), batch 32, median of "
            f"{runs} runs (interleaved rounds over the models); calibration: 64 random inputs. Ops: what onnxruntime's optimizer leaves in the graph."
            f"{load}",
            "",
            "| model | b32 ms | x FP32 | ops after onnxruntime's optimizer |",
            "|---|---|---|---|",
        ]
        for r in big["rows"]:
            ops_text = ", ".join(f"{k} {v}" for k, v in r["ops"].items())
            lines.append(f"| {r['name']} | {r['latency_b32_ms']:.1f} | {r['b32_x_fp32']:.2f} | {ops_text} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", choices=("1", "2", "all"), default="all", help="1: digits-unet, 2: 32x32 latency")
    parser.add_argument("--scratch", type=Path, default=None, help="folder for the ONNX files (default: temporary)")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5, help="part 1: runs per model per round")
    parser.add_argument("--rounds", type=int, default=3, help="part 1: interleaved rounds over the models")
    parser.add_argument("--big-runs", type=int, default=5, help="part 2: runs per model per round")
    parser.add_argument("--big-rounds", type=int, default=3, help="part 2: interleaved rounds over the models")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(THREADS)
    tmp = args.scratch or Path(tempfile.mkdtemp(prefix="bench-export-"))
    tmp.mkdir(parents=True, exist_ok=True)

    result = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.part in ("1", "all"):
        big = result.get("big")
        result = part_digits(args, tmp)
        if big is not None:
            result["big"] = big
    if args.part in ("2", "all"):
        result["big"] = part_latency(args, tmp)
    path = write_results("export", result)
    text = render(result)
    replace_section("export", text)
    logger.info("wrote %s and BENCHMARKS.md\n%s", path, text)


if __name__ == "__main__":
    main()
