"""The content metric of mixed precision: final samples of a one-layer-quantized model against FP.

MixDQ scores the layers that carry the condition (cross-attention and feed-forward layers; see
:mod:`diffquant.models.families` for each family's) by the SSIM of final samples against the FP
samples from the same noise, because the denoiser-output SQNR under-weights what such layers do
to the content. Here the content score of a (layer, option) is a cost, lower is better:

- ``ssim``: ``1 - SSIM`` of the final samples (any model: no classifier needed);
- ``classifier_kl``: the mean KL divergence ``FP || quantized`` of the evaluation classifier's
  logits on the final samples (only for models the digits classifier can judge).

Latent models with a VAE are compared on their decoded images (the float VAE, as the evaluation
decodes them); latent models without one on their latents (:func:`comparable_images`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from diffquant.decoding import decode_samples, load_decoder
from diffquant.errors import ConfigError
from diffquant.metrics import DATA_RANGE, psnr, sample_range, ssim
from diffquant.models.families import matching_layers
from diffquant.models.loading import DiffusionModel
from diffquant.quant.plan import quantizable_layers, resolve_globs
from diffquant.sampling import initial_noise, run_sampler
from diffquant.spec import AllocationSpec, SamplerSpec

ContentMetric = Literal["ssim", "classifier_kl"]

REFERENCE_CONTENT_METRIC: ContentMetric = "classifier_kl"
"""``content_metric: auto`` on models the evaluation classifier can judge (the reference models).

Chosen by measurement (BENCHMARKS.md "Below 4 weight bits", ``bench/low_bits.py --part zoo
--zoo-models digits-unet,digits-dit,digits-t2i --zoo-content ssim,classifier_kl``; mixed W4A8 at the
bytes of uniform W4A8, 2,000 samples): accuracy with the classifier KL / with SSIM was 0.9870 / 0.9875
on digits-unet (FD to FP 0.12 both), 0.8265 / 0.8190 on digits-dit and 0.9590 / 0.9435 on digits-t2i
(FD to FP 0.69 / 3.19). Models the classifier cannot judge keep SSIM, MixDQ's metric.
"""


def comparable_images(
    model: DiffusionModel, samples: torch.Tensor, vae: nn.Module | None = None, batch_size: int = 1000
) -> tuple[torch.Tensor, float]:
    """The images content metrics compare, and their data range.

    Pixel-space samples are returned as they are (range 2: images in [-1, 1]). A latent model's
    samples are decoded by ``vae`` (its float VAE, :func:`diffquant.decoding.load_decoder`) to
    8-bit images (range 255); without a VAE its latents are compared, with their own range.
    """
    if model.latent and vae is not None:
        return decode_samples(model, samples, batch_size, vae).float(), 255.0
    if model.latent:
        return samples, sample_range(samples)
    return samples, DATA_RANGE


def content_metric(config: AllocationSpec, model: DiffusionModel, classifier: bool) -> ContentMetric:
    """The content metric ``config`` asks for on ``model`` (``auto`` resolved).

    Args:
        config: The allocation.
        model: The FP model.
        classifier: Whether the evaluation classifier is at hand (it judges only digits models).

    Raises:
        ConfigError (``content_metric``): ``classifier_kl`` on a model the evaluation classifier cannot judge.
    """
    fits = classifier and model.digits_compatible
    if config.content_metric == "classifier_kl" and not fits:
        raise ConfigError(
            "content_metric",
            "classifier_kl needs a model the evaluation classifier can judge (10 classes, 1x8x8 pixels); use ssim",
        )
    if config.content_metric == "auto":
        return REFERENCE_CONTENT_METRIC if fits else "ssim"
    return config.content_metric


def content_layers(model: DiffusionModel, config: AllocationSpec) -> set[str]:
    """The layers scored by the content metric: ``config.content_layers``, or the model family's when unset.

    Raises:
        ConfigError (``content_layers``): A glob that matches no quantizable layer.
    """
    names = quantizable_layers(model.unet)
    if config.content_layers is None:
        return matching_layers(model.family_info.content_layers, names)
    try:
        return resolve_globs(names, config.content_layers)
    except ValueError as error:
        raise ConfigError("content_layers", str(error)) from None


def final_sample_probe(
    model: DiffusionModel,
    metric: ContentMetric,
    classifier: nn.Module | None,
    samples: int,
    steps: int | SamplerSpec,
    seed: int,
    layers: set[str],
    psnr_all: bool,
    batch_size: int = 1000,
) -> Callable[[nn.Module, str], dict[str, float]]:
    """Return ``(unet, layer) -> final-sample metrics`` against FP samples from the same noise.

    For layers in ``layers`` the result has ``content`` (see the module docstring for ``metric``);
    with ``psnr_all`` every layer also gets ``psnr_db`` of the final samples. Layers needing
    neither are not sampled (an empty dict).

    Args:
        model: The FP model (its sampler settings, conditions and noise shape).
        metric: ``ssim`` or ``classifier_kl`` (needs ``classifier``).
        classifier: The evaluation classifier (``classifier_kl`` only).
        samples: Final samples per measurement.
        steps: DDIM step count or the whole sampler.
        seed: Noise seed.
        layers: The content layers.
        psnr_all: Also measure the PSNR of every layer's samples.
        batch_size: Denoiser inputs per forward of the sampling (and latents per VAE decode).
    """
    labels, _ = model.conditions(samples, "calibration")
    noise = initial_noise(samples, model.sample_shape, seed)
    clamp = not model.latent
    null = model.null_conditions(samples)

    def sample(unet: nn.Module, description: str) -> torch.Tensor:
        images, _ = run_sampler(
            unet,
            model.scheduler_config,
            noise,
            labels,
            steps,
            batch_size,
            description=description,
            clamp=clamp,
            null=null,
        )
        return images

    fp_samples = sample(model.unet, "FP samples")
    vae = load_decoder(model) if model.latent and model.vae_dir is not None and layers else None
    fp_images, data_range = comparable_images(model, fp_samples, vae, batch_size)
    fp_logp = None
    if metric == "classifier_kl":
        assert classifier is not None
        with torch.no_grad():
            fp_logp = torch.log_softmax(classifier(fp_samples), dim=1)

    def probe(unet: nn.Module, layer: str) -> dict[str, float]:
        want_content = layer in layers
        if not (want_content or psnr_all):
            return {}
        images = sample(unet, "Final samples")
        out: dict[str, float] = {}
        if want_content and fp_logp is not None:
            with torch.no_grad():
                logp = torch.log_softmax(classifier(images), dim=1)
            out["content"] = float((fp_logp.exp() * (fp_logp - logp)).sum(1).mean())
        elif want_content:
            out["content"] = max(
                0.0, 1.0 - ssim(fp_images, comparable_images(model, images, vae, batch_size)[0], data_range)
            )
        if psnr_all:
            out["psnr_db"] = psnr(fp_samples, images)
        return out

    return probe
