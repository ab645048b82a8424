"""A latent pipeline's VAE folder: checked when the pipeline is opened, loaded only to decode samples.

The VAE (``vae/`` of a pipeline: ``config.json`` naming a diffusers autoencoder class and
``diffusion_pytorch_model.safetensors``) is never quantized; diffquant runs its decoder, in float,
to turn sampled latents into the images a person judges and image metrics compare
(:mod:`diffquant.decoding`).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from diffquant.errors import ModelLoadError
from diffquant.models.files import read_json_object

VAE_FOLDER = "vae"


def _vae_class(config_path: Path) -> tuple[type, dict]:
    """The diffusers autoencoder class ``config_path`` names, and the config's fields."""
    import diffusers

    raw = read_json_object(config_path)
    name = raw.get("_class_name")
    found = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(found, type) and issubclass(found, diffusers.ModelMixin) and hasattr(found, "decode")):
        raise ModelLoadError(
            f"{config_path}: _class_name {name!r} is not a diffusers autoencoder with a decoder (such as "
            "AutoencoderKL); diffquant decodes latent samples with the pipeline's VAE"
        )
    return found, raw


def check_vae(folder: Path, latent_channels: int) -> None:
    """Check a VAE folder without reading its weights: class, safetensors header, shapes, latent channels.

    Args:
        folder: The pipeline's ``vae/`` folder.
        latent_channels: Channels of the denoiser's samples, which the decoder must take.

    Raises:
        ModelLoadError: No ``config.json``, a class that is not a diffusers autoencoder, pickle or
            damaged weights, weights that do not match the config, or other latent channels.
    """
    from diffquant.models.loading import DIFFUSERS_WEIGHTS, _check_shapes, _checked_weights, _meta_module

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{folder} has no config.json (the VAE's diffusers config)")
    cls, raw = _vae_class(config_path)
    weights = _checked_weights(folder, DIFFUSERS_WEIGHTS)
    module = _meta_module(lambda: cls.from_config(raw), config_path, cls.__name__)
    if module is not None:
        _check_shapes(module, weights, config_path)
        channels = module.config.get("latent_channels")
        if channels is not None and int(channels) != latent_channels:
            raise ModelLoadError(
                f"{config_path}: latent_channels is {channels}, but the denoiser's samples have {latent_channels} "
                "channels, so this VAE cannot decode them (a VAE of another model, or a denoiser that takes "
                "extra input channels, such as inpainting, which diffquant does not support)"
            )


def load_vae(folder: Path) -> nn.Module:
    """Load the VAE in ``folder`` (safetensors only) on the CPU in float32, in eval mode without gradients.

    Raises:
        ModelLoadError: As :func:`check_vae`, or weights that do not load.
    """
    from diffquant.models.loading import DIFFUSERS_WEIGHTS, _checked_weights, _from_pretrained

    cls, _ = _vae_class(folder / "config.json")
    module, _ = _from_pretrained(cls, folder, _checked_weights(folder, DIFFUSERS_WEIGHTS))
    return module
