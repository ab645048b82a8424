"""Stable Diffusion 1.5-layout pipelines with random weights, at a chosen fraction of SD's width.

Used by ``bench/scale.py`` (CPU, 1/16 to 1/4 width) and ``bench/gpu_check.py`` (full width on a GPU).
Nothing is downloaded: the U-Net is SD 1.5's ``UNet2DConditionModel`` layout (four resolution
levels, ``CrossAttnDownBlock2D`` x 3 + ``DownBlock2D``, two ResNet blocks per level, a cross-attention
mid block) with every channel count multiplied by ``width``; the text encoder is a small CLIP text
model (``text_layers`` layers) of the U-Net's cross-attention width over a byte-level BPE tokenizer
written here. At ``width=1`` the U-Net has SD 1.5's 859.5M parameters.

The folder is a diffusers pipeline folder (``model_index.json`` + ``unet/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``; ``vae/`` when asked), loaded with ``diffquant.load_model(path=...)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

SD15_CHANNELS = (320, 640, 1280, 1280)
SD15_CROSS_ATTENTION = 768
SD15_HEADS = 8
MAX_TOKENS = 16
SD_SCHEDULER: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "clip_sample": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
PROMPTS = (
    "a red cat on a chair",
    "a photo of a mountain lake at dawn",
    "an astronaut riding a horse",
    "a bowl of fruit, oil painting",
    "rain at night in a city",
    "a small wooden boat on the sea",
    "a castle in the clouds",
    "a portrait of an old man",
)


def unet_config(width: float, sample_size: int) -> dict[str, Any]:
    """SD 1.5's U-Net config with every channel count (and the cross-attention width) times ``width``."""
    channels = tuple(max(8, round(c * width)) for c in SD15_CHANNELS)
    groups = max(1, round(32 * width)) if width < 1 else 32
    heads = SD15_HEADS if all(c % SD15_HEADS == 0 for c in channels) else 4
    return {
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "block_out_channels": list(channels),
        "layers_per_block": 2,
        "cross_attention_dim": max(16, round(SD15_CROSS_ATTENTION * width)),
        "attention_head_dim": heads,
        "norm_num_groups": groups,
    }


def _vocab() -> dict[str, int]:
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [*alphabet, *(f"{ch}</w>" for ch in alphabet), "<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


def _write_tokenizer(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_TOKENS,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return len(vocab)


def write_prompts(path: Path) -> Path:
    """Write the prompts file the pipeline is calibrated and evaluated with."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def save_sd_layout(
    folder: Path,
    width: float,
    sample_size: int = 32,
    text_layers: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    vae: bool = False,
) -> Path:
    """Write an SD 1.5-layout pipeline with random weights to ``folder`` (returned).

    Args:
        folder: Target folder (created).
        width: Fraction of SD 1.5's channel counts (1.0: the real layout, 859.5M U-Net parameters).
        sample_size: Latent height and width (64 for SD 1.5's 512x512 images).
        text_layers: Layers of the CLIP text encoder (SD's has 12; a small one keeps the bench about the U-Net).
        seed: Weight seed.
        dtype: Stored weight dtype (bfloat16 halves the folder at full width).
        vae: Also write a tiny VAE (2 levels, 8 channels), making it a latent model that is decoded for images.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = unet_config(width, sample_size)
    UNet2DConditionModel(**config).to(dtype).save_pretrained(str(folder / "unet"), safe_serialization=True)
    vocab_size = _write_tokenizer(folder / "tokenizer")
    hidden = config["cross_attention_dim"]
    text = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=max(1, hidden // 64) if hidden % 64 == 0 else 4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=hidden,
        pad_token_id=vocab_size - 1,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
    )
    CLIPTextModel(text).to(dtype).save_pretrained(str(folder / "text_encoder"), safe_serialization=True)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_SCHEDULER))
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    if vae:
        AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 8),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=2 * sample_size,
        ).to(dtype).save_pretrained(str(folder / "vae"), safe_serialization=True)
        index["vae"] = ["diffusers", "AutoencoderKL"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def unet_parameters(width: float) -> int:
    """Parameters of the layout's U-Net at ``width``, counted on the meta device (nothing allocated)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return sum(p.numel() for p in UNet2DConditionModel(**unet_config(width, 8)).parameters())
