"""Decoded images of latent samples: the pipeline's float VAE, as diffusers' pipelines decode.

A latent model's samples are latents; a person judges images, and image metrics (PSNR, SSIM, CLIP
score) compare images. The pipeline's VAE (never quantized) decodes them as the diffusers pipelines
do: ``latents * latents_std / scaling_factor + latents_mean`` when the VAE config has latent
statistics (SDXL-style), else ``latents / scaling_factor + shift_factor`` (``shift_factor`` where the
config has one), then ``vae.decode(...).sample`` clamped to [-1, 1]. Images are kept as 8-bit
(``uint8``, ``(N, C, H, W)``): what a pipeline's ``output_type="pil"`` gives and a person saves.

The VAE runs on the denoiser's device in its dtype, except a ``force_upcast`` VAE in float16, which
runs in float32 as diffusers' SDXL pipeline does (its activations overflow float16).
"""

from __future__ import annotations

import torch
from torch import nn

from diffquant.models.loading import DiffusionModel
from diffquant.models.vae import load_vae
from diffquant.placement import module_placement, place, to_module, to_storage


def to_8bit(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as ``uint8`` (0-255), ``round((x + 1) * 127.5)`` after clamping."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_8bit(images: torch.Tensor) -> torch.Tensor:
    """``uint8`` images back to float32 in [-1, 1]."""
    return images.float() / 127.5 - 1


def unscale_latents(latents: torch.Tensor, config) -> torch.Tensor:
    """Latents as the VAE's decoder takes them (the inverse of the pipelines' latent scaling)."""
    scaling = float(getattr(config, "scaling_factor", None) or 1.0)
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        mean = torch.tensor(mean, dtype=latents.dtype, device=latents.device).view(shape)
        std = torch.tensor(std, dtype=latents.dtype, device=latents.device).view(shape)
        return latents * std / scaling + mean
    shift = getattr(config, "shift_factor", None)
    return latents / scaling + (float(shift) if shift is not None else 0.0)


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Decode ``latents`` (N, C, h, w) with ``vae`` in batches; images in [-1, 1], float32 on the CPU.

    Args:
        vae: A diffusers autoencoder (``vae.decode(z).sample``, ``vae.config.scaling_factor``).
        latents: Sampled latents, as the denoiser produces them.
        batch_size: Latents per decoder pass.
    """
    device, dtype = module_placement(vae)
    images = []
    for start in range(0, latents.shape[0], batch_size):
        z = unscale_latents(latents[start : start + batch_size].to(device, torch.float32), vae.config)
        images.append(to_storage(vae.decode(to_module(z, device, dtype)).sample).clamp(-1, 1))
    return torch.cat(images)


def load_decoder(model: DiffusionModel) -> nn.Module:
    """The VAE of ``model``, placed where its denoiser runs (float32 for a float16 ``force_upcast`` VAE).

    Raises:
        ValueError: If the model has no VAE (``model.vae_dir`` is None).
    """
    if model.vae_dir is None:
        raise ValueError(f"{model.name} has no VAE to decode its samples with")
    vae = load_vae(model.vae_dir)
    device, dtype = module_placement(model.unet)
    if dtype is torch.float16 and vae.config.get("force_upcast", False):
        dtype = torch.float32
    return place(vae, device, dtype)


def decode_samples(
    model: DiffusionModel, latents: torch.Tensor, batch_size: int, vae: nn.Module | None = None
) -> torch.Tensor:
    """``model``'s sampled latents as 8-bit images ``(N, 3, H, W)`` decoded by its VAE.

    Args:
        model: A latent model with a VAE (``model.vae_dir``).
        latents: Its samples.
        batch_size: Latents per decoder pass.
        vae: The decoder if already loaded (:func:`load_decoder`); loaded here otherwise.
    """
    return to_8bit(decode_latents(vae if vae is not None else load_decoder(model), latents, batch_size))
