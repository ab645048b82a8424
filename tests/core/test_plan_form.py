"""Sensitivity is measured in the form the final plan takes, and allocated plans keep the family's float layers.

Oracles: a sensitivity row equals the SQNR of the real quantization path (:func:`diffquant.ptq.apply_and_calibrate`,
what ``diffquant.quantize`` runs) applied to a plan with only that layer quantized, for BOS-aware layers (outlier
tokens served in float) and for GPTQ-rounded weights; an allocated GPTQ plan installs exactly the weights GPTQ
computes from the float model.
"""

import copy

import pytest
import torch

from diffquant.calibration.pool import collect_pool
from diffquant.metrics import sqnr_db
from diffquant.mixed_precision.allocate import allocate_plan, measure_allocation_sensitivity
from diffquant.mixed_precision.sensitivity import SensitivityTable
from diffquant.outlier_tokens import apply_outlier_tokens, detect_outlier_tokens
from diffquant.ptq import apply_and_calibrate, auto_quantize, plan_from_spec
from diffquant.quant.gptq import gptq_solve
from diffquant.quant.plan import ActivationConfig, LayerConfig, LayerPlan, WeightConfig, quantizable_layers
from diffquant.sampling import denoiser_outputs
from diffquant.spec import AllocationSpec, CalibrationSpec, QuantizeSpec
from tests.text_models import text_inputs, tiny_text_model

CALIBRATION = CalibrationSpec(size=12, trajectories=4)
NO_CONTENT = {"content_layers": [], "group_sizes": []}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.conftest import tiny_calibrated

    return tiny_calibrated(tmp_path_factory.mktemp("m"), trajectories=4, steps=4, inputs=12)


def _made_up_table(names):
    """A sensitivity table where fewer bits cost more noise (the allocation tests need no measurement)."""
    rows = [{"layer": n, "kind": "weight", "bits": b, "noise": 2.0**-b} for n in names for b in (2, 4, 8)]
    return SensitivityTable(rows + [{"layer": n, "kind": "activation", "bits": 8, "noise": 1e-3} for n in names])


def _one_layer_sqnr(model, layer, cfg, calib, reference, outliers=None):
    """SQNR of the model with only ``layer`` quantized as ``cfg``, through the real quantization path."""
    plan = LayerPlan({name: LayerConfig(None, None) for name in quantizable_layers(model.unet)})
    plan[layer] = cfg
    if outliers is not None:
        plan = apply_outlier_tokens(plan, outliers)
    unet = copy.deepcopy(model.unet)
    apply_and_calibrate(unet, plan, calib, model.conditional, CALIBRATION)
    return sqnr_db(reference, denoiser_outputs(unet, calib, model.conditional))


def test_bos_aware_rows_measure_what_the_final_plan_runs():
    model = tiny_text_model(bos_scale=60.0)
    calib = text_inputs(model, 40)
    found = detect_outlier_tokens(model, calib.labels)
    assert found.count == 1 and found.layers
    layer = found.layers[0]  # a cross-attention key/value projection: it reads the BOS outlier
    config = AllocationSpec(weight_bits=[8], activation_bits=[8], sensitivity_inputs=40, **NO_CONTENT)
    rows = {}
    for mode in ("auto", "off"):
        table = measure_allocation_sensitivity(model, calib, config, layers=[layer], outlier_tokens=mode)
        rows[mode] = next(r["sqnr_db"] for r in table.rows if r["kind"] == "activation")
    reference = denoiser_outputs(model.unet, calib)
    final = _one_layer_sqnr(model, layer, LayerConfig(None, ActivationConfig(8)), calib, reference, found)
    assert rows["auto"] == pytest.approx(final, rel=1e-6)
    assert rows["auto"] > rows["off"] + 10.0  # without the BOS handling the row measures another (worse) layer


def test_gptq_rows_equal_the_final_gptq_layer_and_share_one_hessian_pass(tiny):
    model, calib = tiny
    names = quantizable_layers(model.unet)
    conv = "down_blocks.1.resnets.0.conv1"
    linear = next(n for n in names if n.endswith("attentions.0.to_q"))
    config = AllocationSpec(weight_bits=[2], group_bits=[4], group_sizes=[8], content_layers=[])
    calls = []
    handle = model.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        counts = {}
        tables = {}
        for rounding in ("nearest", "gptq"):
            calls.clear()
            tables[rounding] = measure_allocation_sensitivity(
                model, calib, config, layers=[conv, linear], weight_rounding=rounding
            )
            counts[rounding] = len(calls)
    finally:
        handle.remove()
    assert counts["gptq"] == counts["nearest"] + 1  # one calibration pass (one batch) for every option's Hessian
    reference = denoiser_outputs(model.unet, calib)
    for row in tables["gptq"].rows:
        if row["kind"] != "weight":
            continue
        group = row["group_size"]
        cfg = WeightConfig(row["bits"], "per_group" if group else "per_channel", group_size=group, rounding="gptq")
        assert row["sqnr_db"] == pytest.approx(
            _one_layer_sqnr(model, row["layer"], LayerConfig(cfg, None), calib, reference), rel=1e-9
        )
        assert row["sqnr_db"] != tables["nearest"].noise(row["layer"], "weight", row["bits"], group)
    two_bits = [tables[r].noise(n, "weight", 2) for r in ("nearest", "gptq") for n in (conv, linear)]
    assert sum(two_bits[2:]) < sum(two_bits[:2])  # GPTQ lowers the 2-bit noise


def test_allocated_gptq_plan_is_applied_with_gptq_and_fine_tunes(tiny, tmp_path):
    from diffquant.finetuning.policy import finetune
    from diffquant.ptq import load_quantized, save_quantized
    from diffquant.spec import FinetuneSpec

    model, calib = tiny
    config = AllocationSpec(weight_bits=[2, 4, 8], budget={"avg_weight_bits": 4.0}, **NO_CONTENT)
    quantize = QuantizeSpec(weight=WeightConfig(8, rounding="gptq"))
    student = copy.deepcopy(model)
    table = _made_up_table(quantizable_layers(model.unet))
    result = auto_quantize(student, config, calib, quantize_config=quantize, calibration=CALIBRATION, sensitivity=table)
    quantized = result.plan.quantized_layers()
    assert quantized and all(result.plan[n].weight.rounding == "gptq" for n in quantized)
    expected = gptq_solve(model.unet, result.plan, lambda m: denoiser_outputs(m, calib, True, CALIBRATION.batch_size))
    for name in quantized:
        assert torch.equal(student.unet.get_submodule(name).weight, expected[name][0]), name
    plan_path, scales_path = save_quantized(student, result.plan, tmp_path)
    reloaded = load_quantized(model, plan_path, scales_path)
    assert torch.equal(denoiser_outputs(reloaded.unet, calib), denoiser_outputs(student.unet, calib))
    pool = collect_pool(model, trajectories=2, steps=4, seed=1)
    tuned = finetune(reloaded, model, FinetuneSpec(steps=2, batch_size=4, checkpoint_every=10), pool)
    assert tuned.steps == 2
    assert any(not torch.equal(reloaded.unet.get_submodule(n).weight, expected[n][0]) for n in quantized)
    plan_path, scales_path = save_quantized(reloaded, result.plan, tmp_path / "tuned")  # merged GPTQ weights saved
    again = load_quantized(model, plan_path, scales_path)
    assert torch.equal(denoiser_outputs(again.unet, calib), denoiser_outputs(reloaded.unet, calib))


def test_allocated_plans_keep_the_family_full_precision_layers_in_float(tiny):
    model, calib = tiny
    names = quantizable_layers(model.unet)
    family = {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"}
    config = AllocationSpec(weight_bits=[2, 4, 8], budget={"avg_weight_bits": 6.0}, **NO_CONTENT)
    table = _made_up_table(names)
    plan, result = allocate_plan(model, calib, config, table)
    kept = {n for n, cfg in plan.items() if cfg.is_full_precision}
    assert kept == family == {n for n, o in result.choice.items() if o == "wfpafp"}
    uniform = plan_from_spec(model, QuantizeSpec(weight=WeightConfig(4)))
    assert kept == {n for n, cfg in uniform.items() if cfg.is_full_precision}  # mixed and uniform: like for like
    numel = {n: model.unet.get_submodule(n).weight.numel() for n in names}
    bits = {n: 32 if n in family else plan[n].weight.bits for n in names}
    assert result.usage["avg_weight_bits"] == pytest.approx(
        sum(bits[n] * numel[n] for n in names) / sum(numel.values())
    )

    free, _ = allocate_plan(model, calib, config.model_copy(update={"quantize_family_fp_layers": True}), table)
    assert not any(cfg.is_full_precision for cfg in free.values())
    pinned, _ = allocate_plan(model, calib, config.model_copy(update={"pinned": {"conv_out": "w8a8"}}), table)
    assert pinned["conv_out"].weight.bits == 8  # a pin of the user's wins over the family's float
    assert {n for n, cfg in pinned.items() if cfg.is_full_precision} == family - {"conv_out"}
