"""Quantized fine-tuning: LSQ gradients, QALoRA merge, selective layers, distillation with resume."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffquant.finetuning.distill import distill, select_layers
from diffquant.quant.formats import IntFormat, fake_quant
from diffquant.quant.lsq import lsq_fake_quant
from diffquant.quant.modules import QuantLinear
from diffquant.spec import FinetuneSpec


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 8), st.floats(0.01, 2.0), st.integers(0, 1000))
def test_lsq_forward_equals_fake_quant_and_gradients_follow_lsq(bits, s, seed):
    torch.manual_seed(seed)
    fmt = IntFormat(bits)
    x = (torch.randn(64) * 3).requires_grad_(True)
    step = torch.tensor(s, requires_grad=True)
    out = lsq_fake_quant(x, step, fmt, x.numel())
    assert torch.equal(out.detach(), fake_quant(x.detach(), torch.tensor(s), fmt))
    out.sum().backward()
    v = x.detach() / s
    inside = (v >= fmt.qmin) & (v <= fmt.qmax)
    assert torch.equal(x.grad, inside.float())
    # LSQ: d/ds = round(v) - v inside, qmin / qmax outside, times 1 / sqrt(N * qmax)
    expected = torch.where(inside, v.round() - v, torch.where(v < fmt.qmin, float(fmt.qmin), float(fmt.qmax)))
    g = 1 / (x.numel() * fmt.qmax) ** 0.5
    assert step.grad.item() == pytest.approx(float(expected.sum()) * g, rel=1e-4, abs=1e-6)


def test_adapter_merge_is_bit_identical():
    torch.manual_seed(0)
    layer = QuantLinear.from_float(torch.nn.Linear(32, 8), 4, None, group_size=16)
    layer.add_adapter(rank=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 32)
    with torch.no_grad():
        before = layer(x)
        assert not torch.equal(before, torch.nn.functional.linear(x, layer.weight_quantizer(layer.weight), layer.bias))
        layer.merge_adapter()
        assert not layer.has_adapter()
        assert torch.equal(layer(x), before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from diffquant.calibration.pool import collect_pool, subset
    from diffquant.calibration.selection import select
    from diffquant.models.loading import load_local_model
    from diffquant.ptq import quantize_model
    from diffquant.quant.plan import ActivationConfig, WeightConfig, uniform_plan
    from diffquant.spec import CalibrationSpec
    from tests.conftest import save_tiny_unet

    model = load_local_model(save_tiny_unet(tmp_path_factory.mktemp("m") / "u"))
    model.num_classes = 10
    pool = collect_pool(model, trajectories=4, steps=4, seed=0)
    plan = uniform_plan(model.unet, WeightConfig(3), ActivationConfig(4))
    quantized = quantize_model(model, plan, subset(pool, select(pool, "random", 16, 0)), CalibrationSpec())
    return model, quantized, pool


def test_select_layers_rules(tiny):
    _, quantized, _ = tiny
    unet = quantized.unet
    everything = select_layers(unet)
    assert select_layers(unet, "time_embedding") == [n for n in everything if "time_emb" in n]
    assert all(".attentions." in f".{n}." for n in select_layers(unet, "attention"))
    sensitivity = {n: float(i) for i, n in enumerate(everything)}
    assert select_layers(unet, "top_k", sensitivity=sensitivity, top_k=2) == everything[-2:]
    assert "conv_in" in select_layers(unet, "top_k", ["conv_in"], sensitivity, 1)
    with pytest.raises(ValueError, match="needs a sensitivity"):
        select_layers(unet, "top_k")
    with pytest.raises(ValueError, match="unknown trainable rule"):
        select_layers(unet, "best")


def _params(unet):
    return {k: v.clone() for k, v in unet.state_dict().items()}


def test_distillation_lowers_loss_and_resume_matches_uninterrupted(tiny, tmp_path):
    model, quantized, pool = tiny
    cfg = FinetuneSpec(steps=6, batch_size=8, lr=1e-2, rank=2, checkpoint_every=2, seed=3)
    layers = select_layers(quantized.unet)

    straight = copy.deepcopy(quantized.unet)
    result = distill(straight, model.unet, pool, True, layers, cfg, tmp_path / "a")
    assert result.resumed_from == 0 and result.trainable_parameters > 0
    assert not any(isinstance(m, QuantLinear) and m.has_adapter() for m in straight.modules())

    class KilledError(Exception):
        pass

    def kill_after_three(step, loss, lr):
        if step == 3:
            raise KilledError

    interrupted = copy.deepcopy(quantized.unet)
    with pytest.raises(KilledError):
        distill(interrupted, model.unet, pool, True, layers, cfg, tmp_path / "b", on_log=kill_after_three, log_every=1)
    resumed = copy.deepcopy(quantized.unet)
    again = distill(resumed, model.unet, pool, True, layers, cfg, tmp_path / "b", log_every=1)
    assert again.resumed_from == 2
    final, expected = _params(resumed), _params(straight)
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in final)

    longer = copy.deepcopy(quantized.unet)
    trained = distill(
        longer, model.unet, pool, True, layers, FinetuneSpec(steps=24, batch_size=16, lr=3e-3, seed=1), tmp_path / "c"
    )
    first = sum(loss for _, loss in trained.losses[:5]) / 5
    last = sum(loss for _, loss in trained.losses[-5:]) / 5
    assert last < first


def test_learned_scales_stay_positive_under_a_huge_learning_rate(tiny, tmp_path):
    model, quantized, pool = tiny
    student = copy.deepcopy(quantized.unet)
    cfg = FinetuneSpec(steps=4, batch_size=8, lr=1e-2, scale_lr=10.0, checkpoint_every=4)
    distill(student, model.unet, pool, True, select_layers(student), cfg, tmp_path)
    scales = [v for k, v in student.state_dict().items() if k.endswith("_quantizer.scale")]
    assert scales and all(bool((s > 0).all() and torch.isfinite(s).all()) for s in scales)


def test_a_truncated_checkpoint_is_ignored_and_training_starts_again(tiny, tmp_path):
    """A checkpoint that no longer matches its recorded sha256 is not resumed from (nor crashes the run)."""
    model, quantized, pool = tiny
    cfg = FinetuneSpec(steps=4, batch_size=8, lr=1e-2, rank=2, checkpoint_every=2, seed=3)
    layers = select_layers(quantized.unet)
    first = copy.deepcopy(quantized.unet)
    distill(first, model.unet, pool, True, layers, cfg, tmp_path / "c")
    import json

    state = Path(json.loads((tmp_path / "c" / "latest.json").read_text())["path"])
    state.write_bytes(state.read_bytes()[:100])
    again = distill(copy.deepcopy(quantized.unet), model.unet, pool, True, layers, cfg, tmp_path / "c")
    assert again.resumed_from == 0 and again.steps == 4
