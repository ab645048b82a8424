"""End-to-end evaluation of a (possibly quantized) diffusion model against FP and real data."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from diffquant.clip_score import ClipScorer
from diffquant.decoding import decode_samples, to_8bit
from diffquant.errors import ConfigError
from diffquant.metrics import (
    DATA_RANGE,
    condition_accuracy,
    frechet_distance,
    image_psnr_ssim,
    psnr,
    sample_range,
    sqnr_db,
    ssim,
)
from diffquant.models.classifier import DigitClassifier
from diffquant.models.loading import DiffusionModel
from diffquant.sampling import Trajectories, denoiser_outputs, initial_noise, run_sampler
from diffquant.spec import SamplerSpec

EVAL_CODE_VERSION = "1"
"""Version of the evaluation (sampling and metrics); part of the cached full-precision evaluation's key."""


@dataclass
class EvalResult:
    """Samples with their labels, the decoded images of latent samples, and the metrics computed on them.

    ``images`` holds a latent model's samples decoded by its VAE as ``uint8`` (N, 3, H, W); None
    for pixel models (their samples are the images) and for latent models without a VAE.
    """

    samples: torch.Tensor
    labels: torch.Tensor | None
    metrics: dict[str, float] = field(default_factory=dict)
    images: torch.Tensor | None = None


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
    clip: ClipScorer | None = None,
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
        clip: A CLIP model for the CLIP score of a text model's images against their prompts.

    Returns:
        Samples, labels, decoded images (models with a VAE) and metrics (``accuracy``,
        ``fd_real``, ``fd_fp``, ``psnr``, ``ssim``, ``psnr_latent``, ``ssim_latent``,
        ``clip_score``, ``sqnr_db``, ``sampling_seconds``, ``decoding_seconds``), each present
        only where it applies. A latent model's ``psnr``/``ssim`` compare its decoded images;
        ``psnr_latent``/``ssim_latent`` its latents.
    """
    start = time.perf_counter()
    images, labels = generate(model, samples, steps, seed, batch_size, description)
    metrics: dict[str, float] = {"sampling_seconds": time.perf_counter() - start}
    decoded = None
    if model.vae_dir is not None:
        start = time.perf_counter()
        decoded = decode_samples(model, images, batch_size)
        metrics["decoding_seconds"] = time.perf_counter() - start
    if classifier is not None and model.digits_compatible and labels is not None:
        metrics["accuracy"] = condition_accuracy(classifier, images, labels)
        if real_images is not None:
            metrics["fd_real"] = frechet_distance(classifier, real_images, images)
        if fp is not None:
            metrics["fd_fp"] = frechet_distance(classifier, fp.samples, images)
    if fp is not None:
        metrics |= paired_metrics(model, fp, images, decoded, batch_size)
    if clip is not None and not (model.latent and decoded is None):  # latents without a VAE are no images
        metrics["clip_score"] = clip_score_of(model, clip, images if decoded is None else decoded, batch_size)
    if sqnr_inputs is not None and fp_outputs is not None:
        outputs = denoiser_outputs(model.unet, sqnr_inputs, model.conditional, batch_size)
        metrics["sqnr_db"] = sqnr_db(fp_outputs, outputs)
    return EvalResult(images, labels, metrics, decoded)


def paired_metrics(
    model: DiffusionModel, fp: EvalResult, samples: torch.Tensor, images: torch.Tensor | None, batch_size: int
) -> dict[str, float]:
    """PSNR and SSIM against the FP model's result from the same noise.

    Pixel models: ``psnr``/``ssim`` of the samples (data range 2). Latent models:
    ``psnr_latent``/``ssim_latent`` of the latents (data range of the FP latents) and, with decoded
    ``images``, ``psnr``/``ssim`` of the 8-bit images (data range 255; FP's are decoded here when
    ``fp.images`` is None).
    """
    if not model.latent:
        return {"psnr": psnr(fp.samples, samples, DATA_RANGE), "ssim": ssim(fp.samples, samples, DATA_RANGE)}
    data_range = sample_range(fp.samples)
    out = {"psnr_latent": psnr(fp.samples, samples, data_range), "ssim_latent": ssim(fp.samples, samples, data_range)}
    if images is not None:
        reference = fp.images if fp.images is not None else decode_samples(model, fp.samples, batch_size)
        out["psnr"], out["ssim"] = image_psnr_ssim(reference, images, batch_size)
    return out


def clip_score_of(model: DiffusionModel, clip: ClipScorer, images: torch.Tensor, batch_size: int) -> float:
    """CLIP score of a text model's evaluation images against the prompts they were sampled with.

    Args:
        model: A text-conditioned model (its evaluation prompts cycle over the samples).
        clip: The CLIP model.
        images: Decoded ``uint8`` images, or pixel samples in [-1, 1].
        batch_size: Images per CLIP pass.

    Raises:
        ConfigError (``clip_model``): The model takes no prompts.
    """
    if model.prompts is None:
        raise ConfigError(
            "clip_model", f"{model.name} is not text-conditioned: CLIP score needs prompts; unset clip_model"
        )
    pictures = images if images.dtype == torch.uint8 else to_8bit(images)
    return clip.score(pictures, model.prompts.texts(images.shape[0], "evaluation"), batch_size)
