"""Stage: export the quantized denoiser to ONNX, check its Q/DQ rules and onnxruntime parity, build an engine.

With ``export.target: onnxruntime`` the export is onnxruntime's integer form and no TensorRT
engine is built from it (TensorRT needs INT8 zero points of 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffquant.export.onnx import ONNXRUNTIME_FORM_REASON, export_onnx, onnx_weight_bytes
from diffquant.export.parity import ParityConfig, check_parity
from diffquant.export.rules import check_rules
from diffquant.export.tensorrt import build_engine, tensorrt_available
from diffquant.tasks.common import load_trajectories, model_from_source
from prefect import task

from diffquant.data import load_digits_split
from diffquant.errors import ExportError
from diffquant.models.reference import load_classifier
from diffquant.quant.plan import LayerPlan
from diffquant.quantize import load_quantized
from diffquant.spec import spec_from_dict
from diffquant.storage import write_json


@task(name="export")
def export_task(spec: dict[str, Any], quantized: dict[str, Any], calibration_path: str, out_dir: str) -> dict[str, Any]:
    """Export, check and (where possible) build; every result is written under ``<out_dir>/onnx``.

    Returns:
        ``onnx_path``, ``onnx_weight_bytes``, ``rules`` (violations, empty when clean), ``parity``
        (report dict), ``parity_path``, ``engine`` (TensorRT result) and ``metrics`` (onnxruntime
        sample metrics when the sampling check ran).

    Raises:
        RulesError: The export breaks TensorRT's explicit-quantization rules (or, with
            ``export.target: onnxruntime``, the onnxruntime form's) or the plan.
        ParityError: onnxruntime and PyTorch disagree beyond the stated tolerance (``enforce_parity``).
        ExportError: ``export.tensorrt: on`` where no engine can be built.
    """
    cfg = spec_from_dict(spec)
    model = model_from_source(cfg.model.model_dump())
    plan = LayerPlan.load(Path(quantized["plan_path"]))
    qmodel = load_quantized(
        model, Path(quantized["plan_path"]), Path(quantized["scales_path"]), quantized.get("weights_path")
    )
    folder = Path(out_dir) / "onnx"
    info = export_onnx(qmodel, plan, folder / "model.onnx", opset=cfg.export.opset, target=cfg.export.target)
    check_rules(info.path, plan, raise_on_violation=True, target=cfg.export.target)
    classifier = load_classifier() if qmodel.digits_compatible else None
    report = check_parity(
        info.path,
        qmodel,
        load_trajectories(calibration_path),
        ParityConfig(
            samples=cfg.export.parity_samples,
            steps=cfg.sampler.steps,
            seed=cfg.evaluate.seed,
            enforce=cfg.export.enforce_parity,
        ),
        classifier=classifier,
        real_images=load_digits_split().held_out_images if classifier is not None else None,
    )
    parity = report.to_dict()
    parity_path = write_json(parity, folder / "parity.json")
    engine: dict[str, Any] = {"built": False, "skip_reason": "export.tensorrt is off"}
    if cfg.export.target == "onnxruntime":
        engine = {"built": False, "skip_reason": ONNXRUNTIME_FORM_REASON}
    elif cfg.export.tensorrt != "off":
        ok, reason = tensorrt_available()
        if ok:
            engine = build_engine(
                info.path,
                Path(out_dir) / "engine" / "model.engine",
                max_batch=cfg.export.max_batch,
                optimization_level=cfg.export.optimization_level,
            ).to_dict()
        elif cfg.export.tensorrt == "on":
            raise ExportError(f"export.tensorrt is 'on' but no engine can be built here: {reason}")
        else:
            engine = {"built": False, "skip_reason": reason}
    metrics = {}
    if report.sampling is not None:
        metrics = {f"onnx.{k}": v for k, v in report.sampling.onnx_metrics.items()}
    return {
        "onnx_path": str(info.path),
        "export": info.to_dict(),
        "onnx_weight_bytes": onnx_weight_bytes(info.path),
        "parity": parity,
        "parity_path": str(parity_path),
        "engine": engine,
        "metrics": metrics,
    }
