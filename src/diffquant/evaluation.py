"""End-to-end evaluation of a (possibly quantized) diffusion model against FP and real data."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from diffquant.metrics import DATA_RANGE, condition_accuracy, frechet_distance, psnr, sample_range, sqnr_db, ssim
from diffquant.models.classifier import DigitClassifier
from diffquant.models.loading import DiffusionModel
from diffquant.sampling import Trajectories, denoiser_outputs, initial_noise, run_sampler
from diffquant.spec import SamplerSpec

EVAL_CODE_VERSION = "1"
"""Version of the evaluation (sampling and metrics); part of the cached full-precision evaluation's key."""


@dataclass
class EvalResult:
    """Samples with their labels, and the metrics computed on them."""

    samples: torch.Tensor
    labels: torch.Tensor | None
    metrics: dict[str, float] = field(default_factory=dict)


def generate(
    model: DiffusionModel,
    samples: int,
    steps: int | SamplerSpec,
    seed: int,
    batch_size: int,
    description: str = "Sampling",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample ``samples`` images from seeded noise under the model's evaluation conditions.

    ``steps`` is a DDIM step count or the whole sampler (scheduler, steps, guidance).

    Returns:
        The samples and the class each one asks for (None when unknown, e.g. free-form prompts).
    """
    conditions, labels = model.conditions(samples, "evaluation")
    noise = initial_noise(samples, model.sample_shape, seed)
    images, _ = run_sampler(
        model.unet,
        model.scheduler_config,
        noise,
        conditions,
        steps,
        batch_size,
        description=description,
        clamp=not model.latent,
        null=model.null_conditions(samples),
    )
    return images, labels


def evaluate_model(
    model: DiffusionModel,
    samples: int,
    steps: int | SamplerSpec,
    seed: int,
    batch_size: int,
    classifier: DigitClassifier | None,
    real_images: torch.Tensor | None,
    fp: EvalResult | None = None,
    sqnr_inputs: Trajectories | None = None,
    fp_outputs: torch.Tensor | None = None,
    description: str = "Sampling",
) -> EvalResult:
    """Sample from ``model`` and compute every metric that applies.

    Args:
        model: The model to evaluate (FP or fake-quantized).
        samples: Number of samples (classes cycle through 0..num_classes-1).
        steps: DDIM steps, or the whole sampler (scheduler, steps, guidance).
        seed: Noise seed (the same seed gives FP and quantized the same noise).
        batch_size: Samples per forward pass.
        classifier: Digits classifier, or None when the model is not digits-compatible.
        real_images: Held-out real images for FD to real (None to skip).
        fp: The FP result from the same noise, for FD to FP, PSNR and SSIM.
        sqnr_inputs: Denoiser inputs on which to compute SQNR against ``fp_outputs`` (``batch_size``
            per forward).
        fp_outputs: FP denoiser outputs on ``sqnr_inputs``.
        description: Progress-bar label.

    Returns:
        Samples, labels and metrics (``accuracy``, ``fd_real``, ``fd_fp``, ``psnr``, ``ssim``,
        ``sqnr_db``, ``sampling_seconds``), each present only where it applies.
    """
    start = time.perf_counter()
    images, labels = generate(model, samples, steps, seed, batch_size, description)
    metrics: dict[str, float] = {"sampling_seconds": time.perf_counter() - start}
    if classifier is not None and model.digits_compatible and labels is not None:
        metrics["accuracy"] = condition_accuracy(classifier, images, labels)
        if real_images is not None:
            metrics["fd_real"] = frechet_distance(classifier, real_images, images)
        if fp is not None:
            metrics["fd_fp"] = frechet_distance(classifier, fp.samples, images)
    if fp is not None:
        data_range = sample_range(fp.samples) if model.latent else DATA_RANGE
        metrics["psnr"] = psnr(fp.samples, images, data_range)
        metrics["ssim"] = ssim(fp.samples, images, data_range)
    if sqnr_inputs is not None and fp_outputs is not None:
        outputs = denoiser_outputs(model.unet, sqnr_inputs, model.conditional, batch_size)
        metrics["sqnr_db"] = sqnr_db(fp_outputs, outputs)
    return EvalResult(images, labels, metrics)
