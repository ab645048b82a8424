"""Stage: sample and score the FP or the quantized model."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from diffquant.clip_score import load_clip
from diffquant.data import load_digits_split
from diffquant.errors import spec_section
from diffquant.evaluation import EvalResult, evaluate_model
from diffquant.metrics import sqnr_db
from diffquant.models.reference import load_classifier
from diffquant.placement import module_placement
from diffquant.ptq import load_quantized
from diffquant.sampling import denoiser_outputs
from diffquant.spec import CompressionSpec
from diffquant.storage import load_safetensors, save_safetensors
from diffquant.tasks.artifacts import CalibrationArtifact, EvalArtifact, FileRef, QuantizeArtifact
from diffquant.tasks.common import load_trajectories, model_from_source


@task(name="evaluate")
def evaluate_task(
    spec: CompressionSpec,
    label: str,
    out_dir: str,
    calibration: CalibrationArtifact,
    quantized: QuantizeArtifact | None = None,
    fp: EvalArtifact | None = None,
) -> EvalArtifact:
    """Evaluate one model variant and store its samples and denoiser outputs.

    Args:
        spec: The compression spec.
        label: ``fp``, ``quantized`` or ``finetuned`` (names the files and the progress bar).
        out_dir: Run output folder.
        calibration: The calibration stage (its SQNR inputs are used).
        quantized: The quantized model (None evaluates the FP model).
        fp: This task's result for the FP model (for paired metrics).
    """
    model = model_from_source(spec.model, spec.runtime)
    if quantized is not None:
        weights = Path(quantized.weights.path) if quantized.weights else None
        model = load_quantized(model, Path(quantized.plan.path), Path(quantized.scales.path), weights)
    classifier = load_classifier() if model.digits_compatible else None
    real = load_digits_split().held_out_images if classifier is not None else None
    fp_result = fp_outputs = None
    if fp is not None:
        stored = load_safetensors(Path(fp.samples.path))
        fp_result = EvalResult(stored["samples"], stored.get("labels"), images=stored.get("images"))
        fp_outputs = load_safetensors(Path(fp.outputs.path))["outputs"]
    ev = spec.evaluate
    clip = None
    if ev.clip_model is not None:
        with spec_section("evaluate"):
            clip = load_clip(ev.clip_model, module_placement(model.unet)[0])
    result = evaluate_model(
        model,
        ev.samples,
        spec.sampler,
        ev.seed,
        ev.batch_size,
        classifier,
        real,
        fp=fp_result,
        description=f"Sampling ({label})",
        clip=clip,
    )
    outputs = denoiser_outputs(model.unet, load_trajectories(calibration.sqnr.path), model.conditional)
    if fp_outputs is not None:
        result.metrics["sqnr_db"] = sqnr_db(fp_outputs, outputs)
    folder = Path(out_dir) / "samples"
    tensors = {"samples": result.samples}
    if result.labels is not None:
        tensors["labels"] = result.labels
    if result.images is not None:
        tensors["images"] = result.images  # decoded by the VAE, uint8
    samples_path = save_safetensors(tensors, folder / f"{label}.safetensors")
    outputs_path = save_safetensors({"outputs": outputs}, folder / f"{label}_denoiser_outputs.safetensors")
    return EvalArtifact(metrics=result.metrics, samples=FileRef.of(samples_path), outputs=FileRef.of(outputs_path))
