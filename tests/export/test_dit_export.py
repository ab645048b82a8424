"""Export of a DiT: Linear-heavy, and its output layer calls block 0's timestep embedder again."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from diffquant.export.onnx import export_onnx, onnx_weight_bytes
from diffquant.export.parity import check_parity
from diffquant.export.rules import check_rules
from diffquant.models.loading import DiffusionModel
from diffquant.models.reference import SCHEDULER_CONFIG
from diffquant.ptq import quantize_model
from diffquant.quant.modules import groups_allowed
from diffquant.quant.plan import ActivationConfig, LayerConfig, WeightConfig, uniform_plan
from diffquant.sampling import Trajectories
from diffquant.spec import CalibrationSpec


def tiny_dit() -> DiffusionModel:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=1,
        out_channels=1,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=32,
    )
    return DiffusionModel(
        "tiny-dit",
        dit.eval().requires_grad_(False),
        dict(SCHEDULER_CONFIG),
        Path("."),
        "-",
        10,
        (1, 8, 8),
        family="dit",
    )


@pytest.mark.parametrize("weight", [WeightConfig(8), WeightConfig(4, "per_group", group_size=16)])
def test_dit_export_with_a_layer_called_twice(tmp_path, weight):
    model = tiny_dit()
    generator = torch.Generator().manual_seed(0)
    inputs = Trajectories(
        torch.randn(24, 1, 8, 8, generator=generator),
        torch.randint(0, 1000, (24,), generator=generator),
        torch.arange(24) % 10,
    )
    plan = uniform_plan(model.unet, weight, ActivationConfig(8))
    for name, cfg in plan.items():  # the 1-channel patch embedding cannot take groups
        if weight.group_size and not groups_allowed(model.unet.get_submodule(name), weight.group_size):
            plan[name] = LayerConfig(WeightConfig(weight.bits), cfg.activation)
    reused = "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"
    assert plan[reused].weight is not None
    quantized = quantize_model(model, plan, inputs, CalibrationSpec(batch_size=64))
    info = export_onnx(quantized, plan, tmp_path / "dit.onnx")
    proto = onnx.load(str(info.path))
    names = [node.name for node in proto.graph.node]
    assert len(names) == len(set(names))
    assert f"{reused}/MatMul" in names and f"{reused}/MatMul_1" in names
    assert sum(t.name == f"{reused}.weight_quantized" for t in proto.graph.initializer) == 1
    assert not any(t.name.endswith("linear_1.weight") for t in proto.graph.initializer)  # no float copy left
    assert check_rules(info.path, plan) == []
    report = check_parity(info.path, quantized, inputs)
    assert report.passed, report.failures()
    assert onnx_weight_bytes(info.path) > 0
