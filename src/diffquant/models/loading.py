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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from diffquant.errors import ModelLoadError
from diffquant.models.families import FAMILIES, Family, family_for
from diffquant.models.prompts import Prompt, PromptSet, Tokenize, hf_tokenize, read_prompts_file
from diffquant.models.reference import DIGITS_UNET, REFERENCE_MODELS, reference_dir
from diffquant.storage import check_safetensors, sha256_file

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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{path} is not readable JSON: {error}") from None


def _checked_weights(folder: Path, name: str) -> Path:
    """The safetensors weights in ``folder``, refusing pickle checkpoints."""
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


def _from_pretrained(cls: type, folder: Path, weights_name: str) -> tuple[nn.Module, str]:
    """Load ``cls`` from ``folder`` (safetensors only); return it in eval mode and its sha256."""
    weights = _checked_weights(folder, weights_name)
    try:
        # low_cpu_mem_usage=False: the fast path needs `accelerate`, and diffusers warns without it
        module = cls.from_pretrained(str(folder), use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as error:
        raise ModelLoadError(f"cannot load {folder}: {str(error).splitlines()[0]}") from None
    return module.eval().requires_grad_(False), sha256_file(weights)


def _text_encoder(folder: Path) -> tuple[nn.Module, str]:
    import transformers
    from transformers import AutoConfig

    config = _read_json(folder / "config.json")
    architectures = config.get("architectures") or []
    if not architectures or architectures[0] not in ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel"):
        raise ModelLoadError(
            f"{folder} holds a {architectures[0] if architectures else 'unknown'} text encoder; "
            "supported: CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel"
        )
    weights = _checked_weights(folder, TRANSFORMERS_WEIGHTS)
    cls = getattr(transformers, architectures[0])
    # transformers draws a tqdm bar per load on stderr, which breaks the CLI's rich progress display
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        cfg._attn_implementation = "eager"
        module = cls.from_pretrained(str(folder), config=cfg, use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as error:
        raise ModelLoadError(f"cannot load {folder}: {str(error).splitlines()[0]}") from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return module.eval().requires_grad_(False), sha256_file(weights)


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not folder.is_dir():
        raise ModelLoadError(f"{folder.parent} has a text encoder but no {folder.name}/ folder")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ModelLoadError(f"cannot load the tokenizer in {folder}: {str(error).splitlines()[0]}") from None


def _scheduler(path: Path, candidates: list[Path]) -> dict[str, Any]:
    for candidate in candidates:
        if candidate.is_file():
            return _read_json(candidate)
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


def _prompt_set(meta: dict[str, Any], tokenize: Tokenize, prompts_file: Path | None, path: Path) -> PromptSet:
    if prompts_file is not None:
        prompts = read_prompts_file(prompts_file)
        return PromptSet(prompts, prompts, tokenize)
    bundled = meta.get("prompts")
    if not bundled:
        raise ModelLoadError(
            f"{path} is text-conditioned and has no bundled prompts; set model.prompts to a text file "
            "with one prompt per line (used for calibration and evaluation)"
        )

    def parse(rows: list[list[Any]]) -> list[Prompt]:
        return [Prompt(str(text), None if label is None else int(label)) for text, label in rows]

    return PromptSet(parse(bundled["calibration"]), parse(bundled["evaluation"]), tokenize)


def _load_bare(path: Path, meta: dict[str, Any]) -> tuple[nn.Module, str, str, Family]:
    config = _read_json(path / "config.json")
    class_name = config.get("_class_name")
    family = family_for(class_name, components=(), config=config)
    if family.condition == "text":
        raise ModelLoadError(
            f"{path} is a bare {class_name}, which needs its text encoder; point model.path at the "
            "pipeline directory (with model_index.json, unet/, text_encoder/, tokenizer/)"
        )
    import diffusers

    module, sha = _from_pretrained(getattr(diffusers, class_name), path, DIFFUSERS_WEIGHTS)
    return module, sha, class_name, family


def load_local_model(path: Path, name: str | None = None, prompts_file: Path | None = None) -> DiffusionModel:
    """Load a denoiser from a local diffusers directory (model or pipeline), safetensors only.

    Args:
        path: The directory (``save_pretrained`` output of a model, or a pipeline).
        name: Display name; defaults to the directory name.
        prompts_file: Prompts for a text-conditioned model (one per line); overrides bundled ones.

    Raises:
        ModelLoadError: Missing directory, not a diffusers model, unsupported family, pickle
            weights, no scheduler config, or a text model without prompts.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is not a directory")
    meta_file = path / META_NAME
    meta = _read_json(meta_file) if meta_file.is_file() else {}
    if (path / "model_index.json").is_file():
        return _load_pipeline(path, meta, name, prompts_file)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a diffusers model: no config.json or model_index.json in it")
    if prompts_file is not None:
        raise ModelLoadError(f"model.prompts is set, but {path} is not a text-conditioned pipeline")
    scheduler = _scheduler(path, [path / "scheduler_config.json"])
    module, sha, _, family = _load_bare(path, meta)
    return _assemble(path, name, meta, module, {"denoiser": sha}, scheduler, family, None, latent=False)


def _load_pipeline(path: Path, meta: dict[str, Any], name: str | None, prompts_file: Path | None) -> DiffusionModel:
    index = _read_json(path / "model_index.json")
    listed = {key for key, value in index.items() if isinstance(value, list) and value[0] is not None}
    components = listed | {entry.name for entry in path.iterdir() if entry.is_dir()}
    denoiser_key = "unet" if "unet" in components else "transformer" if "transformer" in components else None
    if denoiser_key is None:
        raise ModelLoadError(f"{path} is a diffusers pipeline without a unet/ or transformer/ component")
    folder = path / denoiser_key
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{path} lists a {denoiser_key} but has no {denoiser_key}/config.json")
    denoiser_config = _read_json(folder / "config.json")
    class_name = denoiser_config.get("_class_name")
    family = family_for(class_name, components=tuple(sorted(components)), config=denoiser_config)
    latent = "vae" in components
    scheduler = _latent_scheduler(_scheduler(path, [path / "scheduler" / "scheduler_config.json"]), latent)
    import diffusers

    denoiser, sha = _from_pretrained(getattr(diffusers, class_name), folder, DIFFUSERS_WEIGHTS)
    hashes = {denoiser_key: sha}
    prompts = None
    if family.condition == "text":
        encoders, tokenizers = [], []
        for encoder_key, tokenizer_key in family.text_components:
            encoder, hashes[encoder_key] = _text_encoder(path / encoder_key)
            encoders.append(encoder)
            tokenizers.append(_tokenizer(path / tokenizer_key))
        prompts = _prompt_set(meta, _family_tokenize(tokenizers, family), prompts_file, path)
        denoiser = family.wrap(encoders, tokenizers, denoiser)
    elif prompts_file is not None:
        raise ModelLoadError(f"model.prompts is set, but {path} is not text-conditioned")
    return _assemble(path, name, meta, denoiser, hashes, scheduler, family, prompts, latent=latent)


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


def _assemble(
    path: Path,
    name: str | None,
    meta: dict[str, Any],
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
    num_classes = meta.get("num_classes")
    if condition == "class":
        num_classes = num_classes or family.class_count(config)
        if num_classes is None:
            condition = None
    model = DiffusionModel(
        name=name or meta.get("name") or path.name,
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
    )
    logger.debug("loaded %s (%s family, %s condition) from %s", model.name, family.name, condition, path)
    return model


def load_model(
    name: str | None = None, path: str | Path | None = None, prompts: str | Path | None = None
) -> DiffusionModel:
    """Load a bundled reference model by ``name`` or a local diffusers model from ``path``.

    Args:
        name: A bundled reference model (``digits-unet`` if neither is given).
        path: A local diffusers model or pipeline directory.
        prompts: A prompts file for text-conditioned models (one prompt per line).
    """
    prompts_file = Path(prompts) if prompts is not None else None
    if path is not None:
        return load_local_model(Path(path), prompts_file=prompts_file)
    if name is not None and name not in REFERENCE_MODELS:
        # reference_dir also knows the evaluation classifier, which is not a diffusion model
        raise ModelLoadError(
            f"unknown reference model {name!r}: it is not a bundled reference model (bundled: "
            f"{', '.join(REFERENCE_MODELS)}); set model.path for a local diffusers model"
        )
    return load_local_model(reference_dir(name or DIGITS_UNET), name=name or DIGITS_UNET, prompts_file=prompts_file)
