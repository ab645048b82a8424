"""Loading diffusion models: bundled reference models and local diffusers directories.

A directory is either a bare diffusers model (``config.json`` + safetensors weights, with a
``scheduler_config.json`` beside it) or a pipeline (``model_index.json`` with component folders).
The model *family* is detected from the denoiser's class and the components present; each family
has its own wrapper (see :mod:`diffquant.models.denoisers`) and its defaults for the layers kept in
full precision (:mod:`diffquant.models.families`). Only safetensors weights are ever read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from diffquant.errors import ModelLoadError
from diffquant.models.families import FAMILIES, Family, family_for
from diffquant.models.files import (
    DenoiserConfig,
    ModelMeta,
    read_denoiser_config,
    read_meta,
    read_model_index,
    read_scheduler_config,
    read_text_encoder_config,
)
from diffquant.models.prompts import Prompt, PromptSet, Tokenize, hf_tokenize, read_prompts_file
from diffquant.models.reference import DIGITS_UNET, REFERENCE_MODELS, reference_dir
from diffquant.storage import check_safetensors, safetensors_shapes, sha256_file

logger = logging.getLogger(__name__)

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"
PICKLE_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin", "model.ckpt", "model.pt", "model.bin")
META_NAME = "diffquant.json"


@dataclass
class DiffusionModel:
    """A denoiser with what sampling and evaluation need to know about it.

    ``unet`` is the module that gets quantized, whatever the family: it is called as
    ``unet(sample, timestep, condition).sample`` (see :mod:`diffquant.models.denoisers`).
    """

    name: str
    unet: nn.Module
    scheduler_config: dict[str, Any]
    source_dir: Path
    weights_sha256: str
    num_classes: int | None
    sample_shape: tuple[int, int, int]
    family: str = "unet2d"
    condition: Literal["class", "text"] | None = "class"
    prompts: PromptSet | None = field(default=None, repr=False)
    latent: bool = False
    null_class: int | None = None
    """The class id that means "no class" (classifier-free guidance), for class models that have one."""
    vae_dir: Path | None = None
    """The pipeline's ``vae/`` folder (latent models that have one): decodes samples for grids and image metrics."""

    @property
    def conditional(self) -> bool:
        """True when the denoiser takes a condition (class ids or token ids)."""
        return self.condition is not None

    @property
    def digits_compatible(self) -> bool:
        """True when the digits classifier can judge samples (10 known classes, 1x8x8 pixels)."""
        return self.num_classes == 10 and self.sample_shape == (1, 8, 8) and not self.latent

    @property
    def family_info(self) -> Family:
        """The model family's description and full-precision defaults."""
        return FAMILIES[self.family]

    def conditions(self, n: int, purpose: str = "evaluation") -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Conditions for ``n`` samples and the class each one asks for.

        Class models cycle ``0..num_classes-1``; text models cycle through their prompts for
        ``purpose`` (``calibration`` or ``evaluation``); unconditional models get None.

        Returns:
            The condition tensor (``(n,)`` class ids or ``(n, L)`` token ids) and labels ``(n,)``
            when the requested class is known (else None).
        """
        if self.condition is None:
            return None, None
        if self.condition == "text":
            assert self.prompts is not None
            return self.prompts.conditions(n, purpose)
        assert self.num_classes is not None
        labels = torch.arange(n) % self.num_classes
        return labels, labels

    def to(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> DiffusionModel:
        """Move the denoiser to ``device`` in ``dtype`` (quantizers stay float32); returns the model itself."""
        from diffquant.placement import place

        place(self.unet, torch.device(device), dtype)
        return self

    def null_conditions(self, n: int) -> torch.Tensor | None:
        """The null condition for ``n`` samples (what guidance's unconditional half gets), or None.

        Class models: ``null_class`` repeated; text models: the empty prompt's token ids;
        unconditional models and class models without a null class: None.
        """
        if self.condition == "text":
            assert self.prompts is not None
            return self.prompts.tokenize([""] * n)
        if self.condition == "class" and self.null_class is not None:
            return torch.full((n,), self.null_class, dtype=torch.long)
        return None


def _one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (whitespace collapsed), cut to ``limit`` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _checked_weights(folder: Path, name: str) -> Path:
    """The safetensors weights in ``folder``, refusing pickle checkpoints and damaged files."""
    weights = folder / name
    if not weights.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.name in PICKLE_NAMES) if folder.is_dir() else []
        if pickles:
            raise ModelLoadError(
                f"{folder / pickles[0]} is a pickle checkpoint, which can run arbitrary code; "
                "re-save the model with save_pretrained(..., safe_serialization=True)"
            )
        raise ModelLoadError(f"{folder} has no {name}")
    check_safetensors(weights)
    return weights


def _meta_module(build: Callable[[], nn.Module], config_path: Path, class_name: str) -> nn.Module | None:
    """``build()`` on the meta device (no memory, no initialisation): the module a config describes.

    Returns None when the class cannot be built on the meta device (the real load then decides).

    Raises:
        ModelLoadError: If the config describes no buildable ``class_name``.
    """
    try:
        with torch.device("meta"):
            return build()
    except Exception as error:  # diffusers and transformers raise anything on a bad config
        if "meta" in str(error).lower():
            logger.debug("cannot build %s on the meta device (%s); shapes checked at load", class_name, error)
            return None
        raise ModelLoadError(f"{config_path} does not describe a buildable {class_name}: {_one_line(error)}") from None


def _check_shapes(module: nn.Module, weights: Path, config_path: Path) -> None:
    """Refuse weights whose tensor shapes differ from those of the module ``config_path`` describes."""
    stored = safetensors_shapes(weights)
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    wrong = [key for key in expected if key in stored and stored[key] != expected[key]]
    if wrong:
        key = wrong[0]
        more = f" ({len(wrong)} of {len(expected)} parameters differ)" if len(wrong) > 1 else ""
        raise ModelLoadError(
            f"{weights}: parameter {key} has shape {list(stored[key])}, but {config_path} makes it "
            f"{list(expected[key])}{more}; the weights and the config belong to different models"
        )


def _refuse_missing(info: dict[str, Any], weights: Path, class_name: str) -> None:
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelLoadError(
            f"{weights} lacks parameter {missing[0]}{more} of the {class_name} that config.json describes "
            "(it would be left random); the weights and the config belong to different models"
        )


def _from_pretrained(cls: type, folder: Path, weights: Path) -> tuple[nn.Module, str]:
    """Load ``cls`` from ``folder`` (safetensors only); return it in eval mode and its sha256."""
    try:
        # low_cpu_mem_usage=False: the fast path needs `accelerate`, and diffusers warns without it
        module, info = cls.from_pretrained(
            str(folder), use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as error:
        raise ModelLoadError(f"cannot load {folder}: {_one_line(error)}") from None
    _refuse_missing(info, weights, cls.__name__)
    return module.eval().requires_grad_(False), sha256_file(weights)


@dataclass
class _Denoiser:
    """A checked denoiser folder: its class, family, weights and full config (diffusers defaults filled)."""

    folder: Path
    cls: type
    family: Family
    weights: Path
    config: dict[str, Any]


def _denoiser_family(folder: Path, components: tuple[str, ...]) -> tuple[DenoiserConfig, dict[str, Any], Family]:
    """The validated denoiser ``config.json`` in ``folder`` (and its raw fields) and its family."""
    config_path = folder / "config.json"
    config, raw = read_denoiser_config(config_path)
    supported = sorted({name for f in FAMILIES.values() for name in f.classes})
    if config.class_name not in supported:
        raise ModelLoadError(
            f"{config_path}: _class_name {config.class_name} is not a supported denoiser; supported: {', '.join(supported)}"
        )
    family = family_for(config.class_name, components=components, config=raw)
    if not components and family.condition == "text":
        raise ModelLoadError(
            f"{folder} is a bare {config.class_name}, which needs its text encoder; point model.path at the "
            "pipeline directory (with model_index.json, unet/, text_encoder/, tokenizer/)"
        )
    return config, raw, family


def _checked_denoiser(
    folder: Path, class_name: str, raw: dict[str, Any], family: Family, meta: ModelMeta, meta_file: Path
) -> _Denoiser:
    """Check a denoiser's weights without reading them: safetensors header, shapes against the config, classes."""
    config_path = folder / "config.json"
    weights = _checked_weights(folder, DIFFUSERS_WEIGHTS)
    import diffusers

    cls = getattr(diffusers, class_name)
    module = _meta_module(lambda: cls.from_config(raw), config_path, class_name)
    full = raw
    if module is not None:
        _check_shapes(module, weights, config_path)
        full = dict(module.config)
    for key in ("in_channels", "sample_size"):
        if full.get(key) is None:
            raise ModelLoadError(
                f"{config_path}: field '{key}' is missing or null; diffquant needs it to know the input's shape"
            )
    if family.condition == "class" and meta.num_classes is not None:
        _check_num_classes(meta.num_classes, family, full, config_path, meta_file)
    return _Denoiser(folder, cls, family, weights, full)


def _check_num_classes(
    num_classes: int, family: Family, config: dict[str, Any], config_path: Path, meta_file: Path
) -> None:
    """diffquant.json's num_classes must fit the denoiser's class embedding."""
    embeds = family.class_count(config)
    if embeds is None:
        raise ModelLoadError(
            f"{meta_file}: num_classes is {num_classes}, but {config_path} has no class embedding "
            f"({family.class_config_key} is null), so the model takes no class labels; remove num_classes"
        )
    if num_classes > int(embeds):
        raise ModelLoadError(
            f"{meta_file}: num_classes {num_classes} exceeds the {embeds} class embeddings of {config_path} "
            f"({family.class_config_key}); set num_classes to at most {embeds}"
        )


@dataclass
class _TextEncoder:
    """A checked text encoder folder, its tokenizer folder and the transformers config."""

    folder: Path
    tokenizer: Path
    cls: type
    config: Any
    weights: Path


def _text_encoder_class(folder: Path, tokenizer: Path) -> str:
    """The text encoder class named by ``folder``'s validated config.json; both folders must exist."""
    if not folder.is_dir():
        raise ModelLoadError(f"{folder.parent} has no {folder.name}/ folder, which its model family needs")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{folder} has no config.json (the text encoder's transformers config)")
    architecture = read_text_encoder_config(config_path)
    if not tokenizer.is_dir():
        raise ModelLoadError(f"{tokenizer.parent} has a text encoder but no {tokenizer.name}/ folder")
    return architecture


def _checked_text_encoder(folder: Path, tokenizer: Path, architecture: str) -> _TextEncoder:
    """Check a text encoder's transformers config and weights (header, shapes) without reading the weights."""
    import transformers
    from transformers import AutoConfig

    config_path = folder / "config.json"
    weights = _checked_weights(folder, TRANSFORMERS_WEIGHTS)
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise ModelLoadError(f"{config_path} is not a usable transformers config: {_one_line(error)}") from None
    config._attn_implementation = "eager"
    cls = getattr(transformers, architecture)
    module = _meta_module(lambda: cls(config), config_path, architecture)
    if module is not None:
        _check_shapes(module, weights, config_path)
    return _TextEncoder(folder, tokenizer, cls, config, weights)


def _load_text_encoder(encoder: _TextEncoder) -> tuple[nn.Module, str]:
    import transformers

    # transformers draws a tqdm bar per load on stderr, which breaks the CLI's rich progress display
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        module, info = encoder.cls.from_pretrained(
            str(encoder.folder),
            config=encoder.config,
            use_safetensors=True,
            local_files_only=True,
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as error:
        raise ModelLoadError(f"cannot load {encoder.folder}: {_one_line(error)}") from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    _refuse_missing(info, encoder.weights, encoder.cls.__name__)
    return module.eval().requires_grad_(False), sha256_file(encoder.weights)


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not folder.is_dir():
        raise ModelLoadError(f"{folder.parent} has a text encoder but no {folder.name}/ folder")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise ModelLoadError(f"cannot load the tokenizer in {folder}: {_one_line(error)}") from None


def _scheduler(path: Path, candidates: list[Path]) -> dict[str, Any]:
    for candidate in candidates:
        if candidate.is_file():
            return read_scheduler_config(candidate)
    raise ModelLoadError(
        f"{path} has no scheduler config (scheduler_config.json beside config.json, "
        "or scheduler/scheduler_config.json in a pipeline); add the training scheduler's config"
    )


def _combined_sha256(parts: dict[str, str]) -> str:
    """One sha256 over component hashes (a single component keeps its own hash)."""
    if len(parts) == 1:
        return next(iter(parts.values()))
    text = json.dumps(dict(sorted(parts.items())))
    return hashlib.sha256(text.encode()).hexdigest()


def _size(value: Any) -> int:
    return int(value if isinstance(value, int) else value[0])


def _family_tokenize(tokenizers: list[Any], family: Family) -> Tokenize:
    """The family's tokenization: each tokenizer pads to its own length; ids concatenated along dim 1.

    ``family.max_tokens`` caps the tokenizers' length and ``family.lowercase_prompts`` lower-cases
    the prompts first, as the family's diffusers pipeline does.
    """
    for tokenizer in tokenizers:
        if family.max_tokens is not None and tokenizer.model_max_length > family.max_tokens:
            tokenizer.model_max_length = family.max_tokens
    parts = [hf_tokenize(tokenizer) for tokenizer in tokenizers]

    def tokenize(texts: list[str]) -> torch.Tensor:
        if family.lowercase_prompts:
            texts = [text.lower().strip() for text in texts]
        return torch.cat([part(texts) for part in parts], dim=1)

    if len(parts) == 1 and not family.lowercase_prompts:
        return parts[0]
    return tokenize


def _prompt_lists(meta: ModelMeta, prompts_file: Path | None, path: Path) -> tuple[list[Prompt], list[Prompt]]:
    """Calibration and evaluation prompts: the prompts file's, else the bundled ones."""
    if prompts_file is not None:
        prompts = read_prompts_file(prompts_file)
        return prompts, prompts
    if meta.prompts is None:
        raise ModelLoadError(
            f"{path} is text-conditioned and has no bundled prompts; set model.prompts to a text file "
            "with one prompt per line (used for calibration and evaluation)"
        )

    def parse(rows: list[tuple[str, int | None]]) -> list[Prompt]:
        return [Prompt(text, label) for text, label in rows]

    return parse(meta.prompts.calibration), parse(meta.prompts.evaluation)


def _checked_folder(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    if not path.is_dir():
        known = path.name in ("config.json", "model_index.json", DIFFUSERS_WEIGHTS)
        holder = f" ({path.parent} here)" if known else ""
        raise ModelLoadError(
            f"model path {path} is a file, not a folder; point model.path at the folder that holds "
            f"config.json or model_index.json{holder}"
        )
    if not any(path.iterdir()):
        raise ModelLoadError(
            f"model path {path} is an empty folder; point model.path at a diffusers model folder "
            "(config.json and diffusion_pytorch_model.safetensors) or pipeline folder (model_index.json)"
        )


def load_local_model(path: Path, name: str | None = None, prompts_file: Path | None = None) -> DiffusionModel:
    """Load a denoiser from a local diffusers directory (model or pipeline), safetensors only.

    Every file of the folder is validated first (JSON files against :mod:`diffquant.models.files`,
    weights headers and shapes against the configs); only then are weights read.

    Args:
        path: The directory (``save_pretrained`` output of a model, or a pipeline).
        name: Display name; defaults to the directory name.
        prompts_file: Prompts for a text-conditioned model (one per line); overrides bundled ones.

    Raises:
        ModelLoadError: Missing or empty directory, not a diffusers model, a malformed JSON file
            (naming the file and field), unsupported family, pickle or damaged weights, weights
            that do not match their config, no scheduler config, or a text model without prompts.
    """
    path = Path(path)
    _checked_folder(path)
    meta = read_meta(path / META_NAME)
    if (path / "model_index.json").is_file():
        return _load_pipeline(path, meta, name, prompts_file)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a diffusers model: no config.json or model_index.json in it")
    if prompts_file is not None:
        raise ModelLoadError(f"model.prompts is set, but {path} is not a text-conditioned pipeline")
    config, raw, family = _denoiser_family(path, ())
    scheduler = _scheduler(path, [path / "scheduler_config.json"])
    denoiser = _checked_denoiser(path, config.class_name, raw, family, meta, path / META_NAME)
    module, sha = _from_pretrained(denoiser.cls, path, denoiser.weights)
    return _assemble(path, name, meta, module, {"denoiser": sha}, scheduler, denoiser.family, None, latent=False)


def _load_pipeline(path: Path, meta: ModelMeta, name: str | None, prompts_file: Path | None) -> DiffusionModel:
    from diffquant.models.vae import VAE_FOLDER, check_vae

    index = read_model_index(path / "model_index.json")
    components = set(index.components) | {entry.name for entry in path.iterdir() if entry.is_dir()}
    denoiser_key = "unet" if "unet" in components else "transformer" if "transformer" in components else None
    if denoiser_key is None:
        raise ModelLoadError(f"{path} is a diffusers pipeline without a unet/ or transformer/ component")
    folder = path / denoiser_key
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{path} lists a {denoiser_key} but has no {denoiser_key}/config.json")
    config, raw, family = _denoiser_family(folder, tuple(sorted(components)))
    latent = "vae" in components
    scheduler = _latent_scheduler(_scheduler(path, [path / "scheduler" / "scheduler_config.json"]), latent)
    architectures = [_text_encoder_class(path / enc, path / tok) for enc, tok in family.text_components]
    if family.condition == "text":
        calibration, evaluation = _prompt_lists(meta, prompts_file, path)
    elif prompts_file is not None:
        raise ModelLoadError(f"model.prompts is set, but {path} is not text-conditioned")
    # every JSON file is valid: check the weights files against the configs
    checked = _checked_denoiser(folder, config.class_name, raw, family, meta, path / META_NAME)
    encoders = [
        _checked_text_encoder(path / enc, path / tok, architecture)
        for (enc, tok), architecture in zip(family.text_components, architectures, strict=True)
    ]
    vae_dir = path / VAE_FOLDER if latent and (path / VAE_FOLDER).is_dir() else None
    if vae_dir is not None:
        check_vae(vae_dir, int(checked.config["in_channels"]))
    # every file is checked: from here on weights are read
    denoiser, sha = _from_pretrained(checked.cls, folder, checked.weights)
    hashes = {denoiser_key: sha}
    prompts = None
    if encoders:
        modules, tokenizers = [], []
        for encoder in encoders:
            module, hashes[encoder.folder.name] = _load_text_encoder(encoder)
            modules.append(module)
            tokenizers.append(_tokenizer(encoder.tokenizer))
        prompts = PromptSet(calibration, evaluation, _family_tokenize(tokenizers, family))
        denoiser = family.wrap(modules, tokenizers, denoiser)
    model = _assemble(path, name, meta, denoiser, hashes, scheduler, family, prompts, latent=latent)
    model.vae_dir = vae_dir
    return model


def _latent_scheduler(config: dict[str, Any], latent: bool) -> dict[str, Any]:
    """Turn off DDIM's x0 clipping for latents unless the scheduler config sets it.

    diffquant samples with DDIM, whose ``clip_sample`` defaults to True; latent pipelines ship
    schedulers (PNDM, Euler, DPM-Solver) that never clip, and clipping latents to [-1, 1] would
    change the model's samples.
    """
    if latent and "clip_sample" not in config:
        logger.info("latent model: sampling with clip_sample False (its scheduler config does not set it)")
        return config | {"clip_sample": False}
    return config


def _spare_class_embedding(denoiser: nn.Module, num_classes: int) -> int | None:
    """``num_classes`` when the denoiser's class embedding has one row more than the classes (the null class).

    That is how class-conditional models trained with label dropout keep their unconditional
    embedding (diffusers' ``UNet2DModel`` with ``num_class_embeds`` = classes + 1, DiT's
    ``LabelEmbedding`` with dropout); otherwise None.
    """
    for name, module in denoiser.named_modules():
        if isinstance(module, nn.Embedding) and "class_emb" in name and module.num_embeddings > num_classes:
            return num_classes
    return None


def _assemble(
    path: Path,
    name: str | None,
    meta: ModelMeta,
    denoiser: nn.Module,
    hashes: dict[str, str],
    scheduler: dict[str, Any],
    family: Family,
    prompts: PromptSet | None,
    latent: bool,
) -> DiffusionModel:
    config = family.denoiser_config(denoiser)
    channels = int(config["in_channels"])
    size = _size(config["sample_size"])
    condition = family.condition
    num_classes = meta.num_classes
    null_class = None
    if condition == "class":
        num_classes = num_classes or family.class_count(config)
        if num_classes is None:
            condition = None
        else:
            null_class = (
                meta.null_class if meta.null_class is not None else _spare_class_embedding(denoiser, num_classes)
            )
    _own_storage(denoiser)
    model = DiffusionModel(
        name=name or meta.name or path.name,
        unet=denoiser,
        scheduler_config=scheduler,
        source_dir=path,
        weights_sha256=_combined_sha256(hashes),
        num_classes=num_classes,
        sample_shape=(channels, size, size),
        family=family.name,
        condition=condition,
        prompts=prompts,
        latent=latent,
        null_class=null_class,
    )
    logger.debug("loaded %s (%s family, %s condition) from %s", model.name, family.name, condition, path)
    return model


@torch.no_grad()
def _own_storage(module: nn.Module) -> None:
    """Give every parameter and buffer of ``module`` freshly allocated storage (one tensor at a time).

    CPU kernels gave a model as loaded and a copy of it (``copy.deepcopy``, what
    :func:`diffquant.models.cache.model_copy` hands out) outputs about 1e-7 apart on the same
    inputs, which moved calibrated scales in the last bits: the library API and ``diffquant
    compress`` then wrote different scales. With their own storage, a loaded model and every copy
    of it compute bit for bit the same.
    """
    for parameter in module.parameters():
        parameter.data = parameter.data.clone()
    for child in module.modules():
        for key, buffer in list(child._buffers.items()):
            if buffer is not None:
                child._buffers[key] = buffer.clone()


def load_model(
    path_or_name: str | Path | None = None,
    prompts: str | Path | None = None,
    *,
    name: str | None = None,
    path: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> DiffusionModel:
    """Load a bundled reference model by name or a local diffusers model or pipeline directory.

    ``device`` and ``dtype`` place the denoiser as ``runtime.device`` / ``runtime.dtype`` do
    (``device="auto"``: the first GPU, else the CPU); by default it stays on the CPU in float32.
    :meth:`DiffusionModel.to` moves it later.

    Args:
        path_or_name: A bundled reference model's name (``digits-unet``, ``digits-dit``,
            ``digits-t2i``) or a local directory; ``digits-unet`` when nothing is given.
        prompts: A prompts file for text-conditioned models (one prompt per line).
        name: The same as a name in ``path_or_name`` (the spec's ``model.name``).
        path: The same as a directory in ``path_or_name`` (the spec's ``model.path``).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (None: the CPU).
        dtype: ``float32``, ``float16`` or ``bfloat16`` of the full-precision model (None: float32).

    Raises:
        ModelLoadError: The source does not exist, is not a supported diffusers model, or has
            unsafe or malformed files.
        ConfigError: A ``device`` or ``dtype`` this machine cannot run (``cuda`` without a GPU).

    Example:
        >>> model = diffquant.load_model("digits-unet")
        >>> model.family, model.sample_shape
        ('unet2d', (1, 8, 8))
    """
    if path_or_name is not None:
        if name is not None or path is not None:
            raise ModelLoadError("give the model either positionally or as name=/path=, not both")
        looks_like_path = isinstance(path_or_name, Path) or "/" in str(path_or_name) or Path(path_or_name).is_dir()
        path, name = (path_or_name, None) if looks_like_path else (None, str(path_or_name))
    prompts_file = Path(prompts) if prompts is not None else None
    model = _load(path, name, prompts_file)
    if device is not None or dtype is not None:
        from diffquant.placement import resolve

        model.to(*resolve(device or "cpu", dtype or "float32"))
    return model


def _load(path: str | Path | None, name: str | None, prompts_file: Path | None) -> DiffusionModel:
    """The model at ``path`` or the bundled reference ``name`` (default digits-unet), on the CPU in float32."""
    if path is not None:
        return load_local_model(Path(path), prompts_file=prompts_file)
    if name is not None and name not in REFERENCE_MODELS:
        # reference_dir also knows the evaluation classifier, which is not a diffusion model
        raise ModelLoadError(
            f"unknown reference model {name!r}: it is not a bundled reference model (bundled: "
            f"{', '.join(REFERENCE_MODELS)}); set model.path for a local diffusers model"
        )
    return load_local_model(reference_dir(name or DIGITS_UNET), name=name or DIGITS_UNET, prompts_file=prompts_file)
