"""TensorRT engine build: the skip path and the cache-key / manifest helpers run everywhere."""

from __future__ import annotations

import builtins
import json

import pytest

from diffquant.errors import ExportError
from diffquant.export import tensorrt as trt_export
from diffquant.export.onnx import export_onnx
from diffquant.quant.plan import WeightConfig
from tests.export.conftest import build_plan, quantize

ORIN = trt_export.DeviceInfo("Orin (nvgpu)", (8, 7), "12.6", "10.3.0")


def test_cache_key_separates_device_software_and_level(tmp_path):
    keys = {
        ORIN.cache_key(3),
        ORIN.cache_key(5),
        trt_export.DeviceInfo("Orin (nvgpu)", (8, 7), "12.6", "10.7.0").cache_key(3),
        trt_export.DeviceInfo("Orin (nvgpu)", (8, 7), "12.8", "10.3.0").cache_key(3),
        trt_export.DeviceInfo("NVIDIA GeForce RTX 4090", (8, 9), "12.6", "10.3.0").cache_key(3),
    }
    assert len(keys) == 5
    path = trt_export.timing_cache_path(tmp_path, ORIN, 3)
    assert path.parent == tmp_path and path.name.startswith("timing_orin-nvgpu_sm87_trt10.3.0_opt3_")
    assert path == trt_export.timing_cache_path(tmp_path, ORIN, 3)


def test_skip_reason_without_tensorrt(monkeypatch, tmp_path):
    real_find_spec = trt_export.importlib.util.find_spec
    monkeypatch.setattr(
        trt_export.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorrt" else real_find_spec(name, *a),
    )
    available, reason = trt_export.tensorrt_available()
    assert not available and "not installed" in reason
    result = trt_export.build_engine(tmp_path / "missing.onnx", tmp_path / "m.engine")
    assert not result.built and result.skip_reason == reason and not (tmp_path / "m.engine").exists()
    assert result.to_dict()["built"] is False


def test_skip_reason_without_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(trt_export.importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert trt_export.tensorrt_available() == (False, "no CUDA GPU is visible to this process")


def test_broken_tensorrt_install_is_a_skip(monkeypatch):
    import torch

    monkeypatch.setattr(trt_export.importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "tensorrt":
            raise OSError("libnvinfer.so.10: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    available, reason = trt_export.tensorrt_available()
    assert not available and "libnvinfer" in reason


def test_profile_shapes_and_manifest(tiny, tmp_path):
    model, calib = tiny
    plan = build_plan(model, WeightConfig(4), 8)
    onnx_path = export_onnx(quantize(model, calib, plan), plan, tmp_path / "m.onnx").path
    inputs = trt_export.onnx_input_shapes(onnx_path)
    assert inputs == {"sample": ["batch", 1, 8, 8], "timestep": ["batch"], "class_labels": ["batch"]}
    shapes = trt_export.profile_shapes(inputs, 1, 8, 32)
    assert shapes["sample"] == ((1, 1, 8, 8), (8, 1, 8, 8), (32, 1, 8, 8)) and shapes["timestep"] == ((1,), (8,), (32,))
    with pytest.raises(ExportError, match="min <= opt <= max"):
        trt_export.profile_shapes(inputs, 8, 4, 32)
    assert trt_export.graph_precisions(onnx_path) == ["fp32", "int4", "int8"]

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not really an engine")
    manifest = trt_export.build_manifest(engine, onnx_path, ORIN, shapes, ["fp32", "int8"], 3, 1.5)
    json.dumps(manifest)
    assert manifest["compute_capability"] == "8.7" and manifest["tensorrt_version"] == "10.3.0"
    assert manifest["engine"]["sha256"] != manifest["onnx"]["sha256"] and len(manifest["onnx"]["sha256"]) == 64
    assert manifest["input_shapes"]["sample"]["max"] == (32, 1, 8, 8)


@pytest.mark.trt
@pytest.mark.gpu
def test_build_real_engine(tiny, tmp_path):
    available, reason = trt_export.tensorrt_available()
    if not available:
        pytest.skip(reason)
    model, calib = tiny
    plan = build_plan(model, WeightConfig(8), 8)
    onnx_path = export_onnx(quantize(model, calib, plan), plan, tmp_path / "m.onnx").path
    result = trt_export.build_engine(
        onnx_path, tmp_path / "m.engine", max_batch=16, timing_cache_dir=tmp_path / "cache"
    )
    assert result.built and result.engine_path.stat().st_size > 0
    manifest = trt_export.read_manifest(result.manifest_path)
    assert "int8" in manifest["precisions"] and manifest["input_shapes"]["sample"]["max"][0] == 16
    assert list((tmp_path / "cache").glob("timing_*.cache"))
    # a second build reuses the timing cache
    again = trt_export.build_engine(
        onnx_path, tmp_path / "m2.engine", max_batch=16, timing_cache_dir=tmp_path / "cache"
    )
    assert again.built
