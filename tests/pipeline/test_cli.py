"""The CLI end to end: a small successful run, and every bad input -> one line, exit 2."""

import json
import pickle
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffquant.flows.cli import app
from tests.conftest import save_tiny_unet
from tests.pipeline.conftest import SMALL, mlflow_runs

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["compress", *args])


def set_args(items):
    return [arg for item in items for arg in ("--set", item)]


def assert_clean_failure(result, fragment: str, home: Path) -> None:
    output = result.output.strip()
    assert result.exit_code == 2, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and output.splitlines()[-1] == errors[0], output
    assert fragment in errors[0]
    runs = mlflow_runs(home)
    # the run is FAILED, and so is the stage that failed; stages that finished before it (the cost estimate) stay FINISHED
    assert all(r.info.status == "FAILED" for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert all(r.info.status in ("FAILED", "FINISHED") for r in runs)


def test_compress_cli_small_run(isolated_home, tmp_path):
    result = invoke(*set_args(SMALL), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    summary_path = Path(result.stdout.strip().splitlines()[-1])
    assert summary_path == tmp_path / "out" / "summary.json"
    summary = json.loads(summary_path.read_text())
    assert "mlflow ui --backend-store-uri" in result.output
    assert summary["metrics"]["quantized"]["accuracy"] > 0.5
    assert [r.info.status for r in mlflow_runs(isolated_home) if "mlflow.parentRunId" not in r.data.tags] == [
        "FINISHED"
    ]


def test_missing_config(isolated_home, tmp_path):
    assert_clean_failure(invoke(str(tmp_path / "missing.yaml")), "does not exist", isolated_home)


def test_unknown_key(isolated_home):
    assert_clean_failure(invoke("--set", "quantize.weight.bitz=4"), "unknown spec key", isolated_home)


@pytest.mark.parametrize("bits", ["1", "9"])
def test_bits_out_of_range(isolated_home, bits):
    assert_clean_failure(invoke("--set", f"quantize.weight.bits={bits}"), "quantize.weight.bits", isolated_home)


def test_model_path_missing(isolated_home, tmp_path):
    assert_clean_failure(invoke("--set", f"model.path={tmp_path / 'nope'}"), "does not exist", isolated_home)


def test_not_a_diffusers_dir(isolated_home, tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("hi")
    assert_clean_failure(invoke("--set", f"model.path={tmp_path / 'junk'}"), "not a diffusers model", isolated_home)


def test_pickle_weights(isolated_home, tmp_path):
    model = save_tiny_unet(tmp_path / "m")
    (model / "diffusion_pytorch_model.safetensors").write_bytes(pickle.dumps({"w": 1}))
    assert_clean_failure(invoke("--set", f"model.path={model}"), "pickle", isolated_home)


def test_mlflow_home_not_writable(isolated_home, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("DIFFQUANT_HOME", str(blocker / "home"))
    result = invoke()
    assert_clean_failure(result, "not writable", isolated_home)
    assert not (blocker.parent / "mlflow.db").exists()


def test_help_documents_every_option():
    result = runner.invoke(app, ["compress", "--help"])
    assert result.exit_code == 0
    for option in ("--set", "--out", "--verbose", "--runner", "--workers"):
        assert option in result.output


def test_labels_file_problems(isolated_home, tmp_path):
    empty = tmp_path / "labels.txt"
    empty.write_text("# nothing\n\n")
    assert_clean_failure(invoke("--set", f"calibration.labels_file={empty}"), "is empty", isolated_home)
    assert_clean_failure(
        invoke("--set", f"calibration.labels_file={tmp_path / 'missing.txt'}"), "cannot be read", isolated_home
    )
    out_of_range = tmp_path / "bad.txt"
    out_of_range.write_text("3\n12\n")
    assert_clean_failure(invoke("--set", f"calibration.labels_file={out_of_range}"), "outside 0..9", isolated_home)


def test_unknown_strategy_and_oversized_calibration(isolated_home):
    assert_clean_failure(invoke("--set", "calibration.strategy=magic"), "calibration.strategy", isolated_home)
    assert_clean_failure(invoke("--set", "calibration.size=999999"), "exceeds the candidate pool", isolated_home)


def test_nan_trajectories_fail_cleanly(isolated_home, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    model = save_tiny_unet(tmp_path / "nan-model")
    weights = model / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    tensors["conv_out.bias"] = torch.full_like(tensors["conv_out.bias"], float("nan"))
    save_file(tensors, str(weights))
    result = invoke("--set", f"model.path={model}", *set_args(SMALL), "--out", str(tmp_path / "out"))
    assert_clean_failure(result, "NaN", isolated_home)
    runs = mlflow_runs(isolated_home)
    assert any(r.info.status == "FAILED" and "mlflow.parentRunId" not in r.data.tags for r in runs)
    assert not (tmp_path / "out" / "summary.json").exists()


def test_deployed_cost_without_a_byte_or_bit_budget(isolated_home):
    spec = "allocation={budget: {bitops: 1.0e9}, cost: deployed}"
    assert_clean_failure(invoke("--set", spec), "cost: deployed counts stored bytes", isolated_home)


def test_allocation_globs_and_content_metric_are_checked_before_the_run(isolated_home, tmp_path):
    out = tmp_path / "out"
    for setting, fragment in [
        ("content_layers: ['nope*']", "allocation.content_layers: pattern 'nope*' matches no quantizable layer"),
        ("pinned: {'nope*': w8a8}", "allocation.pinned: pattern 'nope*' matches no quantizable layer"),
    ]:
        result = invoke("--set", f"allocation={{budget: {{avg_weight_bits: 4}}, {setting}}}", "--out", str(out))
        assert_clean_failure(result, fragment, isolated_home)
    assert not mlflow_runs(isolated_home) and not out.exists()  # refused before any run started


def test_unknown_runner(isolated_home):
    assert_clean_failure(invoke("--runner", "ray"), "runtime.runner", isolated_home)


def test_runtime_flags_become_spec_overrides():
    from diffquant.flows.cli import _runtime_overrides

    assert _runtime_overrides("dask", 2) == ["runtime.runner=dask", "runtime.workers=2"]
    assert _runtime_overrides(None, None) == []


def _no_model_loading(monkeypatch):
    import diffquant.models.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the pre-flight checks failed")

    monkeypatch.setattr(loading, "load_model", refuse)


def test_preflight_unreachable_tracking_server(isolated_home, monkeypatch):
    from tests.servers import free_port

    _no_model_loading(monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    start = time.perf_counter()
    result = invoke()
    assert time.perf_counter() - start < 15
    assert_clean_failure(result, "MLflow tracking server", isolated_home)


def test_preflight_prefect_api_not_answering(isolated_home, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.servers import free_port

    _no_model_loading(monkeypatch)
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):
        result = invoke()
    assert_clean_failure(result, "Prefect API", isolated_home)


def test_preflight_invalid_registry_name(isolated_home, tmp_path, monkeypatch):
    _no_model_loading(monkeypatch)
    assert_clean_failure(
        invoke("--set", "promote.registered_model=bad/name"), "promote.registered_model", isolated_home
    )
    folder = tmp_path / "my model"
    folder.mkdir()
    assert_clean_failure(invoke("--set", f"model.path={folder}"), "registered model name 'my model'", isolated_home)


def test_promote_and_rollback_commands(isolated_home, tmp_path):
    from mlflow.tracking import MlflowClient

    from tests.registry.test_promotion import register

    client = MlflowClient(tracking_uri=f"sqlite:///{isolated_home / 'mlflow.db'}")
    isolated_home.mkdir(parents=True, exist_ok=True)
    register(client, tmp_path, 1.2)
    register(client, tmp_path, 1.1)
    result = runner.invoke(app, ["promote", "digits-unet", "1"])
    assert result.exit_code == 0, result.output
    assert str(client.get_registered_model("digits-unet").aliases["champion"]) == "1"
    result = runner.invoke(app, ["rollback", "digits-unet"])
    assert result.exit_code == 0 and "rolled back to version 2" in result.output, result.output
    for args, fragment in (
        (["promote", "digits-unet", "7"], "no version '7'"),
        (["rollback", "nope"], "does not exist"),
    ):
        failed = runner.invoke(app, args)
        assert failed.exit_code == 2 and failed.output.strip().splitlines()[-1].startswith("error:"), failed.output
        assert fragment in failed.output and "Traceback" not in failed.output
