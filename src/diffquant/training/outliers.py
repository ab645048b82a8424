"""Function-preserving outlier variants of the reference models: benchmarks for outlier handling.

The reference models were trained small and have no large activation outliers of their own, unlike
SD's, SDXL's or FLUX's (a few channels 10-100x the others). These variants put such outliers in
without changing the float function: a few output channels of a *producer* are multiplied by a
scale ``s`` and the matching input columns of every Linear layer that reads them (the *consumers*)
are divided by ``s``. The consumers' inputs then hold channels ``s`` times larger than before,
which a per-tensor input quantizer must cover, while ``(s x) (W / s)^T = x W^T``.

Producers, where the scale folds in exactly:

- a LayerNorm's affine (``weight`` and ``bias`` of the channel times ``s``): the U-Net transformer
  blocks' ``norm1`` (-> ``attn1.to_q/k/v``), ``norm2`` (-> ``attn2.to_q``) and ``norm3`` (->
  ``ff.net.0.proj``), and the text encoder's ``final_layer_norm`` (-> every ``attn2.to_k/v``);
- DiT's AdaLN-Zero, whose norm has no affine: ``norm(x) * (1 + scale) + shift`` with ``scale`` and
  ``shift`` rows of ``norm1.linear``. Multiplying the ``shift`` row by ``s`` and turning the
  ``scale`` row into ``s * scale + (s - 1)`` (weight row times ``s``, bias ``s * b + s - 1``) makes
  the output channel ``s`` times larger; ``norm1`` feeds ``attn1.to_q/k/v`` and the MLP half
  (``shift_mlp``/``scale_mlp`` on ``norm3``) feeds ``ff.net.0.proj``.

Scales are powers of two (:data:`OUTLIER_SCALES`), so multiplying and dividing are exact in
float32: the LayerNorm variants compute bit-identical outputs and the AdaLN variant differs only
by the rounding of ``s * b + s - 1`` (about 1e-7 relative). Channels are drawn with a seeded
generator, so a variant is a pure function of the bundled weights and its arguments.

Three variants (:data:`VARIANTS`): ``digits-dit-outliers`` and ``digits-t2i-outliers`` (outliers
inside the denoiser) and ``digits-t2i-text-outliers`` (outliers in the text encoder's hidden states,
read by the U-Net's cross-attention keys and values). They are written as model folders that load
with ``model: {path: DIR}`` and keep the digits evaluation (``diffquant.json`` with 10 classes and
the reference's prompts); ``outliers.json`` beside them lists every scaled channel.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from diffquant.models.loading import DiffusionModel, load_model
from diffquant.models.reference import DIGITS_DIT, DIGITS_T2I, reference_dir

OUTLIER_SCALES = (32.0, 64.0)
"""Channel scales: powers of two (exact in float arithmetic) inside the 30-100x of real outliers."""

Kind = Literal["denoiser", "text"]
WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass(frozen=True)
class Variant:
    """One outlier variant: its folder name, the reference it is built from and where the outliers go."""

    name: str
    base: str
    kind: Kind


VARIANTS: tuple[Variant, ...] = (
    Variant("digits-dit-outliers", DIGITS_DIT, "denoiser"),
    Variant("digits-t2i-outliers", DIGITS_T2I, "denoiser"),
    Variant("digits-t2i-text-outliers", DIGITS_T2I, "text"),
)


@dataclass(frozen=True)
class Site:
    """A producer of channels and the Linear layers that read them.

    Attributes:
        producer: The module whose output channels are scaled (a LayerNorm, or DiT's ``norm1.linear``).
        consumers: Linear layers (names in the quantized module) whose input columns are divided.
        adaln_chunks: For an AdaLN-Zero linear, the (shift, scale) chunk indices of its output (None: LayerNorm).
    """

    producer: str
    consumers: tuple[str, ...]
    adaln_chunks: tuple[int, int] | None = None


@dataclass(frozen=True)
class ChannelOutlier:
    """One scaled channel: ``producer``'s output channel ``channel`` is ``scale`` times larger."""

    producer: str
    consumers: tuple[str, ...]
    channel: int
    scale: float


def _transformer_blocks(module: nn.Module) -> list[str]:
    from diffusers.models.attention import BasicTransformerBlock

    return [name for name, child in module.named_modules() if isinstance(child, BasicTransformerBlock)]


def denoiser_sites(model: DiffusionModel) -> list[Site]:
    """Where :func:`inject_outliers` puts denoiser outliers: every transformer block's norms.

    DiT blocks (AdaLN-Zero): ``norm1.linear``'s MSA half (-> ``attn1.to_q/k/v``) and MLP half (->
    ``ff.net.0.proj``). U-Net transformer blocks (LayerNorm with affine): ``norm1`` (-> ``attn1.to_q/k/v``),
    ``norm2`` (-> ``attn2.to_q``), ``norm3`` (-> ``ff.net.0.proj``).

    Raises:
        ValueError: If the model has no transformer block of a supported kind.
    """
    unet = model.unet
    sites: list[Site] = []
    for block in _transformer_blocks(unet):
        module = unet.get_submodule(block)
        qkv = tuple(f"{block}.attn1.to_{x}" for x in "qkv")
        ff = (f"{block}.ff.net.0.proj",)
        if module.norm_type == "ada_norm_zero":
            sites += [Site(f"{block}.norm1.linear", qkv, (0, 1)), Site(f"{block}.norm1.linear", ff, (3, 4))]
        elif module.norm_type == "layer_norm":
            sites += [Site(f"{block}.norm1", qkv), Site(f"{block}.norm3", ff)]
            if module.attn2 is not None:
                sites.append(Site(f"{block}.norm2", (f"{block}.attn2.to_q",)))
        else:
            raise ValueError(f"transformer block {block} has norm type {module.norm_type!r}, which has no exact fold")
    if not sites:
        raise ValueError(f"{model.name} has no transformer block to put outliers in")
    return sorted(sites, key=lambda site: (site.producer, site.adaln_chunks or ()))


def text_sites(model: DiffusionModel) -> list[Site]:
    """The text encoder's final LayerNorm, read by every cross-attention ``to_k`` and ``to_v`` of the U-Net.

    Raises:
        ValueError: If the model is not a text-conditioned U-Net with a ``final_layer_norm``.
    """
    unet = model.unet
    if model.condition != "text" or not hasattr(unet, "text_encoder") or not hasattr(unet, "unet"):
        raise ValueError(f"{model.name} is not a text-conditioned U-Net (text encoder + UNet2DConditionModel)")
    if not isinstance(getattr(unet.text_encoder, "final_layer_norm", None), nn.LayerNorm):
        raise ValueError(f"{model.name}'s text encoder has no final_layer_norm to scale")
    consumers = tuple(f"unet.{block}.attn2.to_{x}" for block in _transformer_blocks(unet.unet) for x in "kv")
    return [Site("text_encoder.final_layer_norm", consumers)]


def choose_outliers(site: Site, width: int, channels: int, seed: int) -> list[ChannelOutlier]:
    """Draw ``channels`` distinct channels of ``site`` and a scale from :data:`OUTLIER_SCALES` for each.

    Args:
        site: Where the outliers go.
        width: Channels of the producer's output (of one chunk for AdaLN).
        channels: Outlier channels to draw.
        seed: Seed of the draw.

    Raises:
        ValueError: If ``channels`` is not in ``1..width``.
    """
    if not 1 <= channels <= width:
        raise ValueError(f"channels must be in 1..{width}, got {channels}")
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(width, generator=generator)[:channels].sort().values.tolist()
    scales = torch.randint(len(OUTLIER_SCALES), (channels,), generator=generator).tolist()
    return [
        ChannelOutlier(site.producer, site.consumers, int(c), OUTLIER_SCALES[k])
        for c, k in zip(picks, scales, strict=True)
    ]


@torch.no_grad()
def _scale_channel(unet: nn.Module, site: Site, outlier: ChannelOutlier) -> None:
    """Multiply the producer's output channel by ``outlier.scale`` and divide the consumers' columns by it."""
    s, c = outlier.scale, outlier.channel
    producer = unet.get_submodule(site.producer)
    if site.adaln_chunks is None:
        producer.weight[c] *= s
        if producer.bias is not None:
            producer.bias[c] *= s
    else:
        width = producer.out_features // 6
        shift, scale = (k * width + c for k in site.adaln_chunks)
        producer.weight[shift] *= s
        producer.bias[shift] *= s
        producer.weight[scale] *= s
        producer.bias[scale] = producer.bias[scale] * s + (s - 1.0)
    for name in site.consumers:
        unet.get_submodule(name).weight[:, c] /= s


def _width(unet: nn.Module, site: Site) -> int:
    producer = unet.get_submodule(site.producer)
    return producer.out_features // 6 if site.adaln_chunks is not None else producer.weight.shape[0]


def inject_outliers(
    model: DiffusionModel, kind: Kind = "denoiser", channels: int = 2, seed: int = 0
) -> list[ChannelOutlier]:
    """Scale ``channels`` channels per site of ``model`` in place (see the module docstring).

    Args:
        model: A digits-dit or digits-t2i model (changed in place).
        kind: ``denoiser`` (transformer blocks' norms) or ``text`` (the text encoder's output).
        channels: Outlier channels per site.
        seed: Seed of the channel and scale draw.

    Returns:
        Every scaled channel.

    Raises:
        ValueError: If the model has no site of that kind, or ``channels`` does not fit.
    """
    sites = denoiser_sites(model) if kind == "denoiser" else text_sites(model)
    unet = model.unet
    outliers = []
    for i, site in enumerate(sites):
        drawn = choose_outliers(site, _width(unet, site), channels, seed + i)
        for outlier in drawn:
            _scale_channel(unet, site, outlier)
        outliers += drawn
    return outliers


def _copy_reference_files(source: Path, out: Path, skip: set[str]) -> None:
    """Copy ``source``'s files and folders into ``out`` except ``skip`` (by top-level name)."""
    for entry in sorted(source.iterdir()):
        if entry.name in skip:
            continue
        if entry.is_dir():
            shutil.copytree(entry, out / entry.name)
        else:
            shutil.copy2(entry, out / entry.name)


def write_outlier_variant(variant: Variant, out_dir: Path, channels: int = 2, seed: int = 0) -> Path:
    """Build ``variant`` from its bundled reference and write it as a model folder under ``out_dir``.

    The folder is the reference's (same configs, scheduler, tokenizer, prompts) with the changed
    weights, ``diffquant.json`` naming the variant, ``outliers.json`` listing every scaled channel
    and a short ``MODEL_CARD.md``; the reference's ``metrics.json`` is not copied. An existing
    folder of that name is replaced.

    Returns:
        The written folder.
    """
    from diffquant.storage import write_json, write_text

    source = reference_dir(variant.base)
    model = load_model(variant.base)
    outliers = inject_outliers(model, variant.kind, channels, seed)
    out = Path(out_dir) / variant.name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    written = {"diffquant.json", "MODEL_CARD.md", "metrics.json", "unet", "text_encoder", "config.json", WEIGHTS}
    _copy_reference_files(source, out, written)
    if hasattr(model.unet, "text_encoder"):
        model.unet.unet.save_pretrained(str(out / "unet"), safe_serialization=True)
        _save_text_encoder(model.unet.text_encoder, out / "text_encoder")
    else:
        model.unet.save_pretrained(str(out), safe_serialization=True)
    meta = json.loads((source / "diffquant.json").read_text())
    write_json(meta | {"name": variant.name}, out / "diffquant.json")
    record = {"base": variant.base, "kind": variant.kind, "channels_per_site": channels, "seed": seed}
    write_json(record | {"outliers": [asdict(o) for o in outliers]}, out / "outliers.json")
    write_text(_card(variant, outliers, channels, seed), out / "MODEL_CARD.md")
    return out


def _save_text_encoder(encoder: nn.Module, folder: Path) -> None:
    """``save_pretrained`` without transformers' progress bar (it would break a caller's display)."""
    import transformers

    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        encoder.save_pretrained(str(folder), safe_serialization=True)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _card(variant: Variant, outliers: list[ChannelOutlier], channels: int, seed: int) -> str:
    where = (
        "the text encoder's final LayerNorm (read by every cross-attention key and value projection)"
        if variant.kind == "text"
        else "the transformer blocks' norms (read by the attention and feed-forward input projections)"
    )
    consumers = sorted({name for o in outliers for name in o.consumers})
    return (
        f"# {variant.name}\n\n"
        f"`{variant.base}` with {len(outliers)} output channels of {where} multiplied by "
        f"{' or '.join(f'{s:g}' for s in OUTLIER_SCALES)} and the matching input columns of "
        f"{len(consumers)} Linear layers divided by the same factor: the same float function, with "
        f"activation outliers in those layers' inputs ({channels} channels per producer, seed {seed}).\n\n"
        f"Built by `bench/outlier_models.py` (`diffquant.training.outliers.write_outlier_variant`); "
        "`outliers.json` lists every scaled channel. Evaluate it like its reference (same classes, prompts "
        "and scheduler).\n"
    )


def write_outlier_models(out_dir: Path, channels: int = 2, seed: int = 0) -> list[Path]:
    """Write every variant of :data:`VARIANTS` under ``out_dir``; return their folders."""
    return [write_outlier_variant(variant, out_dir, channels, seed) for variant in VARIANTS]
