"""A bad ``evaluate.clip_model`` fails before any work: one line, exit 2, no MLflow run left behind."""

from __future__ import annotations

import pytest

from diffquant.errors import SpecError
from diffquant.models.reference import reference_dir
from diffquant.spec import load_spec
from tests.pipeline.conftest import mlflow_runs
from tests.pipeline.test_cli import assert_clean_failure, invoke
from tests.tiny_pipelines import save_tiny_clip


def test_a_missing_clip_folder_is_refused_by_the_cli(isolated_home, tmp_path):
    missing = tmp_path / "no-clip"
    result = invoke("--set", "model.name=digits-t2i", "--set", f"evaluate.clip_model={missing}")
    assert_clean_failure(result, f"evaluate.clip_model: {missing} does not exist", isolated_home)
    assert not (isolated_home / "runs").exists()


def test_a_folder_that_is_not_a_clip_model_is_refused_by_the_cli(isolated_home):
    text_encoder = reference_dir("digits-t2i") / "text_encoder"  # a CLIPTextModel alone, no vision tower
    result = invoke("--set", "model.name=digits-t2i", "--set", f"evaluate.clip_model={text_encoder}")
    assert_clean_failure(result, "model_type 'clip_text_model', not 'clip'", isolated_home)


def test_clip_score_on_a_model_without_prompts_is_refused(isolated_home, tmp_path):
    clip = save_tiny_clip(tmp_path / "clip")
    result = invoke("--set", f"evaluate.clip_model={clip}")  # digits-unet: class labels, no prompts
    assert_clean_failure(result, "evaluate.clip_model: the model is not text-conditioned", isolated_home)


def test_the_flow_refuses_it_too_before_its_mlflow_run(isolated_home, tmp_path):
    from diffquant.flows.compress import compress_flow

    spec = load_spec(overrides=["model.name=digits-t2i", f"evaluate.clip_model={tmp_path / 'none'}"])
    with pytest.raises(SpecError, match=r"evaluate\.clip_model: .* does not exist"):
        compress_flow(spec=spec.to_dict(), out_dir=str(tmp_path / "out"))
    assert mlflow_runs(isolated_home) == []
