"""Model families: how each denoiser class is wrapped and which layers stay in full precision.

The full-precision defaults follow what production tools keep in high precision for diffusion
backbones (NVIDIA ModelOpt): the first and last layers (``conv_in``/``conv_out``, the patch
embedding and output projection), the time embedding (and the added-condition embedding that is
summed into it), and the position/context embedders (PixArt's caption projection).
They apply when a spec leaves ``quantize.keep_full_precision`` unset, and allocated plans keep
them in float unless ``allocation.quantize_family_fp_layers``.

Content layers (``allocation.content_layers`` left unset) are the layers that carry the condition
into the features, scored by a final-sample content metric besides SQNR (MixDQ's metric
decoupling). MixDQ's own rule for text U-Nets and transformers is every layer named ``attn2``
(cross-attention) or ``ff`` (feed-forward). A class-conditional U-Net has neither: its class
embedding is summed into the time embedding and reaches the features only through each ResNet's
``time_emb_proj``, so those are its content layers (the time embedding itself is a full-precision
layer). A DiT has no cross-attention either: the class enters through each block's AdaLN-Zero
modulation (``norm1.linear``), taken together with MixDQ's feed-forward layers.

Text-conditioned families run their text encoder(s) inside the denoiser wrapper (see
:mod:`diffquant.models.denoisers`), so the condition is always token ids ``(N, L)``; for SDXL it
is the two tokenizers' ids concatenated along dim 1 (``L = L1 + L2``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from diffquant.errors import ModelLoadError

TextWrap = Callable[[Sequence[nn.Module], Sequence[Any], nn.Module], nn.Module]
"""Builds a text family's wrapper from (text encoders, their tokenizers, denoiser)."""


def _own_config(module: nn.Module) -> dict[str, Any]:
    return dict(module.config)


def _unet_config(module: nn.Module) -> dict[str, Any]:
    return dict(module.unet.config)


def _transformer_config(module: nn.Module) -> dict[str, Any]:
    return dict(module.transformer.config)


def _no_wrap(text_encoders: Sequence[nn.Module], tokenizers: Sequence[Any], denoiser: nn.Module) -> nn.Module:
    raise ModelLoadError("this model family takes no text encoder")


def _text_unet(text_encoders: Sequence[nn.Module], tokenizers: Sequence[Any], denoiser: nn.Module) -> nn.Module:
    from diffquant.models.denoisers import TextConditionedUNet

    return TextConditionedUNet(text_encoders[0], denoiser)


def _pixart(text_encoders: Sequence[nn.Module], tokenizers: Sequence[Any], denoiser: nn.Module) -> nn.Module:
    from diffquant.models.denoisers import PixArtDenoiser

    pad = tokenizers[0].pad_token_id
    if pad is None:
        raise ModelLoadError("the PixArt pipeline's tokenizer has no pad token; its attention mask needs one")
    return PixArtDenoiser(text_encoders[0], denoiser, pad_token_id=int(pad))


def _sdxl(text_encoders: Sequence[nn.Module], tokenizers: Sequence[Any], denoiser: nn.Module) -> nn.Module:
    from diffquant.models.denoisers import SDXLDenoiser

    lengths = [int(tokenizer.model_max_length) for tokenizer in tokenizers]
    if lengths[0] != lengths[1]:
        raise ModelLoadError(
            f"SDXL's tokenizers must pad to the same length (their states are concatenated per token); "
            f"tokenizer has {lengths[0]}, tokenizer_2 has {lengths[1]}"
        )
    return SDXLDenoiser(text_encoders[0], text_encoders[1], denoiser, split=lengths[0])


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name: Short name (recorded in plans and reports).
        classes: Denoiser class names (diffusers ``_class_name``) of the family.
        condition: ``class``, ``text`` or None (unconditional).
        keep_full_precision: Globs of layers kept in float by default.
        content_layers: Globs of the layers a content metric scores by default (MixDQ).
        description: One line for reports.
        needs: Pipeline components the family needs besides the denoiser.
        text_components: (text encoder folder, tokenizer folder) pairs, in the order the
            wrapper takes them and the token ids are concatenated.
        wrap: Builds the denoiser wrapper from (text encoders, tokenizers, denoiser).
        denoiser_config: The diffusers config of the (wrapped) denoiser.
        class_config_key: Config key holding the number of classes (class families).
        feature_module: A module of the (wrapped) denoiser whose output gives the calibration
            pool's features (``calibration.feature_module``): for U-Nets the first mid-block
            ResNet, whose output is the mid-block attention's input (EDA-DM's features); for
            transformers the final norm.
        max_tokens: Token length the pipeline pads and truncates prompts to, where it is shorter
            than the tokenizer's ``model_max_length`` (PixArt-alpha: 120); None keeps the tokenizer's.
        lowercase_prompts: Lower-case and strip prompts before tokenizing (PixArt's pipeline does,
            without its optional caption cleaning).
    """

    name: str
    classes: tuple[str, ...]
    condition: Literal["class", "text"] | None
    keep_full_precision: tuple[str, ...]
    description: str
    needs: tuple[str, ...] = ()
    text_components: tuple[tuple[str, str], ...] = ()
    wrap: TextWrap = field(default=_no_wrap)
    denoiser_config: Callable[[nn.Module], dict[str, Any]] = field(default=_own_config)
    class_config_key: str | None = None
    feature_module: str = "mid_block.resnets.0"
    max_tokens: int | None = None
    lowercase_prompts: bool = False
    content_layers: tuple[str, ...] = ()

    def class_count(self, config: dict[str, Any]) -> int | None:
        """Number of classes from the denoiser config (None: unconditional)."""
        if self.class_config_key is None:
            return None
        return config.get(self.class_config_key)


SDXL_NEEDS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
MIXDQ_UNET_CONTENT = ("unet.*.attn2.*", "unet.*.ff.*")
"""MixDQ's content group of a text U-Net: cross-attention (``attn2``) and feed-forward (``ff``) layers."""

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            name="unet2d",
            classes=("UNet2DModel",),
            condition="class",
            keep_full_precision=("conv_in", "conv_out", "time_embedding.*"),
            description="diffusers UNet2DModel (class-conditional or unconditional)",
            class_config_key="num_class_embeds",
            content_layers=("*.time_emb_proj",),
        ),
        Family(
            name="dit",
            classes=("DiTTransformer2DModel",),
            condition="class",
            keep_full_precision=("pos_embed.proj", "proj_out_*", "transformer_blocks.*.norm1.emb.*"),
            description="class-conditional diffusion transformer (DiT, AdaLN-Zero)",
            class_config_key="num_embeds_ada_norm",
            feature_module="norm_out",
            content_layers=("transformer_blocks.*.norm1.linear", "transformer_blocks.*.ff.*"),
        ),
        Family(
            name="text-unet",
            classes=("UNet2DConditionModel",),
            condition="text",
            keep_full_precision=("unet.conv_in", "unet.conv_out", "unet.time_embedding.*"),
            description="text-conditioned UNet2DConditionModel with its text encoder (Stable Diffusion 1.x/2.x style)",
            needs=("text_encoder", "tokenizer"),
            text_components=(("text_encoder", "tokenizer"),),
            wrap=_text_unet,
            denoiser_config=_unet_config,
            feature_module="unet.mid_block.resnets.0",
            content_layers=MIXDQ_UNET_CONTENT,
        ),
        Family(
            name="sdxl",
            classes=("UNet2DConditionModel",),
            condition="text",
            keep_full_precision=(
                "unet.conv_in",
                "unet.conv_out",
                "unet.time_embedding.*",
                "unet.add_embedding.*",
            ),
            description="SDXL: UNet2DConditionModel with text_time added conditions and two CLIP text encoders",
            needs=SDXL_NEEDS,
            text_components=(("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")),
            wrap=_sdxl,
            denoiser_config=_unet_config,
            feature_module="unet.mid_block.resnets.0",
            content_layers=MIXDQ_UNET_CONTENT,
        ),
        Family(
            name="pixart",
            classes=("PixArtTransformer2DModel",),
            condition="text",
            keep_full_precision=(
                "transformer.pos_embed.proj",
                "transformer.proj_out",
                "transformer.adaln_single.*",
                "transformer.caption_projection.*",
            ),
            description="PixArt-style diffusion transformer with a T5 text encoder (PixArt-alpha/sigma)",
            needs=("text_encoder", "tokenizer"),
            text_components=(("text_encoder", "tokenizer"),),
            wrap=_pixart,
            denoiser_config=_transformer_config,
            feature_module="transformer.norm_out",
            max_tokens=120,
            lowercase_prompts=True,
            content_layers=("transformer.*.attn2.*", "transformer.*.ff.*"),
        ),
    )
}


def matching_layers(patterns: Sequence[str], names: Sequence[str]) -> set[str]:
    """The ``names`` any of ``patterns`` matches (a family default may match nothing in a given model)."""
    return {name for name in names if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)}


def _supported() -> str:
    return ", ".join(f"{f.name} ({', '.join(f.classes)})" for f in FAMILIES.values())


def family_for(class_name: str | None, components: tuple[str, ...], config: dict[str, Any] | None = None) -> Family:
    """The family of a denoiser class, checking the pipeline has the components it needs.

    A ``UNet2DConditionModel`` is SDXL when the pipeline has a second text encoder, else a
    Stable Diffusion 1.x/2.x style text U-Net.

    Args:
        class_name: The denoiser's diffusers ``_class_name``.
        components: Component folders of the pipeline (empty for a bare model folder).
        config: The denoiser's config, to check added conditions where given.

    Raises:
        ModelLoadError: If the class is not supported or a needed component is missing.
    """
    config = config or {}
    added = config.get("addition_embed_type")
    if class_name == "UNet2DConditionModel" and "text_encoder_2" in components:
        family = FAMILIES["sdxl"]
        missing = [need for need in family.needs if need not in components]
        if missing:
            raise ModelLoadError(
                f"an SDXL-style pipeline needs {', '.join(missing)}, which it lacks "
                "(the SDXL refiner, with only text_encoder_2 and aesthetic-score time ids, is not supported)"
            )
        if config and added != "text_time":
            raise ModelLoadError(
                f"an SDXL-style pipeline needs a U-Net with addition_embed_type 'text_time', not {added!r}"
            )
        return family
    if class_name == "DiTTransformer2DModel" and config:
        channels = int(config.get("in_channels") or 0)
        if channels and int(config.get("out_channels") or channels) == 2 * channels:
            raise ModelLoadError(
                "DiTTransformer2DModel with learned variance (out_channels = 2 x in_channels, as in DiT-XL/2) "
                "is not supported; only DiTs whose out_channels equal in_channels are"
            )
    if class_name == "UNet2DConditionModel" and added is not None:
        raise ModelLoadError(
            f"a UNet2DConditionModel with addition_embed_type {added!r} is supported only in an SDXL pipeline "
            "(with text_encoder_2 and tokenizer_2)"
        )
    for family in FAMILIES.values():
        if class_name in family.classes:
            missing = [need for need in family.needs if need not in components]
            if components and missing:
                raise ModelLoadError(f"a {class_name} pipeline needs {', '.join(missing)}, which it lacks")
            return family
    supported = sorted({c for f in FAMILIES.values() for c in f.classes})
    raise ModelLoadError(
        f"{class_name or 'a non-diffusers'} model is not supported; supported: {', '.join(supported)} "
        f"(families: {_supported()})"
    )
