"""Sensitivity measurement, costs and the mixed-precision plan on small models."""

import pytest
import torch
from torch import nn

from diffquant.errors import ConfigError
from diffquant.mixed_precision.allocate import allocate_plan, measure_allocation_sensitivity
from diffquant.mixed_precision.costs import layer_macs, qkv_groups
from diffquant.mixed_precision.sensitivity import SensitivityTable, measure_sensitivity, noise_power, quantize_only
from diffquant.mixed_precision.solver import AllocationInfeasibleError
from diffquant.models.loading import load_model
from diffquant.ptq import weight_observer
from diffquant.quant.modules import QuantConv2d
from diffquant.quant.plan import quantizable_layers
from diffquant.spec import load_spec


def _sens(model, calib, spec, classifier=None, layers=None):
    """The sensitivity table the spec's allocation needs (as the pipeline measures it)."""
    return measure_allocation_sensitivity(
        model,
        calib,
        spec.allocation,
        weight_observer=weight_observer(spec.quantize),
        activation_observer=spec.calibration.observer,
        steps=spec.sampler.steps,
        seed=spec.evaluate.seed,
        classifier=classifier,
        layers=layers,
    )


def _alloc(model, calib, spec, table):
    return allocate_plan(
        model,
        calib,
        spec.allocation,
        table,
        weight_observer=weight_observer(spec.quantize),
        activation_observer=spec.calibration.observer,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.conftest import tiny_calibrated

    return tiny_calibrated(tmp_path_factory.mktemp("m"), trajectories=4, steps=4, inputs=12)


def test_quantize_only_always_restores(tiny):
    model, calib = tiny
    original = model.unet.conv_in
    with quantize_only(model.unet, "conv_in", 4, 8, calib) as layer:
        assert isinstance(model.unet.conv_in, QuantConv2d) and layer.input_quantizer is not None
    assert model.unet.conv_in is original
    with pytest.raises(RuntimeError), quantize_only(model.unet, "conv_in", 4, None):
        raise RuntimeError("boom")
    assert model.unet.conv_in is original


def test_fewer_bits_more_noise(tiny):
    model, calib = tiny
    layers = quantizable_layers(model.unet)[:6]
    table = measure_sensitivity(model.unet, calib, True, [2, 4, 8], [4, 8], layers)
    assert len(table.rows) == 6 * 5
    for layer in layers:
        w = [table.noise(layer, "weight", b) for b in (2, 4, 8)]
        assert w[0] >= w[1] >= w[2] >= 0
        assert table.noise(layer, "activation", 4) >= table.noise(layer, "activation", 8)
        assert table.noise(layer, "weight", None) == 0.0


def test_table_csv_round_trip(tmp_path):
    row = {"layer": "a", "kind": "weight", "bits": 4, "sqnr_db": 20.0, "noise": 0.01, "rank": 0, "format": "int"}
    table = SensitivityTable(
        [
            {**row, "group_size": None, "content": None, "psnr_db": None},
            {**row, "group_size": 32, "content": 0.5, "psnr_db": float("inf")},
        ]
    )
    loaded = SensitivityTable.load_csv(table.save_csv(tmp_path / "s.csv"))
    assert loaded.rows == table.rows
    assert loaded.content("a", "weight", 4, 32) == 0.5 and loaded.noise("a", "weight", 4, 32, "psnr") == 0.0
    with pytest.raises(KeyError, match="no final-sample PSNR"):
        loaded.noise("a", "weight", 4, None, "psnr")
    with pytest.raises(KeyError, match="groups of 64"):
        loaded.noise("a", "weight", 4, 64)
    assert noise_power(20.0) == pytest.approx(0.01)
    old = tmp_path / "old.csv"
    old.write_text("layer,kind,bits,sqnr_db,noise,content\na,weight,4,20,0.01,\n")
    with pytest.raises(ValueError, match="missing group_size"):
        SensitivityTable.load_csv(old)


def test_layer_macs_oracle():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)
            self.lin = nn.Linear(4, 5)

        def forward(self, x, t, class_labels=None):
            return self.lin(self.conv(x).reshape(x.shape[0], -1, 4))

    macs = layer_macs(Net(), (torch.zeros(7, 2, 4, 4), torch.zeros(7), None))
    assert macs == {"conv": 4 * 4 * 3 * 2 * 9, "lin": 12 * 4 * 5}


def test_qkv_groups():
    names = ["a.to_q", "a.to_k", "a.to_v", "a.to_out.0", "b.conv"]
    assert qkv_groups(names) == [["a.to_q", "a.to_k", "a.to_v"]]


def test_allocation_meets_budget_and_builds_plan(tiny):
    model, calib = tiny
    spec = load_spec(
        overrides=[
            "allocation={weight_bits: [2, 4, 8], budget: {avg_weight_bits: 4.0}, content_layers: [], "
            "quantize_family_fp_layers: true}",
            "allocation.pinned={conv_in: w8a8}",
        ]
    )
    table = _sens(model, calib, spec, None)
    plan, result = _alloc(model, calib, spec, table)
    assert result.usage["avg_weight_bits"] <= 4.0 + 1e-6
    assert plan["conv_in"].weight.bits == 8
    numel = {n: model.unet.get_submodule(n).weight.numel() for n in plan}
    avg = sum(plan[n].weight.bits * numel[n] for n in plan) / sum(numel.values())
    assert avg == pytest.approx(result.usage["avg_weight_bits"])
    for group in qkv_groups(list(plan)):
        assert len({plan[n].weight.bits for n in group}) == 1
    impossible = load_spec(
        overrides=["allocation={weight_bits: [4, 8], budget: {avg_weight_bits: 3.0}, content_layers: []}"]
    )
    with pytest.raises(AllocationInfeasibleError, match="smallest feasible value is 4"):
        _alloc(model, calib, impossible, _sens(model, calib, impossible, None))


def test_latency_budget_from_lookup_table(tiny, tmp_path):
    import json

    model, calib = tiny
    names = quantizable_layers(model.unet)
    # W4 is slower than W8 on this made-up target, so a tight latency budget forces W8
    table = {name: {"w4a8": 2.0, "w8a8": 1.0} for name in names}
    path = tmp_path / "latency.json"
    path.write_text(json.dumps(table))
    spec = load_spec(
        overrides=[
            f"allocation={{weight_bits: [4, 8], budget: {{latency_ms: {len(names) * 1.0}}}, latency_table: '{path}', "
            "content_layers: [], quantize_family_fp_layers: true}"
        ]
    )
    plan, result = _alloc(model, calib, spec, _sens(model, calib, spec, None))
    assert all(cfg.weight.bits == 8 for cfg in plan.values())
    assert result.usage["latency_ms"] == pytest.approx(len(names))
    with pytest.raises(Exception, match="latency_table"):
        load_spec(overrides=["allocation={budget: {latency_ms: 3}}"])


def test_group_options_measured_where_allowed_and_chosen_by_allocation(tiny):
    from diffquant.quant.modules import groups_allowed

    model, calib = tiny
    spec = load_spec(
        overrides=[
            "allocation={weight_bits: [4], group_bits: [4], group_sizes: [8], budget: {avg_weight_bits: 8.0}, "
            "content_layers: [], quantize_family_fp_layers: true}",
            "allocation.objective={quality: 1.0, content: 0.0}",
        ]
    )
    table = _sens(model, calib, spec, None)
    names = quantizable_layers(model.unet)
    allowed = [n for n in names if groups_allowed(model.unet.get_submodule(n), 8)]
    assert 0 < len(allowed) < len(names)
    assert all(table.has(n, "weight", 4, 8) == (n in allowed) for n in names)
    # finer scales: group-wise 4-bit beats per-channel 4-bit on average
    grouped = sum(table.noise(n, "weight", 4, 8) for n in allowed)
    assert grouped < sum(table.noise(n, "weight", 4) for n in allowed)
    plan, result = _alloc(model, calib, spec, table)
    assert all(plan[n].weight.group_size in (None, 8) for n in names)
    assert all(plan[n].weight.group_size is None for n in names if n not in allowed)
    assert any(plan[n].weight.group_size == 8 for n in allowed)
    numel = {n: model.unet.get_submodule(n).weight.numel() for n in names}
    bits = {n: plan[n].weight.bits + (32 / 8 if plan[n].weight.group_size else 0) for n in names}
    expected = sum(bits[n] * numel[n] for n in names) / sum(numel.values())
    assert result.usage["avg_weight_bits"] == pytest.approx(expected)
    # a device class: only the options it runs are offered, and the answer says which went and why
    assert result.removed == {} and result.notes == {}
    kinds = {n: "conv" if isinstance(model.unet.get_submodule(n), nn.Conv2d) else "linear" for n in names}
    assert any(plan[n].weight.group_size for n in allowed if kinds[n] == "conv")

    def alloc(device, pinned=None):
        allocation = spec.allocation if pinned is None else spec.allocation.model_copy(update={"pinned": pinned})
        return allocate_plan(model, calib, allocation, table, device_class=device)

    orin_plan, orin = alloc("orin")
    assert not any(orin_plan[n].weight.group_size for n in names if kinds[n] == "conv")
    assert all(orin_plan[n] == plan[n] for n in names if kinds[n] == "linear")  # Linear layers keep their groups
    assert list(orin.removed) == ["w4g8a8"] and "not on a conv" in orin.removed["w4g8a8"]
    removed_from = sum(1 for n in allowed if kinds[n] == "conv")
    assert f"removed for {removed_from} of {len(names)} layers" in orin.removed["w4g8a8"]
    (note, noted), *_ = orin.notes.items()  # every conv is at 4 bits here: stored as INT4, run in float
    assert "no INT4 convolution kernel" in note and set(noted) == {n for n in names if kinds[n] == "conv"}
    assert alloc("cpu")[0] == plan  # onnxruntime runs block-wise weights on any layer
    conv = next(n for n in allowed if kinds[n] == "conv")
    with pytest.raises(ConfigError, match=f"pinned: {conv} is pinned to w4g8a8, which orin cannot run"):
        alloc("orin", {conv: "w4g8a8"})
    tight = spec.allocation.model_copy(
        update={"budget": spec.allocation.budget.model_copy(update={"avg_weight_bits": 3.0})}
    )
    with pytest.raises(AllocationInfeasibleError, match=r"\(device class orin cannot run w4g8a8 on some layers\)"):
        allocate_plan(model, calib, tight, table, device_class="orin")


def test_final_sample_psnr_metric(tiny):
    model, calib = tiny
    spec = load_spec(
        overrides=[
            "allocation={weight_bits: [2, 8], group_sizes: [], quality_metric: psnr, content_samples: 10, "
            "budget: {avg_weight_bits: 8}}",
            "sampler.steps=4",
            "calibration.size=12",
            "calibration.trajectories=4",
        ]
    )
    layers = quantizable_layers(model.unet)[:2]
    table = _sens(model, calib, spec, None, layers=layers)
    assert {r["layer"] for r in table.rows} == set(layers)
    for layer in layers:
        assert table.noise(layer, "weight", 2, None, "psnr") >= table.noise(layer, "weight", 8, None, "psnr")
        assert all(r["psnr_db"] is not None for r in table.rows)


def test_cross_attention_ties_only_keys_and_values():
    """Only self-attention's q/k/v read one tensor; a cross-attention block's to_q reads the hidden states."""
    from diffquant.mixed_precision.costs import cross_attention_blocks

    model = load_model("digits-t2i")
    names = quantizable_layers(model.unet)
    cross = cross_attention_blocks(model.unet)
    assert cross and all(name.endswith("attn2") for name in cross)
    groups = qkv_groups(names, cross)
    for group in groups:
        parent = group[0].rpartition(".")[0]
        leaves = sorted(name.rpartition(".")[2] for name in group)
        assert leaves == (["to_k", "to_v"] if parent in cross else ["to_k", "to_q", "to_v"]), group
    assert any(name.endswith("attn2.to_q") for name in names)
    assert not any(name.endswith("attn2.to_q") for group in groups for name in group)


def test_latency_table_gaps_are_listed_and_a_layer_without_options_is_refused(tiny, tmp_path):
    import json

    from diffquant.errors import ConfigError
    from diffquant.mixed_precision.allocate import latency_gaps

    model, calib = tiny
    names = quantizable_layers(model.unet)
    # a made-up sensitivity: W4 is noisier than W8 everywhere, so only the latency budget makes layers take W4
    rows = [{"layer": n, "kind": "weight", "bits": b, "noise": 1.0 if b == 4 else 0.1} for n in names for b in (4, 8)]
    rows += [{"layer": n, "kind": "activation", "bits": 8, "noise": 0.01} for n in names]
    sensitivity = SensitivityTable(rows)
    path = tmp_path / "latency.json"
    table = {
        "format": "diffquant.latency_table",
        "version": 1,
        "overhead_ms": 0.5,
        "layers": {name: {"w4a8": 1.0, "w8a8": 2.0} for name in names},
    }
    del table["layers"][names[1]]["w4a8"]  # w8a8 is its only option now
    path.write_text(json.dumps(table))
    budget = len(names) * 2.0 + 0.5 - 3.0  # three layers must take the faster W4
    spec = load_spec(
        overrides=[
            f"allocation={{weight_bits: [4, 8], group_bits: [], tie_qkv: false, budget: {{latency_ms: {budget}}}, "
            f"latency_table: '{path}', quantize_family_fp_layers: true}}"
        ]
    )
    plan, result = _alloc(model, calib, spec, sensitivity)
    assert result.unavailable == [
        {"layer": names[1], "option": "w4a8", "reason": f"option missing from the latency table {path}"}
    ]
    assert plan[names[1]].weight.bits == 8
    assert sum(plan[n].weight.bits == 4 for n in names) == 3
    expected = 0.5 + sum(2.0 if plan[n].weight.bits == 8 else 1.0 for n in names)  # the overhead is charged once
    assert result.usage["latency_ms"] == pytest.approx(expected) and expected <= budget + 1e-9
    assert latency_gaps(model.unet, spec.allocation) == result.unavailable
    del table["layers"][names[2]]
    path.write_text(json.dumps(table))
    with pytest.raises(ConfigError, match=f"layer '{names[2]}' is not in .* no option is left"):
        latency_gaps(model.unet, spec.allocation)
    with pytest.raises(ConfigError, match=f"layer '{names[2]}'"):
        _alloc(model, calib, spec, sensitivity)


def test_a_uniform_plan_the_device_class_cannot_run_is_refused_before_calibration(tiny):
    from diffquant.ptq import quantize
    from diffquant.quant.config import WeightConfig
    from diffquant.spec import QuantizeSpec

    model, calib = tiny
    config = QuantizeSpec(weight=WeightConfig(4, "per_group", group_size=8), keep_full_precision=[])
    with pytest.raises(ConfigError, match=r"weight: layer \S+ cannot run on orin: group-wise .* not on a conv"):
        quantize(model, config, calib)
    with pytest.raises(ConfigError, match="cannot run on hopper"):
        quantize(model, config, calib, device_class="hopper")
    assert not any(isinstance(m, QuantConv2d) for m in model.unet.modules())  # refused before any layer changed
