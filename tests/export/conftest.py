"""A tiny class-conditional UNet with a calibration set, and quantized exports of it."""

from __future__ import annotations

import pytest

from diffquant.ptq import quantize_model
from diffquant.quant.modules import groups_allowed
from diffquant.quant.plan import ActivationConfig, LayerConfig, LayerPlan, WeightConfig, quantizable_layers
from diffquant.spec import CalibrationSpec


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    from tests.conftest import tiny_calibrated

    return tiny_calibrated(tmp_path_factory.mktemp("m"), trajectories=4, steps=4, inputs=12)


def build_plan(model, weight: WeightConfig | None, act_bits: int | None, fp=(), per_layer=None) -> LayerPlan:
    """Uniform plan; group-wise layers that cannot take the groups fall back to per-channel."""
    plan = LayerPlan()
    for name in quantizable_layers(model.unet):
        w = weight
        if w is not None and w.group_size and not groups_allowed(model.unet.get_submodule(name), w.group_size):
            w = WeightConfig(w.bits, "per_channel", w.observer)
        cfg = LayerConfig(w, ActivationConfig(act_bits) if act_bits else None)
        if name in fp:
            cfg = LayerConfig(None, None)
        if per_layer and name in per_layer:
            cfg = per_layer[name]
        plan[name] = cfg
    return plan


def quantize(model, calib, plan):
    return quantize_model(model, plan, calib, CalibrationSpec())
