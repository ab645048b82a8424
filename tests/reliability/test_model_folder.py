"""Every file of a model folder is validated at load time, before any weight is read.

A malformed ``config.json``, ``model_index.json``, ``diffquant.json``, ``scheduler_config.json``,
text encoder ``config.json`` or weights file raises ``ModelLoadError`` with one line naming the
file and the field; through the CLI that is exit 2, one ``error:`` line, nothing registered.
Folders are the tiny models of ``tests/conftest.py`` and ``tests/tiny_pipelines.py``, built once
per module and copied into each test's ``tmp_path`` before being damaged.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from diffquant.errors import ModelLoadError
from diffquant.models.loading import load_model
from tests.conftest import save_tiny_unet
from tests.pipeline.conftest import isolated_home, mlflow_runs  # noqa: F401 (isolated_home is a fixture)
from tests.pipeline.test_cli import assert_clean_failure, invoke
from tests.tiny_pipelines import save_tiny_sd, write_prompts

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A bare UNet2DModel folder and a Stable Diffusion pipeline, built once for the module."""
    root = tmp_path_factory.mktemp("sources")
    return {"unet": save_tiny_unet(root / "unet"), "sd": save_tiny_sd(root / "sd")}


@pytest.fixture
def unet(sources: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(sources["unet"], tmp_path / "unet"))


@pytest.fixture
def sd(sources: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(sources["sd"], tmp_path / "sd"))


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    return write_prompts(tmp_path / "prompts.txt")


@pytest.fixture
def no_weights_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any weights are loaded: validation must refuse the folder before."""
    import diffquant.models.loading as loading

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("weights were loaded before the folder's files were validated")

    monkeypatch.setattr(loading, "_from_pretrained", refuse)
    monkeypatch.setattr(loading, "_load_text_encoder", refuse, raising=False)


def write(path: Path, value: Any) -> None:
    path.write_text(value if isinstance(value, str) else json.dumps(value))


def edit(path: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def refused(path: Path, *fragments: str, prompts: Path | None = None) -> str:
    """Load ``path``; require one ModelLoadError line holding every fragment."""
    with pytest.raises(ModelLoadError) as info:
        load_model(path=path, prompts=prompts)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- config.json of the denoiser -----------------------------------------------------------


@pytest.mark.parametrize("value", [[1, 2], 3, '"UNet2DModel"', "null"], ids=["list", "number", "string", "null"])
def test_config_json_that_is_json_but_not_an_object(unet, no_weights_read, value):
    write(unet / "config.json", value)
    refused(unet, f"{unet / 'config.json'} must hold a JSON object")


def test_config_json_without_class_name(unet, no_weights_read):
    edit(unet / "config.json", lambda c: c.pop("_class_name"))
    refused(unet, str(unet / "config.json"), "'_class_name' is missing")


def test_config_json_with_unknown_class(unet, no_weights_read):
    edit(unet / "config.json", lambda c: c.update(_class_name="MyOwnUNet"))
    refused(unet, f"{unet / 'config.json'}: _class_name MyOwnUNet is not a supported denoiser", "UNet2DModel")


def test_config_json_class_name_not_a_string(unet, no_weights_read):
    edit(unet / "config.json", lambda c: c.update(_class_name=["UNet2DModel"]))
    refused(unet, str(unet / "config.json"), "'_class_name' must be a valid string")


def test_config_json_that_is_not_text(unet, no_weights_read):
    """Today: UnicodeDecodeError traceback."""
    (unet / "config.json").write_bytes(b"\xff\xfe\x00\x01binary")
    refused(unet, str(unet / "config.json"), "not UTF-8")


def test_config_json_field_of_wrong_type(unet, no_weights_read):
    """Today: 'cannot load ...: not all arguments converted during string formatting'."""
    edit(unet / "config.json", lambda c: c.update(in_channels="one"))
    refused(unet, str(unet / "config.json"), "'in_channels' must be a valid integer", '"one"')


def test_config_json_without_sample_size(unet, no_weights_read):
    """Today: loads, then TypeError in the loader (UNet2DModel's sample_size defaults to None)."""
    edit(unet / "config.json", lambda c: c.pop("sample_size"))
    refused(unet, str(unet / "config.json"), "field 'sample_size' is missing or null")


def test_config_json_with_non_square_sample_size(unet, no_weights_read):
    """Today: loads as 8x8 and samples the wrong shape."""
    edit(unet / "config.json", lambda c: c.update(sample_size=[8, 16]))
    refused(unet, str(unet / "config.json"), "sample_size [8, 16] is not square")


# --- model_index.json of a pipeline ----------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "shown"),
    [
        ("UNet2DConditionModel", 'got a string: "UNet2DConditionModel"'),
        (["diffusers"], 'got a list of 1: ["diffusers"]'),
        (["diffusers", "UNet2DConditionModel", "extra"], "got a list of 3"),
        ([1, 2], "got [1, 2]"),
        (["diffusers", None], 'got ["diffusers", null]'),
    ],
    ids=["string", "one", "three", "numbers", "half-null"],
)
def test_model_index_component_not_library_class(sd, no_weights_read, prompts, entry, shown):
    edit(sd / "model_index.json", lambda i: i.update(unet=entry))
    refused(sd, f"{sd / 'model_index.json'}: component 'unet' must be [library, class]", shown, prompts=prompts)


def test_model_index_component_without_its_folder(sd, no_weights_read, prompts):
    """Today: the denoiser is loaded, then 'text_encoder/config.json is not readable JSON: [Errno 2]'."""
    shutil.rmtree(sd / "text_encoder")
    refused(sd, "component 'text_encoder' (CLIPTextModel) has no folder", str(sd / "text_encoder"), prompts=prompts)


def test_model_index_component_diffquant_never_reads_may_lack_its_folder(sd, prompts):
    """A listed vae or safety checker without its folder is no reason to refuse the pipeline."""
    shutil.rmtree(sd / "vae")
    edit(
        sd / "model_index.json", lambda i: i.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"])
    )
    model = load_model(path=sd, prompts=prompts)
    assert model.family == "text-unet" and model.latent


def test_model_index_that_is_not_an_object(sd, no_weights_read, prompts):
    """Today: AttributeError 'list' object has no attribute 'items'."""
    write(sd / "model_index.json", [["diffusers", "UNet2DConditionModel"]])
    refused(sd, f"{sd / 'model_index.json'} must hold a JSON object", prompts=prompts)


# --- diffquant.json ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("ten", 'must be a valid integer, got "ten"'),
        (-3, "must be greater than or equal to 1, got -3"),
        (0, "must be greater than or equal to 1, got 0"),
        (True, "must be a valid integer, got true"),
        (2.5, "must be a valid integer, got 2.5"),
    ],
    ids=["string", "negative", "zero", "bool", "float"],
)
def test_diffquant_json_num_classes_of_wrong_type(unet, no_weights_read, value, problem):
    write(unet / "diffquant.json", {"num_classes": value})
    refused(unet, f"{unet / 'diffquant.json'}: field 'num_classes' {problem}")


@pytest.mark.parametrize(
    ("bundled", "field"),
    [
        ("a cat", "field 'prompts' must be a valid dictionary"),
        ({"calibration": ["a cat"], "evaluation": [["a dog", None]]}, "field 'prompts.calibration.0'"),
        ({"evaluation": [["a dog", None]]}, "field 'prompts.calibration' is missing"),
        ({"calibration": [], "evaluation": [["a dog", None]]}, "field 'prompts.calibration' must have at least 1"),
        ({"calibration": [["a cat", "cat"]], "evaluation": [["a dog", None]]}, "field 'prompts.calibration.0.1'"),
        ({"calibration": [["a cat", None, 3]], "evaluation": [["a dog", None]]}, "field 'prompts.calibration.0'"),
    ],
    ids=["string", "row-not-a-pair", "no-calibration", "empty", "label-string", "row-of-three"],
)
def test_diffquant_json_prompts_of_wrong_shape(sd, no_weights_read, bundled, field):
    """Today: TypeError, ValueError (unpacking) or KeyError after the denoiser and text encoder loaded."""
    write(sd / "diffquant.json", {"prompts": bundled})
    refused(sd, f"{sd / 'diffquant.json'}: {field}")


def test_diffquant_json_that_is_not_an_object(unet, no_weights_read):
    """Today: AttributeError 'list' object has no attribute 'get'."""
    write(unet / "diffquant.json", [10])
    refused(unet, f"{unet / 'diffquant.json'} must hold a JSON object")


def test_diffquant_json_with_unknown_field(unet, no_weights_read):
    """Today: a typo like num_class is ignored silently."""
    write(unet / "diffquant.json", {"num_class": 10})
    refused(
        unet, f"{unet / 'diffquant.json'}: unknown field 'num_class'", "known fields: name, null_class, num_classes"
    )
    write(unet / "diffquant.json", {"prompts": {"calibration": [["a", 1]], "evaluation": [["b", 1]], "eval": []}})
    refused(unet, "unknown field 'prompts.eval'; known fields: calibration, evaluation")


def test_diffquant_json_name_not_a_string(unet, no_weights_read):
    write(unet / "diffquant.json", {"name": 5})
    refused(unet, f"{unet / 'diffquant.json'}: field 'name' must be a valid string, got 5")


def test_diffquant_json_num_classes_beyond_the_class_embedding(unet, no_weights_read):
    """Today: loads, then class labels past num_class_embeds fail in the embedding during sampling."""
    write(unet / "diffquant.json", {"num_classes": 50})
    refused(unet, "num_classes 50 exceeds the 11 class embeddings", "num_class_embeds")


def test_diffquant_json_num_classes_on_an_unconditional_denoiser(tmp_path, no_weights_read):
    model = save_tiny_unet(tmp_path / "uncond", num_class_embeds=None)
    write(model / "diffquant.json", {"num_classes": 10})
    refused(model, f"{model / 'diffquant.json'}: num_classes is 10", "has no class embedding")


def test_diffquant_json_prompt_label_outside_num_classes(sd, no_weights_read):
    write(sd / "diffquant.json", {"num_classes": 10, "prompts": {"calibration": [["a", 12]], "evaluation": [["b", 1]]}})
    refused(sd, str(sd / "diffquant.json"), "prompts.calibration.0 has class 12, outside 0..9")


# --- scheduler_config.json --------------------------------------------------------------------


@pytest.mark.parametrize("value", [[1000], '"DDIMScheduler"'], ids=["list", "string"])
def test_scheduler_config_not_an_object(unet, no_weights_read, value):
    write(unet / "scheduler_config.json", value)
    refused(unet, f"{unet / 'scheduler_config.json'} must hold a JSON object")


@pytest.mark.parametrize("value", ["many", 12.5, None, -1], ids=["string", "float", "null", "negative"])
def test_scheduler_config_num_train_timesteps_not_a_count(unet, no_weights_read, value):
    """Today: loads, then DDIM fails when sampling starts."""
    edit(unet / "scheduler_config.json", lambda s: s.update(num_train_timesteps=value))
    refused(unet, f"{unet / 'scheduler_config.json'}: field 'num_train_timesteps'")


def test_scheduler_config_beta_as_a_string(unet, no_weights_read):
    """Today: loads, then DDIM fails building its betas when sampling starts."""
    edit(unet / "scheduler_config.json", lambda s: s.update(beta_end="0.02"))
    refused(unet, f"{unet / 'scheduler_config.json'}: field 'beta_end' must be a valid number, got \"0.02\"")


def test_pipeline_scheduler_config_with_unknown_prediction_type(sd, no_weights_read, prompts):
    """Today: loads, then DDIM's step raises after the trajectories are being collected."""
    edit(sd / "scheduler" / "scheduler_config.json", lambda s: s.update(prediction_type="flow"))
    refused(sd, str(sd / "scheduler" / "scheduler_config.json"), "'prediction_type' must be 'epsilon'", prompts=prompts)


# --- weights -----------------------------------------------------------------------------------


def test_truncated_weights(unet, no_weights_read):
    """Today: 'cannot load ...: Unable to load weights from checkpoint file ...'."""
    weights = unet / WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    refused(unet, f"{weights} is truncated: its header describes")


def test_weights_cut_inside_their_header(unet, no_weights_read):
    weights = unet / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:40])
    refused(unet, f"{weights} is truncated: it ends inside its safetensors header")


def test_random_bytes_as_weights(unet, no_weights_read):
    (unet / WEIGHTS).write_bytes(os.urandom(4096))
    refused(unet, f"{unet / WEIGHTS} is not a safetensors file")


def test_weights_with_trailing_bytes(unet, no_weights_read):
    with (unet / WEIGHTS).open("ab") as handle:
        handle.write(b"\0" * 100)
    refused(unet, f"{unet / WEIGHTS} is damaged: it has 100 bytes after its last tensor")


def test_weight_shapes_not_matching_config(unet, no_weights_read):
    """Today: 'cannot load ...: Error(s) in loading state_dict for UNet2DModel:' (cut at its first line)."""
    edit(unet / "config.json", lambda c: c.update(in_channels=2))
    refused(unet, f"{unet / WEIGHTS}: parameter conv_in.weight has shape [8, 1, 3, 3]", "makes it [8, 2, 3, 3]")


def test_text_encoder_weight_shapes_not_matching_its_config(sd, no_weights_read, prompts):
    """Today: transformers prints a table of mismatches and raises 'look at the above report'."""
    edit(sd / "text_encoder" / "config.json", lambda c: c.update(intermediate_size=48))
    refused(
        sd,
        f"{sd / 'text_encoder' / 'model.safetensors'}: parameter encoder.layers.0.mlp.fc1.weight has shape [64, 32]",
        "makes it [48, 32]",
        prompts=prompts,
    )


def test_weights_lacking_a_parameter(unet):
    """Today: loads with conv_in.weight left random (diffusers only warns)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(unet / WEIGHTS))
    del tensors["conv_in.weight"]
    save_file(tensors, str(unet / WEIGHTS))
    refused(unet, f"{unet / WEIGHTS} lacks parameter conv_in.weight of the UNet2DModel")


# --- text encoder config.json ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("architectures", "problem"),
    [
        (None, "field 'architectures' is missing"),
        ("CLIPTextModel", "field 'architectures' must be a valid list"),
        (5, "field 'architectures' must be a valid list, got 5"),
        ([], "field 'architectures' must have at least 1"),
        ([7], "field 'architectures.0' must be a valid string"),
    ],
    ids=["missing", "string", "number", "empty", "not-a-name"],
)
def test_text_encoder_config_architectures(sd, no_weights_read, prompts, architectures, problem):
    def change(config: dict[str, Any]) -> None:
        if architectures is None:
            del config["architectures"]
        else:
            config["architectures"] = architectures

    edit(sd / "text_encoder" / "config.json", change)
    refused(sd, f"{sd / 'text_encoder' / 'config.json'}: {problem}", prompts=prompts)


def test_text_encoder_config_not_an_object(sd, no_weights_read, prompts):
    """Today: AttributeError 'list' object has no attribute 'get' (after the denoiser loaded)."""
    write(sd / "text_encoder" / "config.json", ["CLIPTextModel"])
    refused(sd, f"{sd / 'text_encoder' / 'config.json'} must hold a JSON object", prompts=prompts)


def test_unsupported_text_encoder(sd, no_weights_read, prompts):
    edit(sd / "text_encoder" / "config.json", lambda c: c.update(architectures=["BertModel"]))
    refused(sd, "holds a BertModel text encoder; supported: CLIPTextModel", prompts=prompts)


# --- the folder itself --------------------------------------------------------------------


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", f"model path {tmp_path / 'empty'} is an empty folder")


def test_path_that_is_a_file(unet):
    refused(unet / "config.json", "is a file, not a folder", f"({unet} here)")


# --- through the CLI: exit 2, one line, nothing registered -----------------------------------


def assert_nothing_left(home: Path, out: Path) -> None:
    assert mlflow_runs(home) == []
    assert not out.exists()


def test_cli_model_index_component_not_library_class(isolated_home, sd, prompts, tmp_path):  # noqa: F811
    edit(sd / "model_index.json", lambda i: i.update(unet=["diffusers", "UNet2DConditionModel", "x"]))
    result = invoke("--set", f"model.path={sd}", "--set", f"model.prompts={prompts}", "--out", str(tmp_path / "out"))
    assert_clean_failure(result, "component 'unet' must be [library, class]", isolated_home)
    assert_nothing_left(isolated_home, tmp_path / "out")


def test_cli_diffquant_json_num_classes_string(isolated_home, unet, tmp_path):  # noqa: F811
    write(unet / "diffquant.json", {"num_classes": "10"})
    result = invoke("--set", f"model.path={unet}", "--out", str(tmp_path / "out"))
    assert_clean_failure(result, "diffquant.json: field 'num_classes' must be a valid integer", isolated_home)
    assert_nothing_left(isolated_home, tmp_path / "out")


def test_cli_weight_shapes_not_matching_config(isolated_home, unet, tmp_path):  # noqa: F811
    edit(unet / "config.json", lambda c: c.update(in_channels=2))
    result = invoke("--set", f"model.path={unet}", "--out", str(tmp_path / "out"))
    assert_clean_failure(result, "parameter conv_in.weight has shape [8, 1, 3, 3]", isolated_home)
    assert "makes it [8, 2, 3, 3]" in result.output
    assert_nothing_left(isolated_home, tmp_path / "out")


# --- sampler against the model ------------------------------------------------------------------


def test_guidance_on_a_model_without_a_null_class_fails_in_one_line(unet, isolated_home, tmp_path):  # noqa: F811
    write(unet / "diffquant.json", {"num_classes": 11})  # every class embedding is a class: no null class
    result = invoke("--set", f"model.path={unet}", "--set", "sampler.guidance=3", "--out", str(tmp_path / "out"))
    assert_clean_failure(result, "sampler.guidance: 3 needs a model with a null condition", isolated_home)
    assert_nothing_left(isolated_home, tmp_path / "out")


def test_from_model_with_a_scheduler_diffusers_lacks_fails_in_one_line(unet, isolated_home, tmp_path):  # noqa: F811
    edit(unet / "scheduler_config.json", lambda config: config.update(_class_name="MyOwnScheduler"))
    result = invoke("--set", f"model.path={unet}", "--set", "sampler.name=from_model", "--out", str(tmp_path / "out"))
    assert_clean_failure(
        result, "sampler.name: from_model: the model's scheduler config names 'MyOwnScheduler'", isolated_home
    )
    assert_nothing_left(isolated_home, tmp_path / "out")
