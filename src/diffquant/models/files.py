"""The JSON files of a model folder, validated when the folder is opened.

Every file a local model folder may hold is read here and checked against a pydantic model
before any weight is loaded: the denoiser's ``config.json`` (diffusers), a pipeline's
``model_index.json``, diffquant's own ``diffquant.json``, the scheduler's
``scheduler_config.json`` and a text encoder's ``config.json`` (transformers). A file that is
not JSON, not a JSON object, or has a field of the wrong type raises
:class:`~diffquant.errors.ModelLoadError` with one sentence naming the file and the field.
Fields diffquant does not read are kept as they are (diffusers and transformers read them).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from diffquant.errors import ModelLoadError

TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")
"""transformers classes diffquant runs as text encoders."""

PositiveInt = Annotated[StrictInt, Field(ge=1)]
Number = StrictFloat
"""A JSON number (an integer is accepted; a numeric string or a boolean is not)."""


def _shown(value: Any, limit: int = 60) -> str:
    """A value as JSON, cut to ``limit`` characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "null" if value is None else type(value).__name__


def read_json_object(path: Path) -> dict[str, Any]:
    """Read ``path`` as a JSON object.

    Raises:
        ModelLoadError: If it cannot be read, is not UTF-8 JSON, or is JSON but not an object.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ModelLoadError(f"{path} cannot be read: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ModelLoadError(f"{path} is not a text file (not UTF-8), so not JSON; restore the file") from None
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{path} is not readable JSON: {error}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object ({{...}}), got {_json_type(data)}: {_shown(data)}")
    return data


def _problem(path: Path, error: ValidationError) -> ModelLoadError:
    """The first problem of a validation error as one sentence naming the file and the field."""
    item = error.errors()[0]
    where = ".".join(str(part) for part in item["loc"])
    field = f"field '{where}'" if where else "it"
    if item["type"] == "extra_forbidden":
        known = BundledPrompts if item["loc"][0] == "prompts" else ModelMeta
        return ModelLoadError(f"{path}: unknown field '{where}'; known fields: {', '.join(sorted(known.model_fields))}")
    if item["type"] == "missing":
        return ModelLoadError(f"{path}: {field} is missing")
    message = re.sub(r" or instance of \w+", "", item["msg"].removeprefix("Value error, ")).rstrip(".")
    if item["type"] == "value_error":
        return ModelLoadError(f"{path}: {message}")
    message = message.replace("Input should be", "must be").replace("List should have", "must have")
    return ModelLoadError(f"{path}: {field} {message}, got {_shown(item['input'])}")


def _validated(model: type[BaseModel], path: Path, data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise _problem(path, error) from None


class DenoiserConfig(BaseModel):
    """The fields diffquant reads from a diffusers denoiser's ``config.json``."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    class_name: StrictStr = Field(alias="_class_name", min_length=1)
    in_channels: PositiveInt | None = None
    out_channels: PositiveInt | None = None
    sample_size: PositiveInt | tuple[PositiveInt, PositiveInt] | None = None
    num_class_embeds: PositiveInt | None = None
    num_embeds_ada_norm: PositiveInt | None = None
    addition_embed_type: StrictStr | None = None

    @model_validator(mode="after")
    def _square(self) -> DenoiserConfig:
        if isinstance(self.sample_size, tuple) and self.sample_size[0] != self.sample_size[1]:
            raise ValueError(
                f"sample_size {list(self.sample_size)} is not square; diffquant samples square inputs only"
            )
        return self


def read_denoiser_config(path: Path) -> tuple[DenoiserConfig, dict[str, Any]]:
    """The validated denoiser ``config.json`` at ``path`` and its raw fields.

    Raises:
        ModelLoadError: Naming the file and the field that is missing or of the wrong type.
    """
    data = read_json_object(path)
    if "_class_name" not in data:
        raise ModelLoadError(
            f"{path}: field '_class_name' is missing, so this is not a diffusers model config "
            "(save the model with diffusers' save_pretrained)"
        )
    return _validated(DenoiserConfig, path, data), data


KNOWN_COMPONENTS = frozenset(
    {
        "unet",
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
        "scheduler",
        "safety_checker",
        "feature_extractor",
        "image_encoder",
    }
)
"""Component names of diffusers pipelines: their entries must be ``[library, class]``."""

READ_COMPONENTS = frozenset(
    {"unet", "transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"}
)
"""Components diffquant needs: listed ones must have their folder (others may be left out; a latent
pipeline without its ``vae/`` folder is judged on latents, not decoded images)."""


class ModelIndex(BaseModel):
    """A pipeline's ``model_index.json``: the components it lists (present ones only)."""

    class_name: str | None = None
    components: dict[str, tuple[str, str]] = Field(default_factory=dict)


def _component(path: Path, key: str, value: Any) -> tuple[str, str] | None:
    """A component entry as (library, class), None for ``[null, null]``."""
    shape = f"a list of {len(value)}" if isinstance(value, list) else _json_type(value)
    if not (isinstance(value, list) and len(value) == 2):
        raise ModelLoadError(
            f'{path}: component \'{key}\' must be [library, class] (e.g. ["diffusers", "UNet2DModel"]), '
            f"got {shape}: {_shown(value)}"
        )
    if not all(part is None or isinstance(part, str) for part in value) or (value[0] is None) != (value[1] is None):
        raise ModelLoadError(
            f"{path}: component '{key}' must be [library, class] with two strings (or [null, null] when absent), "
            f"got {_shown(value)}"
        )
    return None if value[0] is None else (value[0], value[1])


def read_model_index(path: Path) -> ModelIndex:
    """The validated ``model_index.json`` at ``path``; listed components diffquant reads need their folder.

    A key is a component when diffusers treats it as one: its value is a list, or its name is a
    known component name (``unet``, ``text_encoder``, ...). Other keys are pipeline settings.
    A listed ``vae``, ``safety_checker`` or ``feature_extractor`` may lack its folder: diffquant
    never loads the latter two, and without a ``vae/`` folder samples stay undecoded latents.

    Raises:
        ModelLoadError: Naming the file and the component that is malformed or has no folder.
    """
    data = read_json_object(path)
    class_name = data.get("_class_name")
    if class_name is not None and not isinstance(class_name, str):
        raise ModelLoadError(f"{path}: field '_class_name' must be a string, got {_shown(class_name)}")
    components: dict[str, tuple[str, str]] = {}
    for key, value in data.items():
        if key.startswith("_") or not (isinstance(value, list) or key in KNOWN_COMPONENTS):
            continue
        entry = _component(path, key, value)
        if entry is None:
            continue
        if key in READ_COMPONENTS and not (path.parent / key).is_dir():
            raise ModelLoadError(
                f"{path}: component '{key}' ({entry[1]}) has no folder {path.parent / key}; "
                "copy the whole pipeline or remove the entry"
            )
        components[key] = entry
    return ModelIndex(class_name=class_name, components=components)


PromptRow = tuple[StrictStr, Annotated[StrictInt, Field(ge=0)] | None]
"""A bundled prompt: ``[text, digit class or null]``."""


class BundledPrompts(BaseModel):
    """``diffquant.json``'s ``prompts``: calibration and evaluation prompt rows."""

    model_config = ConfigDict(extra="forbid")

    calibration: list[PromptRow] = Field(min_length=1)
    evaluation: list[PromptRow] = Field(min_length=1)


class ModelMeta(BaseModel):
    """diffquant's own ``diffquant.json`` beside a model (every field optional)."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[StrictStr, Field(min_length=1)] | None = None
    num_classes: PositiveInt | None = None
    null_class: Annotated[StrictInt, Field(ge=0)] | None = None
    prompts: BundledPrompts | None = None

    @model_validator(mode="after")
    def _labels_in_range(self) -> ModelMeta:
        if self.prompts is None or self.num_classes is None:
            return self
        for purpose in ("calibration", "evaluation"):
            for i, (_, label) in enumerate(getattr(self.prompts, purpose)):
                if label is not None and label >= self.num_classes:
                    raise ValueError(
                        f"prompts.{purpose}.{i} has class {label}, outside 0..{self.num_classes - 1} (num_classes)"
                    )
        return self


def read_meta(path: Path) -> ModelMeta:
    """The validated ``diffquant.json`` at ``path`` (an empty one when the file is absent).

    Raises:
        ModelLoadError: Naming the file and the field of the wrong type or shape.
    """
    if not path.is_file():
        return ModelMeta()
    return _validated(ModelMeta, path, read_json_object(path))


class SchedulerConfig(BaseModel):
    """The fields of ``scheduler_config.json`` diffquant's DDIM sampler reads (defaults: DDIM's)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    class_name: StrictStr | None = Field(default=None, alias="_class_name")
    num_train_timesteps: PositiveInt = 1000
    beta_start: Annotated[Number, Field(gt=0)] = 0.0001
    beta_end: Annotated[Number, Field(gt=0)] = 0.02
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    trained_betas: list[Number] | None = None
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon"
    timestep_spacing: Literal["linspace", "leading", "trailing"] = "leading"
    clip_sample: StrictBool = True
    steps_offset: Annotated[StrictInt, Field(ge=0)] = 0


def read_scheduler_config(path: Path) -> dict[str, Any]:
    """The scheduler config at ``path``, checked for the fields DDIM sampling uses.

    Raises:
        ModelLoadError: Naming the file and the field of the wrong type or value.
    """
    data = read_json_object(path)
    _validated(SchedulerConfig, path, data)
    return data


class TextEncoderConfig(BaseModel):
    """The field of a transformers text encoder's ``config.json`` that picks its class."""

    model_config = ConfigDict(extra="allow")

    architectures: list[StrictStr] = Field(min_length=1)


def read_text_encoder_config(path: Path) -> str:
    """The text encoder class named by the transformers ``config.json`` at ``path``.

    Raises:
        ModelLoadError: If ``architectures`` is missing, not a list of names, or not a supported encoder.
    """
    data = read_json_object(path)
    if "architectures" not in data:
        raise ModelLoadError(
            f"{path}: field 'architectures' is missing, so the text encoder class is unknown; "
            f"set it to one of {', '.join(TEXT_ENCODERS)} (save_pretrained writes it)"
        )
    architecture = _validated(TextEncoderConfig, path, data).architectures[0]
    if architecture not in TEXT_ENCODERS:
        raise ModelLoadError(
            f"{path.parent} holds a {architecture} text encoder; supported: {', '.join(TEXT_ENCODERS)}"
        )
    return architecture
