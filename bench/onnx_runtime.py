"""ONNX export on onnxruntime (CPU): our Q/DQ exports vs FP32 and vs onnxruntime's own quantize_static.

Part 1, digits-unet: FP32, our W8A8 (min-max, per-channel) and W4A8 (MSE) exports, and
onnxruntime's ``quantize_static`` (QDQ, per-channel, symmetric activations and weights) on our FP32
export with the MinMax and Percentile calibrators, over all op types (its default) and restricted
to Conv/MatMul/Gemm, fed the same calibration inputs. For each: accuracy and FD to real digits of
DDIM samples drawn through onnxruntime (same noise for all), initializer bytes, file size, and
latency of one denoiser call at batch 1 and 32 (median of ``--runs`` after ``--warmup``).

Part 2, latency only: the same UNet2DModel design at 32x32 with untrained weights (seeded random
init, >= 10M parameters): FP32 vs our W8A8 export vs onnxruntime's best-configured INT8 at batch 32,
with the op types onnxruntime's optimizer leaves in each graph (what it fused).

Writes ``bench/results/export.json`` and the ``export`` table of BENCHMARKS.md.

Run: ``.venv/bin/python bench/onnx_runtime.py`` (about 10 minutes on 2 cores; ``--samples`` to shorten).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from common import ROOT, machine, replace_section

from diffquant.calibration import collect_pool, pool_features, select, subset
from diffquant.data import load_digits_split
from diffquant.evaluation import generate
from diffquant.metrics import condition_accuracy, frechet_distance
from diffquant.models.loading import DiffusionModel, load_model
from diffquant.models.reference import DIGITS_UNET_CONFIG, SCHEDULER_CONFIG, load_classifier
from diffquant.quant.plan import packed_weight_bytes
from diffquant.quantize import plan_from_spec, quantize_model
from diffquant.sampling import Trajectories
from diffquant.spec import load_spec
from export.onnx import export_onnx, onnx_weight_bytes
from export.parity import OrtDenoiser, check_parity
from export.rules import check_rules

THREADS = 2
CONV_MATMUL = ["Conv", "MatMul", "Gemm"]


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


def latency(path: Path, traj: Trajectories, batch: int, warmup: int, runs: int) -> float:
    """Median seconds of one denoiser call at ``batch``."""
    sess = session(path)
    inputs = feeds(traj, batch)
    for _ in range(warmup):
        sess.run(None, inputs)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--big-runs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    tmp = Path(tempfile.mkdtemp(prefix="bench-export-"))

    model = load_model("digits-unet")
    classifier = load_classifier()
    real = load_digits_split().held_out_images
    base = load_spec(overrides=[f"sampler.steps={args.steps}"])
    pool = collect_pool(model, base.calibration.trajectories, args.steps, base.calibration.seed)
    features = pool_features(model.unet, pool, model.conditional, model.family_info.feature_module)
    calib = subset(
        pool, select(pool, base.calibration.strategy, base.calibration.size, base.calibration.seed, features)
    )

    rows: list[dict] = []
    fp_path = export_onnx(model, None, tmp / "fp32.onnx").path
    # quantize_static (onnxruntime 1.32) writes QuantizeLinear nodes that fail type inference at opset 21
    # (INT8 output_dtype with a UINT8 zero point on Transposes): give it the same FP graph at opset 20
    peer_fp_path = export_onnx(model, None, tmp / "fp32_opset20.onnx", opset=20).path
    entries: list[tuple[str, Path, int | None]] = [("FP32", fp_path, None)]
    parity = {}
    for name, w, a, observer in (("ours W8A8", 8, 8, "minmax"), ("ours W4A8", 4, 8, "mse")):
        spec = load_spec(
            overrides=[
                f"quantize.weight.bits={w}",
                f"quantize.activation.bits={a}",
                f"quantize.weight.observer={observer}",
                f"calibration.observer={observer}",
            ]
        )
        plan = plan_from_spec(model, spec.quantize, observer)
        quantized = quantize_model(model, plan, calib, spec.calibration)
        path = export_onnx(quantized, plan, tmp / f"{name.split()[1]}.onnx").path
        assert check_rules(path, plan) == [], name
        report = check_parity(path, quantized, calib)
        parity[name] = report.to_dict()["outputs"]
        entries.append((name, path, packed_weight_bytes(model.unet, plan)["packed"]))
        print(f"{name}: parity {report.passed} (max {report.outputs.max_abs:.3g}, mean {report.outputs.mean_abs:.2g})")
    for method in ("MinMax", "Percentile"):
        for ops, label in ((None, "all ops"), (CONV_MATMUL, "Conv/MatMul/Gemm")):
            out = tmp / f"ort_{method}_{'all' if ops is None else 'cmg'}.onnx"
            start = time.perf_counter()
            ort_quantize(peer_fp_path, out, calib, method, ops)
            print(f"quantize_static {method} {label}: {time.perf_counter() - start:.1f}s")
            entries.append((f"ORT quantize_static {method}, {label}", out, None))

    for name, path, packed in entries:
        row = {
            "name": name,
            "onnx_weight_bytes": onnx_weight_bytes(path),
            "file_bytes": path.stat().st_size,
            "plan_packed_bytes": packed,
            "latency_b1_ms": 1000 * latency(path, calib, 1, args.warmup, args.runs),
            "latency_b32_ms": 1000 * latency(path, calib, 32, args.warmup, args.runs),
            **sample_metrics(path, model, args, classifier, real),
        }
        rows.append(row)
        print(
            f"{name:45s} acc {row['accuracy']:.4f} fd {row['fd_real']:.2f} b1 {row['latency_b1_ms']:.2f} ms "
            f"b32 {row['latency_b32_ms']:.2f} ms bytes {row['onnx_weight_bytes']:,}",
            flush=True,
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

    # part 2: latency only, 32x32, >= 10M random parameters
    big = big_unet()
    params = sum(p.numel() for p in big.unet.parameters())
    g = torch.Generator().manual_seed(0)
    n = 64
    big_calib = Trajectories(
        torch.randn((n, 1, 32, 32), generator=g), torch.randint(0, 1000, (n,), generator=g), torch.arange(n) % 10
    )
    big_spec = load_spec(overrides=["quantize.weight.bits=8", "quantize.activation.bits=8"])
    big_plan = plan_from_spec(big, big_spec.quantize)
    big_q = quantize_model(big, big_plan, big_calib, big_spec.calibration)
    big_fp = export_onnx(big, None, tmp / "big_fp32.onnx").path
    big_ours = export_onnx(big_q, big_plan, tmp / "big_w8a8.onnx").path
    big_peer_fp = export_onnx(big, None, tmp / "big_fp32_opset20.onnx", opset=20).path
    big_ort = ort_quantize(big_peer_fp, tmp / "big_ort.onnx", big_calib, "MinMax", CONV_MATMUL)
    big_rows = []
    for name, path in (
        ("FP32", big_fp),
        ("ours W8A8", big_ours),
        ("ORT quantize_static MinMax, Conv/MatMul/Gemm", big_ort),
    ):
        ms = 1000 * latency(path, big_calib, 32, 1, args.big_runs)
        big_rows.append(
            {"name": name, "latency_b32_ms": ms, "onnx_weight_bytes": onnx_weight_bytes(path), "ops": fused_ops(path)}
        )
        print(f"32x32 {name}: {ms:.1f} ms", flush=True)
    for row in big_rows:
        row["b32_x_fp32"] = row["latency_b32_ms"] / big_rows[0]["latency_b32_ms"]
    digits_ops = {name: fused_ops(path) for name, path, _ in [*entries[:3], entries[-1]]}

    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    result = {
        "machine": machine(),
        "onnxruntime": ort.__version__,
        "samples": args.samples,
        "steps": args.steps,
        "rows": rows,
        "torch_fp32": torch_fp_metrics,
        "parity": parity,
        "digits_ops": digits_ops,
        "big": {"parameters": params, "rows": big_rows},
    }
    (ROOT / "bench" / "results" / "export.json").write_text(json.dumps(result, indent=2))

    lines = [
        "## ONNX export on onnxruntime (CPU)",
        "",
        f"Command: `.venv/bin/python bench/onnx_runtime.py` ({args.samples} samples, DDIM {args.steps}, noise seed 0, "
        f"sampled through onnxruntime {ort.__version__} CPU, {THREADS} threads; calibration: the default spec's 256 "
        f"inputs for ours and for quantize_static). Machine: {machine()}.",
        f"PyTorch FP32 at the same noise: accuracy {torch_fp_metrics['accuracy']:.4f}, FD to real "
        f"{torch_fp_metrics['fd_real']:.2f}. Latency: one denoiser call, median of {args.runs} after {args.warmup} "
        "warmup. Weight bytes: ONNX initializers (INT4 packed); plan bytes: the plan's packed count.",
        "",
        "| model | accuracy | FD to real | weight bytes | plan bytes | file bytes | b1 ms | b1 x FP32 | b32 ms | b32 x FP32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        plan_bytes = f"{r['plan_packed_bytes']:,}" if r["plan_packed_bytes"] else "-"
        lines.append(
            f"| {r['name']} | {r['accuracy']:.4f} | {r['fd_real']:.2f} | {r['onnx_weight_bytes']:,} | {plan_bytes} | "
            f"{r['file_bytes']:,} | {r['latency_b1_ms']:.2f} | {r['b1_x_fp32']:.2f} | {r['latency_b32_ms']:.2f} | "
            f"{r['b32_x_fp32']:.2f} |"
        )
    lines += [
        "",
        f"Latency only: UNet2DModel of the digits-unet design at 32x32, block_out_channels (128, 256, 256), "
        f"{params / 1e6:.1f}M untrained parameters (seed 0), batch 32, median of {args.big_runs} runs; calibration: "
        "64 random inputs. Ops: what onnxruntime's optimizer leaves in the graph.",
        "",
        "| model | b32 ms | x FP32 | ops after onnxruntime's optimizer |",
        "|---|---|---|---|",
    ]
    for r in big_rows:
        ops = ", ".join(f"{k} {v}" for k, v in r["ops"].items())
        lines.append(f"| {r['name']} | {r['latency_b32_ms']:.1f} | {r['b32_x_fp32']:.2f} | {ops} |")
    replace_section("export", "\n".join(lines))
    print("\n".join(lines))
    print(json.dumps({"parity": parity, "digits_ops": digits_ops}, indent=1))


if __name__ == "__main__":
    main()
