"""The bundled reference models (the "zoo"): configs, builders and loaders.

Weights live inside the package as safetensors next to their configs and model cards, under
``diffquant/models/weights/<name>/``. They are produced by ``diffquant train-reference``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from diffquant.errors import ModelLoadError

DIGITS_UNET = "digits-unet"
DIGITS_DIT = "digits-dit"
DIGITS_T2I = "digits-t2i"
DIGITS_CLASSIFIER = "digits-classifier"
REFERENCE_MODELS = (DIGITS_UNET, DIGITS_DIT, DIGITS_T2I)
NULL_CLASS = 10

DIGITS_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
    "num_class_embeds": 11,
}

DIGITS_DIT_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "patch_size": 2,
    "num_layers": 6,
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "num_embeds_ada_norm": 10,
    "norm_num_groups": 32,
}
"""digits-dit: 16 tokens of 2x2 patches, width 64, six AdaLN-Zero blocks (about 0.6M parameters)."""

DIGITS_T2I_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
"""digits-t2i's U-Net: cross-attention at 4x4 and in the middle block."""

DIGITS_T2I_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 10,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
"""digits-t2i's text encoder (a CLIPTextModel; vocab size comes from the tokenizer)."""

T2I_MAX_TOKENS = 10

SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
}


def weights_root() -> Path:
    """Return the folder that holds the bundled weights."""
    return Path(str(resources.files("diffquant.models") / "weights"))


def reference_dir(name: str) -> Path:
    """Return the bundled directory of reference model ``name``.

    Raises:
        ModelLoadError: If ``name`` is not a bundled model or its weights are missing.
    """
    known = (*REFERENCE_MODELS, DIGITS_CLASSIFIER)
    if name not in known:
        raise ModelLoadError(f"unknown reference model {name!r}; bundled models: {', '.join(REFERENCE_MODELS)}")
    path = weights_root() / name
    if not path.is_dir():
        raise ModelLoadError(f"bundled weights for {name!r} are missing at {path}; run `diffquant train-reference`")
    return path


def build_digits_unet():
    """Build an untrained ``digits-unet`` (diffusers ``UNet2DModel``, about 1.1M parameters)."""
    from diffusers import UNet2DModel

    return UNet2DModel(**DIGITS_UNET_CONFIG)


def build_digits_dit():
    """Build an untrained ``digits-dit`` (diffusers ``DiTTransformer2DModel``)."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**DIGITS_DIT_CONFIG)


def build_digits_t2i(vocab_size: int):
    """Build an untrained ``digits-t2i``: a CLIP text encoder and a cross-attention U-Net.

    Returns:
        A :class:`~diffquant.models.denoisers.TextConditionedUNet`.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffquant.models.denoisers import TextConditionedUNet

    text_config = CLIPTextConfig(vocab_size=vocab_size, **DIGITS_T2I_TEXT_CONFIG)
    text_config._attn_implementation = "eager"
    return TextConditionedUNet(CLIPTextModel(text_config), UNet2DConditionModel(**DIGITS_T2I_UNET_CONFIG))


def load_classifier(path: Path | None = None):
    """Load the evaluation classifier from safetensors (bundled by default).

    Args:
        path: Directory holding ``model.safetensors`` and ``config.json``; bundled if None.

    Returns:
        A ``DigitClassifier`` in eval mode.
    """
    from diffquant.models.classifier import DigitClassifier
    from diffquant.storage import load_safetensors

    folder = path or reference_dir(DIGITS_CLASSIFIER)
    config = json.loads((folder / "config.json").read_text())
    model = DigitClassifier(num_classes=config["num_classes"], feature_dim=config["feature_dim"])
    model.load_state_dict(load_safetensors(folder / "model.safetensors"))
    return model.eval()
