"""The profile flow and command: a cached latency table logged to MLflow, and bad input -> one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffquant.flows.cli import app
from diffquant.mixed_precision.allocate import read_latency_table
from diffquant.mixed_precision.latency import read_latency_file
from diffquant.quant.plan import quantizable_layers
from tests.conftest import save_tiny_unet
from tests.pipeline.conftest import mlflow_runs

runner = CliRunner()
ALLOCATION = "allocation={weight_bits: [8], group_bits: [], activation_bits: [8]}"
FAST = ["--repeats", "2", "--warmup", "1"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_unet(tmp_path_factory.mktemp("profile") / "tiny-unet")


def profile(*args: str):
    return runner.invoke(app, ["profile", *args])


def test_profile_cli_writes_the_table_caches_it_and_logs_it(isolated_home, tiny_dir, tmp_path):
    out = tmp_path / "latency.json"
    args = ["--set", f"model={{path: '{tiny_dir}'}}", "--set", ALLOCATION, *FAST, "--out", str(out)]
    first = profile(*args)
    assert first.exit_code == 0, first.output
    assert Path(first.stdout.strip().splitlines()[-1]) == out
    table = read_latency_file(out)
    from diffquant.models.loading import load_local_model

    names = quantizable_layers(load_local_model(tiny_dir).unet)
    assert set(read_latency_table(str(out))) == set(names)
    assert all(row["w8a8"] > 0 and row["wfpafp"] > 0 for row in table.layers.values())
    assert table.metadata["settings"]["batch"] == 1 and table.metadata["options"] == ["w8a8"]
    assert "TensorRT:" in first.output and "(cached)" not in first.output

    second = profile(*args)
    assert second.exit_code == 0, second.output
    assert "(cached)" in second.output
    assert json.loads(out.read_text()) == table.to_dict()  # the same measurement, not a new one
    runs = [r for r in mlflow_runs(isolated_home) if r.info.run_name.startswith("profile-")]
    assert [r.data.tags["cache_hit"] for r in sorted(runs, key=lambda r: r.info.start_time)] == ["false", "true"]
    params = runs[0].data.params
    assert params["runtime"] == "onnxruntime" and params["runtime.version"] and params["machine.cpu"]
    assert params["profile.batch"] == "1" and params["machine.fingerprint"] == table.metadata["machine"]["fingerprint"]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_cache_key_covers_model_options_runtime_machine_and_settings():
    from diffquant.export.profile import ProfileSettings
    from diffquant.spec import ModelSource
    from diffquant.tasks.latency import ProfileRequest

    base = {
        "model": ModelSource(name="digits-unet"),
        "weights_sha256": "a" * 64,
        "options": {"w8a8": [8, None, 8]},
        "runtime": "onnxruntime",
        "runtime_version": "1.32.0",
        "machine": "f" * 16,
        "settings": ProfileSettings().to_dict(),
    }
    key = ProfileRequest(**base).key()
    assert ProfileRequest(**base).key() == key
    changes = {
        "weights_sha256": "b" * 64,
        "options": {"w4a8": [4, None, 8]},
        "runtime_version": "1.33.0",
        "machine": "e" * 16,
        "settings": ProfileSettings(batch=2).to_dict(),
    }
    for field, value in changes.items():
        assert ProfileRequest(**{**base, field: value}).key() != key, field


def assert_one_line(result, fragment: str) -> None:
    output = result.output.strip()
    assert result.exit_code == 2, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and output.splitlines()[-1] == errors[0], output
    assert fragment in errors[0], output


def test_profile_without_allocation_is_one_line(isolated_home):
    assert_one_line(profile(), "no 'allocation' section")


def test_profile_tensorrt_here_says_why_not(isolated_home):
    assert_one_line(profile("--set", ALLOCATION, "--runtime", "tensorrt"), "--runtime tensorrt")
    assert_one_line(profile("--set", ALLOCATION, "--runtime", "tflite"), "--runtime must be one of")


def test_compress_with_a_table_missing_a_layer_is_one_line(isolated_home, tiny_dir, tmp_path):
    from diffquant.models.loading import load_local_model

    names = quantizable_layers(load_local_model(tiny_dir).unet)
    table = tmp_path / "latency.json"
    table.write_text(json.dumps({name: {"w8a8": 1.0} for name in names[1:]}))
    result = runner.invoke(
        app,
        [
            "compress",
            "--set",
            f"model={{path: '{tiny_dir}'}}",
            "--set",
            f"allocation={{weight_bits: [8], group_bits: [], budget: {{latency_ms: 100}}, latency_table: '{table}'}}",
        ],
    )
    assert_one_line(result, f"allocation.latency_table: layer '{names[0]}' is not in {table}")
