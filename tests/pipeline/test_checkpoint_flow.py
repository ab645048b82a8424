"""The checkpoint-triggered flow without servers: bad events, the registry lookup, the skip; ``diffquant watch``'s bad input.

The whole loop (event -> trigger -> worker -> compress -> version; the same event -> skipped) runs
against a real Prefect server in tests/integration/test_scheduled_compress.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffquant.errors import SpecError
from diffquant.flows.cli import app
from diffquant.models.reference import reference_dir
from diffquant.spec import load_spec
from tests.pipeline.conftest import SMALL, mlflow_runs


def client_for(home: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")


def add_version(client, name: str, tags: dict[str, str], source: Path) -> str:
    from diffquant.registry.models import ensure_registered_model

    ensure_registered_model(client, name)
    return str(client.create_model_version(name, str(source), tags=tags).version)


@pytest.mark.parametrize(
    ("checkpoint", "fragment"),
    [(None, "has no checkpoint path"), ("", "has no checkpoint path"), ("ckpts/step-1", "is relative")],
)
def test_an_event_without_an_absolute_path_fails_in_one_line(isolated_home, checkpoint, fragment):
    from diffquant.flows.checkpoint import compress_checkpoint_flow

    with pytest.raises(SpecError, match=fragment) as info:
        compress_checkpoint_flow(checkpoint=checkpoint)
    assert "\n" not in str(info.value) and "diffquant.checkpoint.path" in str(info.value)
    assert mlflow_runs(isolated_home) == []


def test_checkpoint_spec_replaces_the_model_source(tmp_path):
    from diffquant.flows.checkpoint import checkpoint_spec

    base = load_spec(overrides=["model.name=digits-unet", *SMALL]).to_dict()
    cfg = checkpoint_spec(base, tmp_path / "step-1")
    assert cfg.model.path == str(tmp_path / "step-1") and cfg.model.name is None
    assert cfg.sampler.steps == 10 and cfg.registered_model_name() == "step-1"


def test_find_compressed_needs_both_tags_and_takes_the_newest(isolated_home, tmp_path):
    from diffquant.registry.models import WEIGHTS_TAG, find_compressed

    client = client_for(isolated_home)
    assert find_compressed(client, "ckpt", "a" * 64, "s1") is None  # no registered model yet
    add_version(client, "ckpt", {WEIGHTS_TAG: "a" * 64, "spec_hash": "s2"}, tmp_path)
    add_version(client, "ckpt", {WEIGHTS_TAG: "b" * 64, "spec_hash": "s1"}, tmp_path)
    add_version(client, "ckpt", {"spec_hash": "s1"}, tmp_path)  # before the weights tag existed
    assert find_compressed(client, "ckpt", "a" * 64, "s1") is None
    add_version(client, "ckpt", {WEIGHTS_TAG: "a" * 64, "spec_hash": "s1"}, tmp_path)
    add_version(client, "ckpt", {WEIGHTS_TAG: "a" * 64, "spec_hash": "s1"}, tmp_path)
    assert find_compressed(client, "ckpt", "a" * 64, "s1").version in ("5", 5)


def test_a_checkpoint_registered_with_the_same_spec_is_skipped_with_the_reason(isolated_home, tmp_path):
    from diffquant.flows.checkpoint import checkpoint_spec, compress_checkpoint_flow
    from diffquant.models.loading import load_model
    from diffquant.registry.models import WEIGHTS_TAG

    ckpt = shutil.copytree(reference_dir("digits-unet"), tmp_path / "step-1")
    spec = load_spec(overrides=SMALL).to_dict()
    cfg = checkpoint_spec(spec, ckpt)
    sha = load_model("digits-unet").weights_sha256
    client = client_for(isolated_home)
    add_version(client, "step-1", {WEIGHTS_TAG: sha, "spec_hash": cfg.spec_hash()}, tmp_path)

    state = compress_checkpoint_flow(checkpoint=str(ckpt), spec=spec, return_state=True)
    assert state.is_completed() and state.name == "Skipped"
    assert state.message.startswith(f"skipped: {ckpt} (weights sha256 {sha[:12]}) is already registered as version 1")
    result = state.result()
    assert result["status"] == "skipped" and result["registered"] == "1" and result["registered_name"] == "step-1"
    assert len(client.search_model_versions("name='step-1'")) == 1
    assert mlflow_runs(isolated_home) == []  # nothing was compressed


runner = CliRunner()


def assert_one_line(result, fragment: str) -> None:
    output = result.output.strip()
    assert result.exit_code == 2, output
    assert "Traceback" not in output and len(output.splitlines()) == 1, output
    assert output.startswith("error:") and fragment in output, output


def test_watch_a_missing_folder_exits_2_in_one_line(isolated_home, tmp_path):
    assert_one_line(runner.invoke(app, ["watch", str(tmp_path / "nope"), "--once"]), "does not exist")


def test_watch_without_a_prefect_server_exits_2_in_one_line(isolated_home, tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings({PREFECT_API_URL: None}):
        assert_one_line(runner.invoke(app, ["watch", str(tmp_path), "--once"]), "PREFECT_API_URL is not set")


def test_prefect_yaml_runs_the_flow_on_the_event_the_watcher_emits():
    import yaml
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
    from prefect.events.schemas.events import Resource

    from diffquant.flows.checkpoint import CHECKPOINT_EVENT, PATH_LABEL, checkpoint_resource, checkpoint_spec

    root = Path(__file__).resolve().parents[2]
    deployments = yaml.safe_load((root / "prefect.yaml").read_text())["deployments"]
    deployment = next(d for d in deployments if d["name"] == "compress-on-checkpoint")
    assert deployment["entrypoint"] == "flows/checkpoint.py:compress_checkpoint_flow"
    assert deployment["concurrency_limit"] == 1
    (raw,) = deployment["triggers"]
    trigger = DeploymentEventTrigger.model_validate(raw)
    assert trigger.expect == {CHECKPOINT_EVENT}
    assert f"'{PATH_LABEL}'" in trigger.parameters["checkpoint"]
    emitted = Resource(checkpoint_resource(Path("/data/ckpts/step-1"), "c" * 64))
    assert trigger.match.includes([emitted]) and emitted[PATH_LABEL] == "/data/ckpts/step-1"
    assert checkpoint_spec(deployment["parameters"]["spec"], Path("/data/ckpts/step-1")).model.path


def test_emitting_without_a_prefect_server_is_refused_in_one_line(tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from diffquant.errors import TrackingError
    from diffquant.flows.checkpoint import emit_checkpoint_landed

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings({PREFECT_API_URL: None}), pytest.raises(TrackingError, match="PREFECT_API_URL is not set"):
        emit_checkpoint_landed(tmp_path, "d" * 64)
