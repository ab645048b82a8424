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


T5_FEED_FORWARDS = ("T5DenseActDense", "T5DenseGatedActDense")


class T5FeedForward(nn.Module):
    """T5's feed-forward block (plain or gated), computed the same way without probing ``wo.weight``.

    transformers' ``T5DenseActDense``/``T5DenseGatedActDense`` read ``self.wo.weight.dtype`` to
    keep ``wo`` in float32 inside float16 models. The ONNX export swaps each planned Linear for a
    module that stores its weight transposed (no ``weight`` attribute), so that probe breaks the
    trace; diffquant runs float32 throughout, where the cast is a no-op. The children (``wi`` or
    ``wi_0``/``wi_1``, ``wo``, ``act``, ``dropout``) are the original modules under the same names,
    so layer names do not change.
    """

    def __init__(self, original: nn.Module) -> None:
        """Adopt ``original``'s children."""
        super().__init__()
        for name, child in original.named_children():
            self.add_module(name, child)
        self.gated = hasattr(original, "wi_0")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``wo(dropout(act(wi_0(x)) * wi_1(x)))`` (gated) or ``wo(dropout(act(wi(x))))``."""
        if self.gated:
            hidden = self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states)
        else:
            hidden = self.act(self.wi(hidden_states))
        return self.wo(self.dropout(hidden))


def replace_t5_feed_forwards(text_encoder: nn.Module) -> int:
    """Swap every T5 feed-forward block of ``text_encoder`` for :class:`T5FeedForward`; return how many."""
    count = 0
    for module in list(text_encoder.modules()):
        for name, child in list(module.named_children()):
            if type(child).__name__ in T5_FEED_FORWARDS:
                setattr(module, name, T5FeedForward(child))
                count += 1
    return count


class PixArtDenoiser(nn.Module):
    """``(sample, timestep, input_ids)`` over a T5 encoder and a ``PixArtTransformer2DModel``.

    As diffusers' ``PixArtAlphaPipeline`` does: the attention mask is ``input_ids != pad``; the
    encoder runs with it and the transformer gets it as ``encoder_attention_mask``; a model that
    predicts its variance too (``out_channels == 2 * in_channels``, learned sigma) returns only
    the noise half. Transformers trained with resolution/aspect-ratio conditions (PixArt-alpha
    1024px, ``use_additional_conditions``) get the pixel size ``vae_scale_factor`` x the latent
    size and aspect ratio H/W; the others get ``{"resolution": None, "aspect_ratio": None}``.

    Two changes let the legacy ONNX exporter trace it; neither changes a number (a test holds
    the output equal to ``transformer(...)``'s):

    - the T5 feed-forward blocks are swapped for :class:`T5FeedForward` (same layers, same names);
    - :meth:`run_transformer` runs the transformer's own modules in the order of diffusers'
      ``PixArtTransformer2DModel.forward`` but leaves out its ``squeeze(1)`` after ``proj_out``
      (a no-op for more than one token). The tracer cannot tell the token axis is not 1 there, so
      it exports that squeeze as an ``If`` whose untaken branch strict ONNX shape inference rejects.
    """

    def __init__(
        self, text_encoder: nn.Module, transformer: nn.Module, pad_token_id: int, vae_scale_factor: int = 8
    ) -> None:
        """Wrap ``text_encoder`` (``T5EncoderModel``) and ``transformer``; ``pad_token_id`` masks padding."""
        super().__init__()
        replace_t5_feed_forwards(text_encoder)
        self.text_encoder = text_encoder
        self.transformer = transformer
        self.pad_token_id = pad_token_id
        self.vae_scale_factor = vae_scale_factor
        config = transformer.config
        self.in_channels = int(config.in_channels)
        self.learned_sigma = int(config.out_channels or config.in_channels) == 2 * self.in_channels

    def attention_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """1 for real tokens, 0 for padding: ``(N, L)`` int64."""
        return (input_ids != self.pad_token_id).long()

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """T5 hidden states ``(N, L, D)`` (computed with the padding mask) for token ids ``(N, L)``."""
        return self.text_encoder(input_ids, attention_mask=self.attention_mask(input_ids)).last_hidden_state

    def added_conditions(self, sample: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """``added_cond_kwargs`` for the transformer: resolution and aspect ratio, or None for both."""
        if not getattr(self.transformer, "use_additional_conditions", False):
            return {"resolution": None, "aspect_ratio": None}
        n, (h, w) = sample.shape[0], sample.shape[-2:]
        height, width = h * self.vae_scale_factor, w * self.vae_scale_factor
        resolution = torch.tensor([[height, width]], dtype=sample.dtype).expand(n, 2)
        aspect_ratio = torch.tensor([[height / width]], dtype=sample.dtype).expand(n, 1)
        return {"resolution": resolution, "aspect_ratio": aspect_ratio}

    def run_transformer(
        self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The transformer's output ``(N, out_channels, H, W)``, computed from its own modules."""
        tr = self.transformer
        patch = tr.config.patch_size
        n, height, width = sample.shape[0], sample.shape[-2] // patch, sample.shape[-1] // patch
        bias = ((1 - mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        x = tr.pos_embed(sample)
        t, embedded_t = tr.adaln_single(timestep, self.added_conditions(sample), batch_size=n, hidden_dtype=x.dtype)
        if tr.caption_projection is not None:
            hidden = tr.caption_projection(hidden).view(n, -1, x.shape[-1])
        for block in tr.transformer_blocks:
            x = block(
                x,
                attention_mask=None,
                encoder_hidden_states=hidden,
                encoder_attention_mask=bias,
                timestep=t,
                cross_attention_kwargs=None,
                class_labels=None,
            )
        shift, scale = (tr.scale_shift_table[None] + embedded_t[:, None]).chunk(2, dim=1)
        x = tr.proj_out(tr.norm_out(x) * (1 + scale) + shift)
        x = x.reshape(-1, height, width, patch, patch, tr.out_channels)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(-1, tr.out_channels, height * patch, width * patch)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, input_ids: torch.Tensor) -> DenoiserOutput:
        """Predict noise for ``sample`` at ``timestep`` conditioned on ``input_ids``."""
        out = self.run_transformer(sample, timestep, self.encode(input_ids), self.attention_mask(input_ids))
        return DenoiserOutput(out[:, : self.in_channels] if self.learned_sigma else out)


class SDXLDenoiser(nn.Module):
    """``(sample, timestep, input_ids)`` over SDXL's two CLIP text encoders and its U-Net.

    ``input_ids`` is ``(N, 2L)``: the first tokenizer's ids, then the second's (both pad to L, as
    their states are concatenated per token), split at ``split = L``. As diffusers' ``StableDiffusionXLPipeline`` does (``clip_skip`` None): the
    cross-attention states are both encoders' penultimate hidden states concatenated on the
    feature axis, ``text_embeds`` is encoder 2's pooled projection, and ``time_ids`` are the
    constant ``(H, W, 0, 0, H, W)`` of the pixel size (``vae_scale_factor`` x the latent size:
    original size = target size, no crop).

    Encoder 1's last layer and final norm feed nothing in SDXL, so they are dropped here: every
    remaining layer then sees calibration data, and the export holds no dead layers.
    """

    def __init__(
        self,
        text_encoder: nn.Module,
        text_encoder_2: nn.Module,
        unet: nn.Module,
        split: int,
        vae_scale_factor: int = 8,
    ) -> None:
        """Wrap ``text_encoder`` (``CLIPTextModel``), ``text_encoder_2`` (``CLIPTextModelWithProjection``) and ``unet``."""
        super().__init__()
        core = getattr(text_encoder, "text_model", text_encoder)  # transformers 4 nests it, 5 does not
        core.encoder.layers = nn.ModuleList(list(core.encoder.layers)[:-1])
        core.final_layer_norm = nn.Identity()
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.unet = unet
        self.split = split
        self.vae_scale_factor = vae_scale_factor

    def encode_with_pooled(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention states ``(N, L, D1 + D2)`` and encoder 2's pooled projection ``(N, P)``."""
        first = self.text_encoder(input_ids[:, : self.split], output_hidden_states=True)
        second = self.text_encoder_2(input_ids[:, self.split :], output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-1], second.hidden_states[-2]], dim=-1)
        return hidden, second.text_embeds

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Cross-attention states ``(N, L, D1 + D2)`` for token ids ``(N, 2L)``."""
        return self.encode_with_pooled(input_ids)[0]

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, input_ids: torch.Tensor) -> DenoiserOutput:
        """Predict noise for ``sample`` at ``timestep`` conditioned on ``input_ids``."""
        hidden, pooled = self.encode_with_pooled(input_ids)
        n, (h, w) = sample.shape[0], sample.shape[-2:]
        height, width = h * self.vae_scale_factor, w * self.vae_scale_factor
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=hidden.dtype).expand(n, 6)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        return DenoiserOutput(self.unet(sample, timestep, encoder_hidden_states=hidden, added_cond_kwargs=added).sample)
