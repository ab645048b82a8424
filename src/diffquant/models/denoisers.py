"""Denoiser wrappers: one calling convention for every model family.

Everything downstream (sampling, calibration, sensitivity, fine-tuning, export) calls a denoiser
as ``denoiser(sample, timestep, condition).sample`` where ``condition`` is None (unconditional),
class ids ``(N,)`` (``UNet2DModel``, ``DiTTransformer2DModel`` take these natively) or token ids
``(N, L)``. Text-conditioned models are wrapped here so that the text encoder runs inside the
denoiser: its layers are then quantizable, listed in the plan and exported with the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class DenoiserOutput:
    """The wrapped denoisers' return value (diffusers models return ``.sample`` likewise)."""

    sample: torch.Tensor


class TextConditionedUNet(nn.Module):
    """``(sample, timestep, input_ids)`` over a text encoder and a ``UNet2DConditionModel``.

    The encoder's ``last_hidden_state`` is the U-Net's ``encoder_hidden_states`` (its
    cross-attention keys and values), as in Stable Diffusion 1.x.
    """

    def __init__(self, text_encoder: nn.Module, unet: nn.Module) -> None:
        """Wrap ``text_encoder`` (e.g. ``CLIPTextModel``) and ``unet``."""
        super().__init__()
        self.text_encoder = text_encoder
        self.unet = unet

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text-encoder hidden states ``(N, L, D)`` for token ids ``(N, L)``."""
        return self.text_encoder(input_ids).last_hidden_state

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, input_ids: torch.Tensor) -> DenoiserOutput:
        """Predict noise for ``sample`` at ``timestep`` conditioned on ``input_ids``."""
        hidden = self.encode(input_ids)
        return DenoiserOutput(self.unet(sample, timestep, encoder_hidden_states=hidden).sample)
