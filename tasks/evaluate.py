"""Stages: sample and score the FP or the quantized model.

The full-precision samples and their metrics depend only on the model, the sampler, the
``evaluate`` section and where they were computed (:class:`~diffquant.tasks.artifacts.FpEvalRequest`):
:func:`fp_samples_task` caches them like the pool, and every run reuses them (checked by sha256).
The SQNR reference (FP denoiser outputs on the run's held-out calibration inputs) is computed per
run: it depends on the calibration selection.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from prefect import task

from diffquant.clip_score import load_clip
from diffquant.data import load_digits_split
from diffquant.errors import spec_section
from diffquant.evaluation import EvalResult, evaluate_model
from diffquant.metrics import sqnr_db
from diffquant.models.loading import DiffusionModel
from diffquant.models.reference import load_classifier
from diffquant.placement import module_placement
from diffquant.ptq import load_quantized
from diffquant.sampling import denoiser_outputs
from diffquant.spec import CompressionSpec, EvaluateSpec, RuntimeSpec, SamplerSpec
from diffquant.storage import atomic_path, load_safetensors, save_safetensors
from diffquant.tasks.artifacts import (
    CalibrationArtifact,
    EvalArtifact,
    FileRef,
    FpEvalRequest,
    QuantizeArtifact,
    SamplesArtifact,
    request_cache_policy,
)
from diffquant.tasks.common import load_trajectories, model_from_source


def _sample(
    model: DiffusionModel,
    sampler: SamplerSpec,
    ev: EvaluateSpec,
    batch: int,
    label: str,
    fp: EvalResult | None,
) -> EvalResult:
    """Evaluation samples of ``model`` and their metrics.

    The digits classifier scores models it can judge; ``ev.clip_model`` adds the CLIP score.
    """
    classifier = load_classifier() if model.digits_compatible else None
    real = load_digits_split().held_out_images if classifier is not None else None
    clip = None
    if ev.clip_model is not None:
        with spec_section("evaluate"):
            clip = load_clip(ev.clip_model, module_placement(model.unet)[0])
    return evaluate_model(
        model,
        ev.samples,
        sampler,
        ev.seed,
        batch,
        classifier,
        real,
        fp=fp,
        description=f"Sampling ({label})",
        clip=clip,
    )


def _save_samples(result: EvalResult, path: Path) -> FileRef:
    tensors = {"samples": result.samples}
    if result.labels is not None:
        tensors["labels"] = result.labels
    if result.images is not None:
        tensors["images"] = result.images  # decoded by the VAE, uint8
    return FileRef.of(save_safetensors(tensors, path))


@task(name="evaluate-fp-samples", cache_policy=request_cache_policy(), persist_result=True)
def fp_samples_task(request: FpEvalRequest, cache_dir: str, runtime: RuntimeSpec | None = None) -> SamplesArtifact:
    """Sample the FP model from the evaluation noise and score the samples; cached on the request.

    The samples go to ``<cache_dir>/fp-<request key>.safetensors``. ``runtime`` places the model;
    its device type, dtype and the sampling batch are in the request.
    """
    model = model_from_source(request.model, runtime)
    ev = EvaluateSpec.model_validate(request.evaluate)
    result = _sample(model, request.sampler, ev, request.batch, "fp", None)
    path = _save_samples(result, Path(cache_dir) / f"fp-{request.key()}.safetensors")
    return SamplesArtifact(metrics=result.metrics, samples=path)


def _link(source: Path, target: Path) -> Path:
    """``target`` as a hard link to ``source`` (a copy across file systems), replaced atomically."""
    with atomic_path(target) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
    return target


@task(name="evaluate")
def evaluate_task(
    spec: CompressionSpec,
    label: str,
    out_dir: str,
    calibration: CalibrationArtifact,
    quantized: QuantizeArtifact | None = None,
    fp: EvalArtifact | None = None,
    sampled: SamplesArtifact | None = None,
) -> EvalArtifact:
    """Evaluate one model variant and store its samples and denoiser outputs.

    Args:
        spec: The compression spec.
        label: ``fp``, ``quantized`` or ``finetuned`` (names the files and the progress bar).
        out_dir: Run output folder.
        calibration: The calibration stage (its SQNR inputs are used).
        quantized: The quantized model (None evaluates the FP model).
        fp: This task's result for the FP model (for paired metrics).
        sampled: The variant's samples and metrics computed before (the cached FP evaluation):
            they are linked into the run folder and only the denoiser outputs are computed.
    """
    model = model_from_source(spec.model, spec.runtime)
    if quantized is not None:
        weights = Path(quantized.weights.path) if quantized.weights else None
        model = load_quantized(model, Path(quantized.plan.path), Path(quantized.scales.path), weights, inplace=True)
    folder = Path(out_dir) / "samples"
    if sampled is None:
        fp_result = fp_outputs = None
        if fp is not None:
            stored = load_safetensors(Path(fp.samples.path))
            fp_result = EvalResult(stored["samples"], stored.get("labels"), images=stored.get("images"))
            fp_outputs = load_safetensors(Path(fp.outputs.path))["outputs"]
        result = _sample(model, spec.sampler, spec.evaluate, spec.sampling_batch, label, fp_result)
        samples, metrics = _save_samples(result, folder / f"{label}.safetensors"), result.metrics
    else:
        fp_outputs = None
        samples = FileRef.of(_link(Path(sampled.samples.path), folder / f"{label}.safetensors"))
        metrics = dict(sampled.metrics)
    sqnr_inputs = load_trajectories(calibration.sqnr.path)
    outputs = denoiser_outputs(model.unet, sqnr_inputs, model.conditional, spec.forward_batch)
    if fp_outputs is not None:
        metrics["sqnr_db"] = sqnr_db(fp_outputs, outputs)
    outputs_path = save_safetensors({"outputs": outputs}, folder / f"{label}_denoiser_outputs.safetensors")
    return EvalArtifact(metrics=metrics, samples=samples, outputs=FileRef.of(outputs_path))
