"""Model families: how each denoiser class is wrapped and which layers stay in full precision.

The full-precision defaults follow what production tools keep in high precision for diffusion
backbones (NVIDIA ModelOpt): the first and last layers (``conv_in``/``conv_out``, the patch
embedding and output projection), the time embedding, and the position/context embedders.
They apply when a spec leaves ``quantize.keep_full_precision`` unset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from diffquant.errors import ModelLoadError


def _own_config(module: nn.Module) -> dict[str, Any]:
    return dict(module.config)


def _unet_config(module: nn.Module) -> dict[str, Any]:
    return dict(module.unet.config)


def _no_wrap(text_encoder: nn.Module, denoiser: nn.Module) -> nn.Module:
    raise ModelLoadError("this model family takes no text encoder")


def _text_unet(text_encoder: nn.Module, denoiser: nn.Module) -> nn.Module:
    from diffquant.models.denoisers import TextConditionedUNet

    return TextConditionedUNet(text_encoder, denoiser)


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name: Short name (recorded in plans and reports).
        classes: Denoiser class names (diffusers ``_class_name``) of the family.
        condition: ``class``, ``text`` or None (unconditional).
        keep_full_precision: Globs of layers kept in float by default.
        description: One line for reports.
        needs: Pipeline components the family needs besides the denoiser.
        wrap: Builds the denoiser wrapper from (text encoder, denoiser) for text families.
        denoiser_config: The diffusers config of the (wrapped) denoiser.
        class_config_key: Config key holding the number of classes (class families).
    """

    name: str
    classes: tuple[str, ...]
    condition: Literal["class", "text"] | None
    keep_full_precision: tuple[str, ...]
    description: str
    needs: tuple[str, ...] = ()
    wrap: Callable[[nn.Module, nn.Module], nn.Module] = field(default=_no_wrap)
    denoiser_config: Callable[[nn.Module], dict[str, Any]] = field(default=_own_config)
    class_config_key: str | None = None

    def class_count(self, config: dict[str, Any]) -> int | None:
        """Number of classes from the denoiser config (None: unconditional)."""
        if self.class_config_key is None:
            return None
        return config.get(self.class_config_key)


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
        ),
        Family(
            name="dit",
            classes=("DiTTransformer2DModel",),
            condition="class",
            keep_full_precision=("pos_embed.proj", "proj_out_*", "transformer_blocks.*.norm1.emb.*"),
            description="class-conditional diffusion transformer (DiT, AdaLN-Zero)",
            class_config_key="num_embeds_ada_norm",
        ),
        Family(
            name="text-unet",
            classes=("UNet2DConditionModel",),
            condition="text",
            keep_full_precision=("unet.conv_in", "unet.conv_out", "unet.time_embedding.*"),
            description="text-conditioned UNet2DConditionModel with its text encoder (Stable Diffusion 1.x style)",
            needs=("text_encoder", "tokenizer"),
            wrap=_text_unet,
            denoiser_config=_unet_config,
        ),
    )
}


def family_for(class_name: str | None, components: tuple[str, ...]) -> Family:
    """The family of a denoiser class, checking the pipeline has the components it needs.

    Raises:
        ModelLoadError: If the class is not supported or a needed component is missing.
    """
    if "text_encoder_2" in components:
        raise ModelLoadError(
            "pipelines with two text encoders (SDXL) are not supported; supported families: "
            + ", ".join(f"{f.name} ({', '.join(f.classes)})" for f in FAMILIES.values())
        )
    for family in FAMILIES.values():
        if class_name in family.classes:
            missing = [need for need in family.needs if need not in components]
            if components and missing:
                raise ModelLoadError(f"a {class_name} pipeline needs {', '.join(missing)}, which it lacks")
            return family
    supported = sorted(c for f in FAMILIES.values() for c in f.classes)
    raise ModelLoadError(f"{class_name or 'a non-diffusers'} model is not supported; supported: {', '.join(supported)}")
