"""Image-quality metrics for the reference models.

- Frechet distance (FD) of evaluation-classifier features, via torchmetrics'
  ``FrechetInceptionDistance`` with the classifier as a custom feature network. This is a
  project-specific FD, not the Inception FID: compare values only at the same sample count.
- Condition accuracy: share of samples the classifier assigns to the requested class.
- PSNR and SSIM of samples against full-precision samples from the same noise (data range 2,
  images in [-1, 1]; SSIM uses a 5x5 Gaussian window with sigma 1.0 because images are 8x8).
  Decoded 8-bit images of latent models: :func:`image_psnr_ssim`, batch by batch (data range 255;
  the standard 11x11 window with sigma 1.5 from 32 pixels on).
- SQNR (dB) of denoiser outputs against full-precision outputs on the same inputs.

All functions are deterministic: they consume tensors, draw no random numbers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffquant.models.classifier import ClassifierFeatures, DigitClassifier

SSIM_KERNEL = 5
SSIM_SIGMA = 1.0
DATA_RANGE = 2.0


def frechet_distance(classifier: DigitClassifier, real: torch.Tensor, fake: torch.Tensor) -> float:
    """FD between classifier features of ``real`` and ``fake`` images (both in [-1, 1]).

    Raises:
        ValueError: If either set has fewer than two images.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise ValueError("Frechet distance needs at least two images in each set")
    fd = FrechetInceptionDistance(feature=ClassifierFeatures(classifier), normalize=True)
    with torch.no_grad():
        fd.update(real.float(), real=True)
        fd.update(fake.float(), real=False)
        return float(fd.compute())


@torch.no_grad()
def condition_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of ``images`` whose predicted class equals ``labels``."""
    predictions = classifier(images.float()).argmax(dim=1)
    return float((predictions == labels).float().mean())


def sample_range(reference: torch.Tensor) -> float:
    """Data range (max - min) of ``reference``: PSNR/SSIM's range for latents, which are unbounded."""
    return float(reference.max() - reference.min()) or 1.0


def psnr(reference: torch.Tensor, images: torch.Tensor, data_range: float = DATA_RANGE) -> float:
    """PSNR in dB of ``images`` against ``reference`` (inf when identical)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    if torch.equal(reference, images):
        return math.inf
    return float(peak_signal_noise_ratio(images.float(), reference.float(), data_range=data_range))


def ssim(reference: torch.Tensor, images: torch.Tensor, data_range: float = DATA_RANGE) -> float:
    """Mean SSIM of ``images`` against ``reference``."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    value = structural_similarity_index_measure(
        images.float(), reference.float(), data_range=data_range, kernel_size=SSIM_KERNEL, sigma=SSIM_SIGMA
    )
    return float(value)


def ssim_window(height: int, width: int) -> tuple[int, float]:
    """SSIM's Gaussian window (size, sigma): the standard 11 / 1.5 for images of at least 32 pixels, else 5 / 1.0."""
    return (11, 1.5) if min(height, width) >= 32 else (SSIM_KERNEL, SSIM_SIGMA)


@torch.no_grad()
def image_psnr_ssim(reference: torch.Tensor, images: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """PSNR (dB) over all pixels and mean SSIM of 8-bit ``images`` against ``reference``, batch by batch.

    The same values as torchmetrics' functions over the whole set (PSNR from the total squared
    error, SSIM averaged over images), without holding the set in float at once.

    Args:
        reference: ``uint8`` images (N, C, H, W), e.g. the full-precision model's.
        images: ``uint8`` images of the same shape.
        batch_size: Images per batch.

    Returns:
        PSNR (inf when identical) and SSIM, both with data range 255.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    if reference.shape != images.shape:
        raise ValueError(f"image shapes differ: {tuple(reference.shape)} and {tuple(images.shape)}")
    kernel, sigma = ssim_window(*images.shape[-2:])
    squared, ssim_sum = 0.0, 0.0
    for start in range(0, images.shape[0], batch_size):
        a, b = reference[start : start + batch_size].float(), images[start : start + batch_size].float()
        squared += float((a.double() - b.double()).pow(2).sum())
        value = structural_similarity_index_measure(
            b, a, data_range=255.0, kernel_size=kernel, sigma=sigma, reduction="none"
        )
        ssim_sum += float(value.double().sum())
    mse = squared / images.numel()
    value = math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)
    return value, ssim_sum / images.shape[0]


def sqnr_db(reference: torch.Tensor, output: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(|ref|^2 / |ref - out|^2)`` in dB."""
    noise = (reference.double() - output.double()).pow(2).sum()
    if noise == 0:
        return math.inf
    return float(10.0 * torch.log10(reference.double().pow(2).sum() / noise))
