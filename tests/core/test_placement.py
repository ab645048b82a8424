"""runtime.device / runtime.dtype: resolution, refusals, and quantizers that stay float32 in a half model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import diffquant.placement as placement
from diffquant.errors import ConfigError
from diffquant.quant.formats import IntFormat, fake_quant
from diffquant.quant.modules import QuantLinear
from diffquant.spec import load_spec
from tests.pipeline.conftest import isolated_home  # noqa: F401 (a fixture)
from tests.pipeline.test_cli import assert_clean_failure, invoke


def test_auto_is_the_cpu_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert placement.resolve_device("auto") == torch.device("cpu")
    assert placement.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_refused(name, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=rf"device: {name} asked for, but torch sees no GPU"):
        placement.resolve_device(name)


def test_a_gpu_index_beyond_the_count_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="cuda:1 asked for, but torch sees 1 GPU"):
        placement.resolve_device("cuda:1")


def test_a_half_type_the_cpu_cannot_run_is_refused(monkeypatch):
    monkeypatch.setattr(placement, "_cpu_runs", lambda dtype: False)
    with pytest.raises(ConfigError, match="dtype: float16 does not run on this CPU"):
        placement.resolve_dtype("float16", torch.device("cpu"))
    assert placement.resolve_dtype("float32", torch.device("cpu")) is torch.float32


def test_runtime_values_are_validated_and_stay_out_of_the_spec_hash():
    base = load_spec()
    other = load_spec(overrides=["runtime.device=cpu", "runtime.dtype=bfloat16"])
    assert other.spec_hash() == base.spec_hash()
    for bad in ("runtime.device=tpu", "runtime.device=cuda:x", "runtime.dtype=float8"):
        with pytest.raises(Exception, match="runtime"):
            load_spec(overrides=[bad])


def test_quantizers_stay_float32_and_exact_in_a_bfloat16_model():
    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(16, 8), weight_bits=4, act_bits=8)
    x = torch.randn(32, 16)
    layer.weight_quantizer.calibrate_from(layer.weight)
    layer.input_quantizer.start_observing()
    layer(x)
    layer.input_quantizer.finish_observing()
    placement.place(layer, torch.device("cpu"), torch.bfloat16)
    assert layer.weight.dtype is torch.bfloat16
    assert layer.input_quantizer.scale.dtype is torch.float32 and layer.weight_quantizer.scale.dtype is torch.float32
    xb = x.to(torch.bfloat16)
    got = layer.input_quantizer(xb)
    assert got.dtype is torch.bfloat16
    expected = fake_quant(xb.float(), layer.input_quantizer.scale, IntFormat(8), None).to(torch.bfloat16)
    assert torch.equal(got, expected)


def test_cuda_without_a_gpu_fails_the_command_in_one_line(isolated_home, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = invoke("--set", "runtime.device=cuda", "--out", str(tmp_path / "out"))
    assert_clean_failure(result, "runtime.device: cuda asked for, but torch sees no GPU", isolated_home)
    assert not (tmp_path / "out").exists()


def test_load_model_places_the_denoiser_like_the_runtime_section():
    from diffquant.models.loading import load_model

    model = load_model("digits-unet", device="cpu", dtype="bfloat16")
    assert placement.module_placement(model.unet) == (torch.device("cpu"), torch.bfloat16)
    assert placement.module_placement(load_model("digits-unet").unet) == (torch.device("cpu"), torch.float32)
