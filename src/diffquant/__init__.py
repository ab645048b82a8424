"""diffquant: compression of diffusion models for edge GPUs.

The library API works on in-memory models and typed configs (the same types a spec is made of),
with neither Prefect nor MLflow imported; ``diffquant compress`` calls exactly these functions, so
both give byte-identical plans and scales::

    import diffquant

    model = diffquant.load_model("digits-unet")
    pool = diffquant.collect_pool(model, trajectories=16)
    data = diffquant.select_calibration(pool, model, diffquant.CalibrationSpec(size=128)).calibration
    result = diffquant.quantize(model, diffquant.QuantizeSpec(), data)
    info = diffquant.export_onnx(model, result.plan, "model.onnx")
    report = diffquant.check_parity(info.path, model, data)

Names are imported on first use, so ``import diffquant`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # models
    "load_model": "diffquant.models.loading",
    "DiffusionModel": "diffquant.models.loading",
    # calibration data
    "collect_pool": "diffquant.calibration.pool",
    "select_calibration": "diffquant.calibration.selection",
    "CalibrationSelection": "diffquant.calibration.selection",
    "Trajectories": "diffquant.sampling",
    # quantization
    "quantize": "diffquant.ptq",
    "auto_quantize": "diffquant.ptq",
    "QuantizeResult": "diffquant.ptq",
    "AutoQuantizeResult": "diffquant.ptq",
    "save_quantized": "diffquant.ptq",
    "load_quantized": "diffquant.ptq",
    "LayerPlan": "diffquant.quant.plan",
    "WeightConfig": "diffquant.quant.config",
    # fine-tuning
    "finetune": "diffquant.finetuning.policy",
    "keep_finetuned": "diffquant.finetuning.policy",
    # export (diffquant.export: ONNX, rules, parity; TensorRT imported lazily inside)
    "export_onnx": "diffquant.export.onnx",
    "check_rules": "diffquant.export.rules",
    "check_parity": "diffquant.export.parity",
    "ParityConfig": "diffquant.export.parity",
    # cost of a run, before it runs
    "estimate_cost": "diffquant.cost",
    "CostEstimate": "diffquant.cost",
    # configs: the spec's sections
    "CompressionSpec": "diffquant.spec",
    "QuantizeSpec": "diffquant.spec",
    "ActivationQuantSpec": "diffquant.spec",
    "SmoothSpec": "diffquant.spec",
    "LowRankSpec": "diffquant.spec",
    "CalibrationSpec": "diffquant.spec",
    "AllocationSpec": "diffquant.spec",
    "BudgetSpec": "diffquant.spec",
    "FinetuneSpec": "diffquant.spec",
    "ExportSpec": "diffquant.spec",
    "load_spec": "diffquant.spec",
    # errors
    "DiffquantError": "diffquant.errors",
    "ConfigError": "diffquant.errors",
    "SpecError": "diffquant.errors",
}

__all__ = [
    "ActivationQuantSpec",
    "AllocationSpec",
    "AutoQuantizeResult",
    "BudgetSpec",
    "CalibrationSelection",
    "CalibrationSpec",
    "CompressionSpec",
    "ConfigError",
    "CostEstimate",
    "DiffquantError",
    "DiffusionModel",
    "ExportSpec",
    "FinetuneSpec",
    "LayerPlan",
    "LowRankSpec",
    "ParityConfig",
    "QuantizeResult",
    "QuantizeSpec",
    "SmoothSpec",
    "SpecError",
    "Trajectories",
    "WeightConfig",
    "__version__",
    "auto_quantize",
    "check_parity",
    "check_rules",
    "collect_pool",
    "estimate_cost",
    "export_onnx",
    "finetune",
    "keep_finetuned",
    "load_model",
    "load_quantized",
    "load_spec",
    "quantize",
    "save_quantized",
    "select_calibration",
]


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'diffquant' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from diffquant.calibration.pool import collect_pool
    from diffquant.calibration.selection import CalibrationSelection, select_calibration
    from diffquant.cost import CostEstimate, estimate_cost
    from diffquant.errors import ConfigError, DiffquantError, SpecError
    from diffquant.export.onnx import export_onnx
    from diffquant.export.parity import ParityConfig, check_parity
    from diffquant.export.rules import check_rules
    from diffquant.finetuning.policy import finetune, keep_finetuned
    from diffquant.models.loading import DiffusionModel, load_model
    from diffquant.ptq import (
        AutoQuantizeResult,
        QuantizeResult,
        auto_quantize,
        load_quantized,
        quantize,
        save_quantized,
    )
    from diffquant.quant.config import WeightConfig
    from diffquant.quant.plan import LayerPlan
    from diffquant.sampling import Trajectories
    from diffquant.spec import (
        ActivationQuantSpec,
        AllocationSpec,
        BudgetSpec,
        CalibrationSpec,
        CompressionSpec,
        ExportSpec,
        FinetuneSpec,
        LowRankSpec,
        QuantizeSpec,
        SmoothSpec,
        load_spec,
    )
