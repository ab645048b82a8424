"""The outlier methods through ``diffquant.quantize`` on tiny models: float function, folds, search, save/load, refusals."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

import diffquant
from diffquant.errors import ConfigError, SpecError
from diffquant.outliers.folding import SmoothGroup
from diffquant.outliers.smoothing import group_scales, output_error, trial_layer
from diffquant.outliers.stats import observe_inputs
from diffquant.ptq import load_quantized, save_quantized
from diffquant.quant.modules import FakeQuantizer, QuantizerMode
from diffquant.quant.plan import LayerPlan, SmoothConfig
from diffquant.sampling import denoiser_outputs
from diffquant.spec import (
    ActivationQuantSpec,
    CalibrationSpec,
    CompressionSpec,
    LowRankSpec,
    QuantizeSpec,
    SmoothSpec,
    WeightConfig,
    load_spec,
)
from tests.text_models import text_inputs, tiny_text_model

ATTN = "down_blocks.1.attentions.0"
ALL = QuantizeSpec(
    weight=WeightConfig(4),
    activation=ActivationQuantSpec(bits=8, shift="channel"),
    smooth=SmoothSpec(alpha=0.5),
    low_rank=LowRankSpec(rank=2),
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.conftest import tiny_calibrated

    return tiny_calibrated(tmp_path_factory.mktemp("m"), trajectories=4, steps=4, inputs=12)


def _float_outputs(unet: torch.nn.Module, calib) -> torch.Tensor:
    """Outputs with every quantizer off: the float function the transforms must preserve."""
    unet = copy.deepcopy(unet)
    for module in unet.modules():
        if isinstance(module, FakeQuantizer):
            module.mode = QuantizerMode.OFF
    return denoiser_outputs(unet, calib)


@pytest.fixture(scope="module")
def quantized(tiny):
    model, calib = tiny
    fp = denoiser_outputs(model.unet, calib)
    qmodel = copy.deepcopy(model)
    result = diffquant.quantize(qmodel, ALL, calib, calibration=CalibrationSpec(batch_size=12))
    return fp, qmodel, result


def test_every_method_keeps_the_float_function(tiny, quantized):
    _, calib = tiny
    fp, qmodel, result = quantized
    torch.testing.assert_close(_float_outputs(qmodel.unet, calib), fp, rtol=1e-4, atol=1e-4)
    quantizable = [name for name, cfg in result.plan.items() if cfg.activation is not None]
    assert all(result.plan[name].shift and result.plan[name].smooth is not None for name in quantizable)
    assert all(cfg.low_rank is not None for cfg in result.plan.values() if cfg.weight is not None)


def test_folds_go_to_the_norm_and_the_value_projection_and_residual_folds_are_refused(quantized):
    plan = quantized[2].plan
    for leaf in ("to_q", "to_k", "to_v"):
        assert plan[f"{ATTN}.{leaf}"].smooth.into == f"{ATTN}.group_norm"
    assert plan[f"{ATTN}.to_out.0"].smooth.into == f"{ATTN}.to_v"
    # the downsampler's output also feeds the residual: dividing it by s would change the function
    assert plan["down_blocks.1.resnets.0.conv_shortcut"].smooth.into is None
    assert plan["down_blocks.1.resnets.0.conv1"].smooth.into is None  # after a SiLU: an explicit multiply
    q = quantized[1].unet
    assert q.get_submodule(f"{ATTN}.to_q").input_transform.multiply is False
    assert q.get_submodule("down_blocks.1.resnets.0.conv1").input_transform.multiply is True


def test_saved_model_loads_back_bit_for_bit(tiny, quantized, tmp_path):
    model, calib = tiny
    _, qmodel, result = quantized
    plan_path, scales_path = save_quantized(qmodel, result.plan, tmp_path)
    loaded = load_quantized(model, plan_path, scales_path)
    assert torch.equal(denoiser_outputs(loaded.unet, calib), denoiser_outputs(qmodel.unet, calib))
    for name, param in qmodel.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[name], param), name


def test_shift_helps_w8a4_on_the_tiny_unet(tiny):
    """Not a benchmark: the denoiser output gets closer to float with the shift at 4-bit inputs."""
    model, calib = tiny
    fp = denoiser_outputs(model.unet, calib)
    errors = {}
    for label, config in {
        "naive": QuantizeSpec(activation=ActivationQuantSpec(bits=4)),
        "all": QuantizeSpec(activation=ActivationQuantSpec(bits=4, shift="channel")),
    }.items():
        qmodel = copy.deepcopy(model)
        diffquant.quantize(qmodel, config, calib, calibration=CalibrationSpec(batch_size=12))
        errors[label] = float((denoiser_outputs(qmodel.unet, calib) - fp).pow(2).mean())
    assert errors["all"] < errors["naive"]


def test_alpha_search_keeps_the_best_candidate(tiny):
    model, calib = tiny
    name = "down_blocks.1.resnets.0.conv1"
    config = QuantizeSpec(
        weight=WeightConfig(4),
        activation=ActivationQuantSpec(bits=4),
        smooth=SmoothSpec(layers=[name], search=True, grid=4, fold=False),
    )
    result = diffquant.quantize(copy.deepcopy(model), config, calib, calibration=CalibrationSpec(batch_size=12))
    chosen = result.plan[name].smooth
    # brute force over the same candidates, on the same sampled inputs of the float layer
    run = lambda unet: denoiser_outputs(unet, calib, True, 12)  # noqa: E731
    stats = observe_inputs(model.unet, [name], run, keep_samples=True, seed=0).stats
    layer, cfg = model.unet.get_submodule(name), replace(result.plan[name], smooth=SmoothConfig(0.0))
    plan = LayerPlan({name: cfg})
    errors = {}
    for alpha in (None, 0.0, 0.25, 0.5, 0.75, 1.0):
        scale = None if alpha is None else group_scales(model.unet, plan, SmoothGroup((name,)), stats, alpha)
        errors[alpha] = output_error(layer, trial_layer(layer, cfg, stats[name], scale), stats[name].samples)
    best = min(errors, key=errors.get)
    assert (chosen.alpha if chosen is not None else None) == best
    assert errors[best] < errors[None]  # at W4A4 some smoothing beats none on this layer


def test_bad_settings_fail_in_one_line(tiny):
    model, calib = tiny
    with pytest.raises(ConfigError, match=r"low_rank\.rank: rank 64 is larger than min\(out, in\)"):
        diffquant.quantize(copy.deepcopy(model), ALL.model_copy(update={"low_rank": LowRankSpec(rank=64)}), calib)
    with pytest.raises(ConfigError, match=r"smooth\.layers: pattern 'nope' matches no"):
        diffquant.quantize(copy.deepcopy(model), ALL.model_copy(update={"smooth": SmoothSpec(layers=["nope"])}), calib)
    gptq = ALL.model_copy(update={"weight": WeightConfig(4, rounding="gptq")})
    with pytest.raises(ConfigError, match=r"weight\.rounding: gptq cannot be combined"):
        diffquant.quantize(copy.deepcopy(model), gptq, calib)
    with pytest.raises(SpecError, match=r"quantize\.smooth\.alpha"):
        load_spec(overrides=["quantize.smooth={alpha: 1.5}"])


def test_defaults_leave_the_spec_hash_alone():
    data = CompressionSpec().to_dict()
    assert "shift" not in data["quantize"]["activation"]
    assert "smooth" not in data["quantize"] and "low_rank" not in data["quantize"]
    on = load_spec(overrides=["quantize.activation.shift=channel", "quantize.smooth={}", "quantize.low_rank={rank: 8}"])
    assert on.quantize.smooth == SmoothSpec() and on.quantize.low_rank.rank == 8
    assert on.spec_hash() != CompressionSpec().spec_hash()
    assert load_spec(overrides=["quantize.activation.shift=none"]).spec_hash() == CompressionSpec().spec_hash()


def test_text_model_smooths_around_outlier_tokens():
    """BOS-aware layers skip the BOS rows in their statistics; folds into the encoder's norm keep the function."""
    model = tiny_text_model(bos_scale=50.0)
    inputs = text_inputs(model, n=24)
    fp = denoiser_outputs(model.unet, inputs)
    config = QuantizeSpec(activation=ActivationQuantSpec(bits=8, shift="channel"), smooth=SmoothSpec())
    result = diffquant.quantize(model, config, inputs, calibration=CalibrationSpec(batch_size=24))
    assert result.outlier_tokens.count == 1
    torch.testing.assert_close(_float_outputs(model.unet, inputs), fp, rtol=1e-4, atol=1e-4)
    kv = [n for n, c in result.plan.items() if c.fp_tokens]
    assert kv and all(result.plan[n].smooth is not None for n in kv)
    into = {name: cfg.smooth.into for name, cfg in result.plan.items() if cfg.smooth is not None}
    assert all(into[name] == "text_encoder.final_layer_norm" for name in kv)  # the keys/values read the encoder states
