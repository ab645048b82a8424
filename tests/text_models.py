"""A tiny text-conditioned model built in memory (CLIP text encoder + cross-attention U-Net)."""

from __future__ import annotations

from pathlib import Path

import torch

from diffquant.models.denoisers import TextConditionedUNet
from diffquant.models.loading import DiffusionModel
from diffquant.models.prompts import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES, PromptSet, digit_prompts, hf_tokenize
from diffquant.models.reference import SCHEDULER_CONFIG
from diffquant.sampling import Trajectories


def tiny_text_model(bos_scale: float | None = None, seed: int = 0) -> DiffusionModel:
    """A random tiny ``text-unet`` model; ``bos_scale`` multiplies the encoder's BOS state.

    Real CLIP encoders give the BOS token a constant, outlying state (MixDQ: about 800 against
    10-15); ``bos_scale`` emulates that with a forward hook on the text encoder.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffquant.models.prompts import build_word_tokenizer

    tokenizer = build_word_tokenizer([p.text for p in digit_prompts(TRAIN_TEMPLATES)], 10)
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=10,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config._attn_implementation = "eager"
    encoder = CLIPTextModel(config).eval()
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()
    if bos_scale is not None:

        def scale_bos(module, inputs, output):
            output.last_hidden_state[:, 0] *= bos_scale
            return output

        encoder.register_forward_hook(scale_bos)
    prompts = PromptSet(digit_prompts(TRAIN_TEMPLATES), digit_prompts(HELD_OUT_TEMPLATES), hf_tokenize(tokenizer))
    return DiffusionModel(
        name="tiny-t2i",
        unet=TextConditionedUNet(encoder, unet).requires_grad_(False),
        scheduler_config=dict(SCHEDULER_CONFIG),
        source_dir=Path("."),
        weights_sha256="-",
        num_classes=10,
        sample_shape=(1, 8, 8),
        family="text-unet",
        condition="text",
        prompts=prompts,
    )


def text_inputs(model: DiffusionModel, n: int = 40, seed: int = 0) -> Trajectories:
    """Random denoiser inputs with calibration prompts (noise levels spread over the schedule)."""
    generator = torch.Generator().manual_seed(seed)
    ids, _ = model.conditions(n, "calibration")
    assert ids is not None
    x = torch.randn((n, *model.sample_shape), generator=generator)
    t = torch.randint(0, 1000, (n,), generator=generator)
    return Trajectories(x, t, ids)
