"""Latency profiling: per-layer graphs in the export's own Q/DQ form, timed on onnxruntime; the table's JSON."""

from __future__ import annotations

import json

import onnx
import pytest

from diffquant.errors import ConfigError
from diffquant.export import profile as profile_mod
from diffquant.export.profile import FLOAT_OPTION, ProfileSettings, layer_graph, profile_onnxruntime, traced_inputs
from diffquant.mixed_precision.allocate import read_latency_table
from diffquant.mixed_precision.latency import LatencyTable, parse_latency_table, read_latency_file
from diffquant.quant.plan import quantizable_layers

OPTIONS = {"w8a8": (8, None, 8), "w4a8": (4, None, 8), "w4g8a8": (4, 8, 8)}
FAST = {"repeats": 2, "warmup": 1, "whole_sample_ms": 0.0}


@pytest.fixture(scope="module")
def table(tiny):
    model, _ = tiny
    return profile_onnxruntime(model, OPTIONS, ProfileSettings(target="onnxruntime", **FAST))


def test_every_layer_and_option_gets_a_positive_time(tiny, table):
    model, _ = tiny
    names = quantizable_layers(model.unet)
    assert set(table.layers) == set(names)
    for name in names:
        row = table.layers[name]
        assert {FLOAT_OPTION, "w8a8", "w4a8"} <= set(row), name
        assert all(ms > 0 for ms in row.values()), (name, row)
    # group-wise options only where the group divides the input channels, as the allocator allows them
    assert "w4g8a8" in table.layers["conv_in"] or model.unet.conv_in.in_channels % 8
    assert "w4g8a8" not in table.layers["conv_in"]  # one input channel
    meta = table.metadata
    assert meta["whole_graph_fp32_ms"] > 0 and meta["runtime"]["name"] == "onnxruntime"
    assert meta["runtime"]["intra_op_num_threads"] == 1 and meta["settings"]["clock"] == "thread"
    assert meta["machine"]["fingerprint"] and meta["settings"]["target"] == "onnxruntime"
    assert table.overhead_ms == pytest.approx(
        meta["whole_graph_fp32_ms"] - sum(row[FLOAT_OPTION] for row in table.layers.values())
    )
    # the uniform correction: a uniform plan is predicted as its whole graph was measured
    for option in ("w8a8", "w4a8"):
        measured = meta["whole_graph_ms"][option]
        assert measured > 0 and table.predict(dict.fromkeys(names, option)) == pytest.approx(measured, rel=1e-6)
        raw = meta["measured_layers"]
        correction = meta["corrections_ms"][option]
        assert all(table.layers[n][option] == pytest.approx(max(0.0, raw[n][option] + correction)) for n in names)


def test_table_round_trips_through_the_allocators_reader(table, tmp_path):
    path = tmp_path / "latency.json"
    path.write_text(json.dumps(table.to_dict()))
    assert read_latency_table(str(path)) == table.layers
    again = read_latency_file(path)
    assert again.overhead_ms == table.overhead_ms and again.metadata["machine"] == table.metadata["machine"]
    choice = {name: "w8a8" for name in table.layers}
    assert again.predict(choice) == pytest.approx(table.overhead_ms + sum(r["w8a8"] for r in table.layers.values()))


def test_plain_shape_still_reads_and_bad_shapes_fail_naming_the_key(tmp_path):
    assert parse_latency_table({"conv_in": {"w8a8": 1}}) == LatencyTable({"conv_in": {"w8a8": 1.0}})
    for bad in ({"conv_in": {"w8a8": "fast"}}, {"conv_in": {"w8a8": -1.0}}, [1, 2], {"conv_in": 3}):
        with pytest.raises(ConfigError, match="latency_table"):
            parse_latency_table(bad)
    with pytest.raises(ConfigError, match="version"):
        parse_latency_table({"format": "diffquant.latency_table", "version": 9, "layers": {}})
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be read as JSON"):
        read_latency_file(broken)


def test_layer_graph_is_the_exports_lowering(tiny, tmp_path):
    model, _ = tiny
    name = "down_blocks.0.resnets.0.conv1"
    x = traced_inputs(model, 2)[name][0]
    path = layer_graph(model, name, (8, None, 8), x, tmp_path / "g.onnx", ProfileSettings(target="onnxruntime"))
    graph = onnx.load(str(path))
    nodes = {n.name: n.op_type for n in graph.graph.node}
    # the onnxruntime form: UINT8 input and output Q/DQ, INT8 weight DQ, INT32 bias DQ around the Conv
    for expected in (
        "layer/input_quantizer/QuantizeLinear",
        "layer/weight_quantizer/DequantizeLinear",
        "layer/bias_quantizer/DequantizeLinear",
        "layer/output_quantizer/QuantizeLinear",
        "layer/Conv",
    ):
        assert expected in nodes, sorted(nodes)
    assert x.shape[0] == 2 and graph.graph.input[0].type.tensor_type.shape.dim[1].dim_value == x.shape[1]
    trt = layer_graph(model, name, (4, None, 8), x, tmp_path / "t.onnx", ProfileSettings(target="tensorrt"))
    names = {n.name for n in onnx.load(str(trt)).graph.node}
    assert "layer/output_quantizer/QuantizeLinear" not in names and "layer/weight_quantizer/DequantizeLinear" in names


def test_tensorrt_skip_reason_when_unavailable(monkeypatch):
    monkeypatch.setattr(profile_mod, "tensorrt_available", lambda: (False, "no CUDA GPU is visible to this process"))
    status = profile_mod.tensorrt_status()
    assert status == {"measured": False, "skip_reason": "no CUDA GPU is visible to this process"}


def test_tensorrt_status_on_this_machine_says_why(table):
    status = table.metadata["tensorrt"]
    assert status["measured"] is False and status["skip_reason"]


def test_bad_settings_name_the_setting(tiny):
    model, _ = tiny
    with pytest.raises(ConfigError, match="batch"):
        profile_onnxruntime(model, OPTIONS, ProfileSettings(batch=0))
    with pytest.raises(ConfigError, match="clock"):
        profile_onnxruntime(model, OPTIONS, ProfileSettings(clock="sundial"))


def test_interleaved_medians_visits_every_callable_each_round():
    calls: list[str] = []
    runs = {key: (lambda key=key: calls.append(key)) for key in "abc"}
    medians = profile_mod.interleaved_medians(runs, warmup=1, repeats=4, sample_ms=0.0, seed=1)
    assert set(medians) == set("abc") and all(ms >= 0 for ms in medians.values())
    timed = calls[6:]  # warmup and the one-call probe of each
    assert [sorted(timed[i : i + 3]) for i in range(0, 12, 3)] == [list("abc")] * 4
    assert len({tuple(timed[i : i + 3]) for i in range(0, 12, 3)}) > 1  # the order changes between rounds
