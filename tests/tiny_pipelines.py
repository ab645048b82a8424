"""Tiny diffusers pipelines built from configs and saved to a folder, as a user's own models would be.

Nothing is downloaded: every component is built from a small config with seeded random weights
and written with ``save_pretrained(..., safe_serialization=True)``. The layouts are the ones of the
real pipelines (``model_index.json`` plus one folder per component): Stable Diffusion 1.x
(``StableDiffusionPipeline``), SDXL (``StableDiffusionXLPipeline``), PixArt-alpha
(``PixArtAlphaPipeline``), and bare ``UNet2DModel`` / ``DiTTransformer2DModel`` folders with a
``scheduler_config.json`` beside them.

The CLIP tokenizers are byte-level BPE over a tiny vocabulary written here as ``vocab.json`` and
``merges.txt`` (the files a real SD tokenizer folder holds); the T5 tokenizer is a tiny Unigram
model saved as ``tokenizer.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

MAX_TOKENS = 16
"""Token length of every tiny tokenizer (77 for CLIP, 120 or 300 for PixArt's T5 in the real ones)."""

LATENT_CHANNELS = 4
LATENT_SIZE = 8

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
"""Stable Diffusion 1.5's scheduler config (PNDM; diffquant samples with DDIM from it)."""

PROMPTS = (
    "a red cat",
    "a photo of a mountain lake at dawn",
    "an astronaut",
    "a bowl of fruit, oil painting",
    "rain at night",
    "a small wooden boat on the sea",
)
"""Prompts short enough to be padded and long enough to be truncated at :data:`MAX_TOKENS`."""

CLIP_MERGES = (("a", "t</w>"), ("c", "at</w>"), ("r", "ed</w>"), ("e", "d</w>"), ("o", "n</w>"))
"""A few byte-level BPE merges (the vocabulary is otherwise single characters)."""


def write_prompts(path: Path, prompts: tuple[str, ...] = PROMPTS) -> Path:
    """Write a prompts file (one per line, with a comment line that the reader must skip)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# prompts for calibration and evaluation\n" + "\n".join(prompts) + "\n")
    return path


def clip_vocab() -> dict[str, int]:
    """Byte-level BPE vocabulary: every byte character, its ``</w>`` form, the merges and the specials."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [*alphabet, *(f"{ch}</w>" for ch in alphabet), *(a + b for a, b in CLIP_MERGES)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


def _clip_tokenizer_config(pad_token: str) -> dict[str, Any]:
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_TOKENS,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "do_lower_case": True,
    }


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A byte-level BPE ``CLIPTokenizer`` over :func:`clip_vocab`, built in memory.

    Args:
        pad_token: ``<|endoftext|>`` as in SD 1.x; SDXL's second tokenizer pads with ``!``.
    """
    from transformers import CLIPTokenizer

    config = _clip_tokenizer_config(pad_token)
    del config["tokenizer_class"], config["do_lower_case"]
    return CLIPTokenizer(vocab=clip_vocab(), merges=list(CLIP_MERGES), **config)


def write_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> Path:
    """Write a CLIP tokenizer folder as real SD repos hold it: ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``."""
    import shutil

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(clip_vocab()))
    merges = "\n".join(f"{a} {b}" for a, b in CLIP_MERGES)
    (folder / "merges.txt").write_text(f"#version: 0.2\n{merges}\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(_clip_tokenizer_config(pad_token)))
    return folder


def clip_text_encoder(tokenizer, with_projection: bool = False, hidden_size: int = 32):
    """A 2-layer CLIP text encoder of width ``hidden_size`` over ``tokenizer``'s vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=hidden_size,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def tiny_vae():
    """A tiny ``AutoencoderKL`` with 4 latent channels (diffquant never runs it: it marks latents)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=2 * LATENT_SIZE,
    )


def tiny_condition_unet(cross_attention_dim: int, **extra: Any):
    """A ``UNet2DConditionModel`` on 4x8x8 latents with cross-attention at 8x8 and in the middle."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
        **extra,
    )


def _scheduler(config: dict[str, Any]):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config)


def save_tiny_sd(folder: Path, seed: int = 0) -> Path:
    """Save a tiny Stable Diffusion 1.x pipeline (no safety checker) to ``folder``."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(seed)
    folder = Path(folder)
    tokenizer = clip_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=clip_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=tiny_condition_unet(cross_attention_dim=32),
        scheduler=_scheduler(SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    write_clip_tokenizer(folder / "tokenizer")
    return folder


def save_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """Save a tiny SDXL pipeline (two CLIP text encoders, ``text_time`` added conditions) to ``folder``.

    Encoder widths 32 and 48 give cross-attention width 80; the pooled projection of encoder 2
    (48) plus six time ids of 8 features each give the added-embedding input (96).
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(seed)
    folder = Path(folder)
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer(pad_token="!")
    unet = tiny_condition_unet(
        cross_attention_dim=80,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=48 + 6 * 8,
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=clip_text_encoder(tokenizer, hidden_size=32),
        text_encoder_2=clip_text_encoder(tokenizer_2, with_projection=True, hidden_size=48),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config({k: v for k, v in SD_SCHEDULER.items() if k != "clip_sample"}),
        add_watermarker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    write_clip_tokenizer(folder / "tokenizer")
    write_clip_tokenizer(folder / "tokenizer_2", pad_token="!")
    return folder


def t5_tokenizer():
    """A tiny T5 Unigram tokenizer: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then letters and digits."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    chars = "abcdefghijklmnopqrstuvwxyz0123456789,.!"
    pieces += [(f"\u2581{ch}", -3.0) for ch in chars] + [(ch, -4.0) for ch in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=MAX_TOKENS)


def save_tiny_pixart(folder: Path, seed: int = 0, learned_sigma: bool = True) -> Path:
    """Save a tiny PixArt-alpha pipeline (T5 encoder + ``PixArtTransformer2DModel``) to ``folder``.

    Args:
        folder: Target folder.
        seed: Weight seed.
        learned_sigma: The transformer predicts noise and variance (``out_channels`` = 2 x
            ``in_channels``), as PixArt-alpha does.
    """
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    text_config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    transformer = PixArtTransformer2DModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=2 * LATENT_CHANNELS if learned_sigma else LATENT_CHANNELS,
        patch_size=2,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        cross_attention_dim=32,
        caption_channels=32,
        norm_num_groups=8,
    )
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon"
    )
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=T5EncoderModel(text_config),
        vae=tiny_vae(),
        transformer=transformer,
        scheduler=scheduler,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


def save_tiny_dit(folder: Path, seed: int = 0) -> Path:
    """Save a bare class-conditional ``DiTTransformer2DModel`` with a ``scheduler_config.json`` beside it."""
    from diffusers import DiTTransformer2DModel

    from diffquant.models.reference import SCHEDULER_CONFIG

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        patch_size=2,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        num_embeds_ada_norm=5,
        norm_num_groups=8,
    )
    model.save_pretrained(str(folder), safe_serialization=True)
    (Path(folder) / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG))
    return Path(folder)


def save_tiny_clip(folder: Path, seed: int = 0, image_size: int = 16) -> Path:
    """Save a tiny random ``CLIPModel`` with the tiny CLIP tokenizer and a ``CLIPImageProcessor`` to ``folder``.

    The layout of a real CLIP folder (``openai/clip-vit-large-patch14`` saved with
    ``save_pretrained``): ``config.json`` (``model_type: clip``), ``model.safetensors``, the
    tokenizer files and ``preprocessor_config.json``; images are resized to ``image_size``.
    Both towers' final layer norms get the bias 1 and share one projection, so image and text
    embeddings share a direction (cosines around 0.5, as a trained CLIP's are positive): a purely
    random CLIP's mean cosine can be negative, which the CLIP score floors to 0 for any images.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = write_clip_tokenizer(Path(folder))
    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_TOKENS,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": image_size // 2,
    }
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    with torch.no_grad():
        model.text_projection.weight.copy_(model.visual_projection.weight)
        model.vision_model.post_layernorm.bias.fill_(1.0)
        model.text_model.final_layer_norm.bias.fill_(1.0)
    model.save_pretrained(str(folder), safe_serialization=True)
    size = {"height": image_size, "width": image_size}
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=size).save_pretrained(str(folder))
    return folder
