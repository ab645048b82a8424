"""`diffquant deploy`: a registered version fetched by alias, verified, bundled; tampering refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffquant.flows.cli import app

runner = CliRunner()


def test_deploy_by_alias_and_refuse_tampered(isolated_home, tmp_path):
    from mlflow.tracking import MlflowClient

    from diffquant.manifest import verify_files
    from tests.registry.test_promotion import register

    isolated_home.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=f"sqlite:///{isolated_home / 'mlflow.db'}")
    first = register(client, tmp_path, 1.2)
    target = tmp_path / "edge" / "digits"
    result = runner.invoke(app, ["deploy", "digits-unet", "--target", str(target)])
    assert result.exit_code == 0, result.output
    manifest = verify_files(target)
    assert manifest["bundle"]["version"] == first["version"] and "plan.json" in manifest["files"]
    assert "no ONNX export" in manifest["bundle"]["engine"]
    # tamper with the stored artifact of version 1: deploying it must be refused, the old bundle kept
    source = Path(client.get_model_version("digits-unet", "1").source.removeprefix("file://"))
    (source / "plan.json").write_text('{"evil": true}')
    result = runner.invoke(app, ["deploy", "digits-unet", "--target", str(target)])
    assert result.exit_code == 2 and "plan.json does not match" in result.output, result.output
    assert verify_files(target)["bundle"]["version"] == "1"
    result = runner.invoke(app, ["deploy", "digits-unet", "--alias", "nope", "--target", str(target)])
    assert result.exit_code == 2 and "cannot find 'digits-unet' @ nope" in result.output, result.output


def test_engine_for_ships_onnx_without_tensorrt_and_uses_a_built_engine(tmp_path, monkeypatch):
    import diffquant.export.tensorrt as trt
    from diffquant.flows.deploy import _engine_for

    (tmp_path / "v" / "onnx").mkdir(parents=True)
    assert _engine_for(tmp_path / "v", tmp_path)[0] is None  # no ONNX at all
    (tmp_path / "v" / "onnx" / "model.onnx").write_bytes(b"onnx")
    engine, reason = _engine_for(tmp_path / "v", tmp_path)
    assert engine is None and "shipped for an on-device build" in reason
    built = tmp_path / "model.engine"
    monkeypatch.setattr(trt, "tensorrt_available", lambda: (True, ""))
    monkeypatch.setattr(
        trt, "build_engine", lambda onnx, path, **kw: trt.EngineResult(built=True, engine_path=Path(path))
    )
    engine, reason = _engine_for(tmp_path / "v", tmp_path)
    assert engine == built and "built" in reason


def test_engine_for_skips_the_onnxruntime_form(tmp_path, monkeypatch):
    import onnx
    from onnx import TensorProto, helper

    import diffquant.export.tensorrt as trt
    from diffquant.export.onnx import TARGET_METADATA_KEY
    from diffquant.flows.deploy import _engine_for

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph)
    model.metadata_props.append(onnx.StringStringEntryProto(key=TARGET_METADATA_KEY, value="onnxruntime"))
    (tmp_path / "v" / "onnx").mkdir(parents=True)
    onnx.save(model, str(tmp_path / "v" / "onnx" / "model.onnx"))
    # even where TensorRT exists, no engine is built from the onnxruntime form
    monkeypatch.setattr(trt, "tensorrt_available", lambda: (True, ""))
    monkeypatch.setattr(trt, "build_engine", lambda *a, **kw: pytest.fail("built an engine from the onnxruntime form"))
    engine, reason = _engine_for(tmp_path / "v", tmp_path)
    assert engine is None and "onnxruntime form" in reason
