"""CLIP score of generated images against their prompts, with a CLIP model from a local folder.

``evaluate.clip_model`` names a folder holding a transformers ``CLIPModel`` (``config.json`` with
``model_type: clip``, ``model.safetensors``), its tokenizer and its ``preprocessor_config.json``:
e.g. ``CLIPModel.save_pretrained`` and ``CLIPProcessor.save_pretrained`` of
``openai/clip-vit-large-patch14`` into one folder. Nothing is downloaded.

The score is torchmetrics' ``CLIPScore`` definition, ``max(100 * mean_i cos(E_image_i, E_prompt_i), 0)``
with the projected image and text embeddings; images go through the folder's own image processor
(resize, center crop, normalization) as 8-bit RGB. It is computed here with transformers directly:
torchmetrics 1.9's ``CLIPScore`` cannot run with transformers 5, whose ``get_image_features``
returns a model output instead of a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffquant.errors import ConfigError, ModelLoadError
from diffquant.models.loading import _check_shapes, _checked_weights, _meta_module, _one_line

CLIP_WEIGHTS = "model.safetensors"
PROCESSOR_CONFIG = "preprocessor_config.json"
_WHAT = (
    "a local CLIP model folder (CLIPModel and CLIPProcessor saved with save_pretrained: config.json, "
    f"{CLIP_WEIGHTS}, the tokenizer files and {PROCESSOR_CONFIG})"
)


def _refuse(message: str) -> ConfigError:
    return ConfigError("clip_model", message)


def _quiet_transformers():
    """Silence transformers' warnings and progress bars; returns a function that restores them."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    def restore() -> None:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()

    return restore


def _config(folder: Path) -> Any:
    from transformers import CLIPConfig

    from diffquant.models.files import read_json_object

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise _refuse(f"{folder} has no config.json, so it is not {_WHAT}")
    try:
        model_type = read_json_object(config_path).get("model_type")
    except ModelLoadError as error:
        raise _refuse(str(error)) from None
    if model_type != "clip":
        raise _refuse(
            f"{config_path} has model_type {model_type!r}, not 'clip': give {_WHAT}, with both the text and "
            "the vision tower"
        )
    try:
        return CLIPConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise _refuse(f"{config_path} is not a usable CLIP config: {_one_line(error)}") from None


def check_clip_model(folder: str | Path, text_model: bool = True) -> None:
    """Refuse, before any work, a ``clip_model`` folder that is missing or not a loadable CLIP model.

    Reads the configs and the tokenizer and checks the weights' safetensors header and shapes
    against the config (the weights themselves are not read).

    Args:
        folder: The CLIP model folder.
        text_model: Whether the model to evaluate is text-conditioned (CLIP score needs its prompts).

    Raises:
        ConfigError (``clip_model``): One line naming the folder and what is wrong.
    """
    if not text_model:
        raise _refuse("the model is not text-conditioned, so there are no prompts to score images against; unset it")
    path = Path(folder)
    if not path.is_dir():
        state = "is not a folder" if path.exists() else "does not exist"
        raise _refuse(f"{path} {state}; give {_WHAT}; nothing is downloaded")
    config = _config(path)
    if not (path / PROCESSOR_CONFIG).is_file():
        raise _refuse(f"{path} has no {PROCESSOR_CONFIG} (CLIP's image preprocessing); save the CLIPProcessor there")
    try:
        weights = _checked_weights(path, CLIP_WEIGHTS)
        from transformers import CLIPModel

        module = _meta_module(lambda: CLIPModel(config), path / "config.json", "CLIPModel")
        if module is not None:
            _check_shapes(module, weights, path / "config.json")
    except ModelLoadError as error:
        raise _refuse(str(error)) from None
    _processor(path)


def _processor(folder: Path) -> tuple[Any, Any]:
    """The folder's tokenizer and image processor."""
    restore = _quiet_transformers()  # transformers 5 warns on import that torchvision is missing
    try:
        from transformers import AutoTokenizer, CLIPImageProcessor

        return (
            AutoTokenizer.from_pretrained(str(folder), local_files_only=True),
            CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True),
        )
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise _refuse(f"cannot load the tokenizer or image processor in {folder}: {_one_line(error)}") from None
    finally:
        restore()


@dataclass
class ClipScorer:
    """A CLIP model with its tokenizer and image processor, loaded from ``folder``."""

    model: nn.Module
    tokenizer: Any
    image_processor: Any
    folder: Path

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return next(self.model.parameters()).device

    def _image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        rgb = images if images.shape[1] == 3 else images[:, :1].expand(-1, 3, -1, -1)
        arrays = list(rgb.permute(0, 2, 3, 1).contiguous().numpy())
        pixels = self.image_processor(images=arrays, return_tensors="pt")["pixel_values"]
        pooled = self.model.vision_model(pixel_values=pixels.to(self.device)).pooler_output
        return self.model.visual_projection(pooled)

    def _text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        pooled = self.model.text_model(
            input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
        ).pooler_output
        return self.model.text_projection(pooled)

    @torch.no_grad()
    def similarities(self, images: torch.Tensor, prompts: list[str], batch_size: int) -> torch.Tensor:
        """Cosine similarity of each image's CLIP embedding with its prompt's (float64, CPU).

        Args:
            images: ``uint8`` images (N, C, H, W), C = 3 (RGB) or 1 (grey, repeated to RGB).
            prompts: One prompt per image (image ``i`` with prompt ``i``).
            batch_size: Images per forward pass.
        """
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("CLIP score takes uint8 images (N, C, H, W)")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        out = []
        for start in range(0, len(prompts), batch_size):
            image = self._image_embeddings(images[start : start + batch_size])
            text = self._text_embeddings(prompts[start : start + batch_size])
            out.append(torch.nn.functional.cosine_similarity(image.double(), text.double(), dim=-1).cpu())
        return torch.cat(out)

    def score(self, images: torch.Tensor, prompts: list[str], batch_size: int) -> float:
        """CLIP score of ``images`` against ``prompts``: ``max(100 * mean cosine similarity, 0)``.

        Args:
            images: As :meth:`similarities`.
            prompts: One prompt per image.
            batch_size: Images per forward pass.
        """
        return max(100.0 * float(self.similarities(images, prompts, batch_size).mean()), 0.0)


def load_clip(folder: str | Path, device: torch.device | str = "cpu") -> ClipScorer:
    """Check and load the CLIP model in ``folder`` (float32, eval mode) onto ``device``.

    Raises:
        ConfigError (``clip_model``): As :func:`check_clip_model`, or weights that do not load.
    """
    from transformers import CLIPModel

    path = Path(folder)
    check_clip_model(path)
    tokenizer, image_processor = _processor(path)
    restore = _quiet_transformers()
    try:
        model = CLIPModel.from_pretrained(str(path), use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as error:
        raise _refuse(f"cannot load the CLIP model in {path}: {_one_line(error)}") from None
    finally:
        restore()
    model = model.float().eval().requires_grad_(False).to(device)
    return ClipScorer(model, tokenizer, image_processor, path)
