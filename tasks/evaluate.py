"""Stage: sample and score the FP or the quantized model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffquant.tasks.common import load_trajectories, model_from_source
from prefect import task

from diffquant.data import load_digits_split
from diffquant.evaluation import EvalResult, evaluate_model
from diffquant.metrics import sqnr_db
from diffquant.models.reference import load_classifier
from diffquant.quantize import load_quantized
from diffquant.sampling import denoiser_outputs
from diffquant.spec import spec_from_dict
from diffquant.storage import load_safetensors, save_safetensors


@task(name="evaluate")
def evaluate_task(
    spec: dict[str, Any],
    label: str,
    out_dir: str,
    sqnr_path: str,
    quantized: dict[str, Any] | None = None,
    fp: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate one model variant and store its samples and denoiser outputs.

    Args:
        spec: The compression spec as data.
        label: ``fp`` or ``quantized`` (names the files and the progress bar).
        out_dir: Run output folder.
        sqnr_path: Denoiser inputs used for SQNR.
        quantized: Output of the quantize task (None evaluates the FP model).
        fp: Output of this task for the FP model (for paired metrics).

    Returns:
        ``metrics``, ``samples_path`` and ``outputs_path``.
    """
    cfg = spec_from_dict(spec)
    model = model_from_source(cfg.model.model_dump())
    if quantized is not None:
        model = load_quantized(
            model, Path(quantized["plan_path"]), Path(quantized["scales_path"]), quantized.get("weights_path")
        )
    classifier = load_classifier() if model.digits_compatible else None
    real = load_digits_split().held_out_images if classifier is not None else None
    sqnr_inputs = load_trajectories(sqnr_path)
    fp_result = fp_outputs = None
    if fp is not None:
        stored = load_safetensors(Path(fp["samples_path"]))
        fp_result = EvalResult(stored["samples"], stored.get("labels"))
        fp_outputs = load_safetensors(Path(fp["outputs_path"]))["outputs"]
    ev = cfg.evaluate
    result = evaluate_model(
        model,
        ev.samples,
        cfg.sampler.steps,
        ev.seed,
        ev.batch_size,
        classifier,
        real,
        fp=fp_result,
        description=f"Sampling ({label})",
    )
    outputs = denoiser_outputs(model.unet, sqnr_inputs, model.conditional)
    if fp_outputs is not None:
        result.metrics["sqnr_db"] = sqnr_db(fp_outputs, outputs)
    folder = Path(out_dir) / "samples"
    tensors = {"samples": result.samples}
    if result.labels is not None:
        tensors["labels"] = result.labels
    samples_path = save_safetensors(tensors, folder / f"{label}.safetensors")
    outputs_path = save_safetensors({"outputs": outputs}, folder / f"{label}_denoiser_outputs.safetensors")
    return {"metrics": result.metrics, "samples_path": str(samples_path), "outputs_path": str(outputs_path)}
