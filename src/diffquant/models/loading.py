"""Loading diffusion models: bundled reference models and local diffusers directories."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from diffquant.errors import ModelLoadError
from diffquant.models.reference import DIGITS_UNET, reference_dir
from diffquant.storage import check_safetensors, sha256_file

logger = logging.getLogger(__name__)

SUPPORTED_CLASSES = ("UNet2DModel",)
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PICKLE_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin", "model.ckpt", "model.pt")


@dataclass
class DiffusionModel:
    """A denoiser with what sampling and evaluation need to know about it."""

    name: str
    unet: nn.Module
    scheduler_config: dict[str, Any]
    source_dir: Path
    weights_sha256: str
    num_classes: int | None
    sample_shape: tuple[int, int, int]

    @property
    def conditional(self) -> bool:
        """True when the denoiser takes class labels."""
        return self.num_classes is not None

    @property
    def digits_compatible(self) -> bool:
        """True when the digits classifier can judge samples (10 classes, 1x8x8)."""
        return self.num_classes == 10 and self.sample_shape == (1, 8, 8)


def _model_dir(path: Path) -> tuple[Path, Path | None]:
    """Return (denoiser dir, scheduler config file or None) for a model or pipeline dir."""
    if (path / "model_index.json").is_file():
        unet_dir = path / "unet"
        sched = path / "scheduler" / "scheduler_config.json"
        if not (unet_dir / "config.json").is_file():
            raise ModelLoadError(f"{path} is a diffusers pipeline without a unet/ folder")
        return unet_dir, sched if sched.is_file() else None
    if (path / "config.json").is_file():
        sched = path / "scheduler_config.json"
        return path, sched if sched.is_file() else None
    raise ModelLoadError(f"{path} is not a diffusers model: no config.json or model_index.json in it")


def load_local_model(path: Path, name: str | None = None) -> DiffusionModel:
    """Load a UNet from a local diffusers directory (model or pipeline), safetensors only.

    Args:
        path: The directory (``save_pretrained`` output, or a pipeline with ``unet/``).
        name: Display name; defaults to the directory name.

    Raises:
        ModelLoadError: Missing directory, not a diffusers model, unsupported class, pickle
            weights, or no scheduler config.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is not a directory")
    unet_dir, sched_file = _model_dir(path)
    try:
        config = json.loads((unet_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{unet_dir / 'config.json'} is not readable JSON: {error}") from None
    class_name = config.get("_class_name")
    if class_name not in SUPPORTED_CLASSES:
        raise ModelLoadError(
            f"{unet_dir} holds a {class_name or 'non-diffusers'} model; supported: {', '.join(SUPPORTED_CLASSES)}"
        )
    weights = unet_dir / WEIGHTS_NAME
    if not weights.is_file():
        pickles = [p.name for p in unet_dir.iterdir() if p.name in PICKLE_NAMES]
        if pickles:
            raise ModelLoadError(
                f"{unet_dir / pickles[0]} is a pickle checkpoint, which can run arbitrary code; "
                "re-save the model with save_pretrained(..., safe_serialization=True)"
            )
        raise ModelLoadError(f"{unet_dir} has no {WEIGHTS_NAME}")
    check_safetensors(weights)
    if sched_file is None:
        raise ModelLoadError(
            f"{path} has no scheduler config (scheduler_config.json beside config.json, "
            "or scheduler/scheduler_config.json in a pipeline); add the training scheduler's config"
        )
    from diffusers import UNet2DModel

    try:
        unet = UNet2DModel.from_pretrained(
            str(unet_dir), use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(f"cannot load {unet_dir}: {str(error).splitlines()[0]}") from None
    embeds = unet.config.num_class_embeds
    meta_file = unet_dir / "diffquant.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    num_classes = meta.get("num_classes", embeds)
    size = unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    return DiffusionModel(
        name=name or meta.get("name") or path.name,
        unet=unet.eval().requires_grad_(False),
        scheduler_config=json.loads(sched_file.read_text()),
        source_dir=path,
        weights_sha256=sha256_file(weights),
        num_classes=num_classes,
        sample_shape=(unet.config.in_channels, size, size),
    )


def load_model(name: str | None = None, path: str | Path | None = None) -> DiffusionModel:
    """Load a bundled reference model by ``name`` or a local diffusers model from ``path``."""
    if path is not None:
        return load_local_model(Path(path))
    return load_local_model(reference_dir(name or DIGITS_UNET), name=name or DIGITS_UNET)
