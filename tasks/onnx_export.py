"""Stage: export the quantized denoiser to ONNX, check its Q/DQ rules and onnxruntime parity, build an engine.

With ``export.target: onnxruntime`` the export is onnxruntime's integer form and no TensorRT
engine is built from it (TensorRT needs INT8 zero points of 0); the rule is
:func:`diffquant.export.tensorrt.engine_for_export`'s.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from prefect import task

from diffquant.data import load_digits_split
from diffquant.errors import spec_section
from diffquant.export.onnx import ExportInfo, export_onnx, onnx_weight_bytes
from diffquant.export.parity import ParityConfig, ParityReport, check_parity
from diffquant.export.rules import check_rules
from diffquant.export.tensorrt import engine_for_export
from diffquant.models.reference import load_classifier
from diffquant.placement import resolve
from diffquant.ptq import load_quantized
from diffquant.quant.plan import LayerPlan
from diffquant.spec import CompressionSpec
from diffquant.storage import load_safetensors, write_json
from diffquant.tasks.artifacts import CalibrationArtifact, EvalArtifact, ExportArtifact, FileRef, QuantizeArtifact
from diffquant.tasks.common import load_trajectories, model_from_source


def _export_and_check(
    spec: CompressionSpec,
    quantized: QuantizeArtifact,
    calibration: CalibrationArtifact,
    folder: Path,
    samples: int,
    evaluation: EvalArtifact | None = None,
) -> tuple[ExportInfo, ParityReport]:
    """Export the quantized model into ``folder``; check the rules and onnxruntime parity (``samples`` final samples).

    ``evaluation`` (of the same quantized model) gives the PyTorch side of the sampling check.
    """
    plan = LayerPlan.load(Path(quantized.plan.path))
    weights = Path(quantized.weights.path) if quantized.weights else None
    qmodel = load_quantized(
        model_from_source(spec.model), Path(quantized.plan.path), Path(quantized.scales.path), weights, inplace=True
    )
    info = export_onnx(
        qmodel,
        plan,
        folder / "model.onnx",
        opset=spec.export.opset,
        target=spec.export.target,
        device_class=spec.export.device,
    )
    check_rules(info.path, plan, raise_on_violation=True, target=spec.export.target, device_class=spec.export.device)
    classifier = load_classifier() if qmodel.digits_compatible and samples else None
    config = ParityConfig(
        samples=samples,
        steps=spec.sampler,
        seed=spec.evaluate.seed,
        enforce=spec.export.enforce_parity,
        batch_size=spec.forward_batch,
        sample_batch_size=spec.sampling_batch,
    )
    report = check_parity(
        info.path,
        qmodel,
        load_trajectories(calibration.calibration.path),
        config,
        classifier=classifier,
        real_images=load_digits_split().held_out_images if classifier is not None else None,
        torch_samples=load_safetensors(Path(evaluation.samples.path))["samples"] if evaluation and samples else None,
    )
    return info, report


@task(name="parity-precheck")
def parity_precheck_task(
    spec: CompressionSpec, quantized: QuantizeArtifact, calibration: CalibrationArtifact, out_dir: str
) -> dict[str, Any]:
    """Export into a scratch folder and check the rules and denoiser-output parity (no sampling): seconds.

    Run before the slow evaluation, so a broken export fails the run early; the scratch export is
    removed afterwards (the final export is the ``export`` stage's).

    Raises:
        RulesError: The export breaks the target's Q/DQ rules or the plan.
        ParityError: onnxruntime and PyTorch disagree beyond the tolerance (``enforce_parity``).
    """
    with tempfile.TemporaryDirectory(prefix=".parity-precheck-", dir=out_dir) as scratch:
        _, report = _export_and_check(spec, quantized, calibration, Path(scratch), samples=0)
    return report.to_dict()


@task(name="export")
def export_task(
    spec: CompressionSpec,
    quantized: QuantizeArtifact,
    calibration: CalibrationArtifact,
    out_dir: str,
    evaluation: EvalArtifact | None = None,
) -> ExportArtifact:
    """Export, check and (where possible) build; every result is written under ``<out_dir>/onnx``.

    ``evaluation`` is the run's evaluation of ``quantized``: where it ran on the CPU in float32
    (as parity's PyTorch model does), its samples are the PyTorch side of the sampling parity check
    (the same noise, conditions and sampler), so they are not drawn twice.

    Raises:
        RulesError: The export breaks TensorRT's explicit-quantization rules (or, with
            ``export.target: onnxruntime``, the onnxruntime form's) or the plan.
        ParityError: onnxruntime and PyTorch disagree beyond the stated tolerance (``enforce_parity``).
        SpecError: ``export.tensorrt: on`` where no engine can be built.
    """
    folder = Path(out_dir) / "onnx"
    same_placement = resolve(spec.runtime.device, spec.runtime.dtype) == (torch.device("cpu"), torch.float32)
    reused = evaluation if same_placement else None
    info, report = _export_and_check(spec, quantized, calibration, folder, spec.export.parity_samples, reused)
    parity = report.to_dict()
    parity_path = write_json(parity, folder / "parity.json")
    with spec_section("export"):
        engine = engine_for_export(info.path, spec.export, Path(out_dir) / "engine")
    metrics = {f"onnx.{k}": v for k, v in report.sampling.onnx_metrics.items()} if report.sampling else {}
    return ExportArtifact(
        onnx=FileRef.of(info.path),
        onnx_weight_bytes=onnx_weight_bytes(info.path),
        export=info.to_dict(),
        parity=parity,
        parity_path=str(parity_path),
        engine=engine,
        metrics=metrics,
    )
