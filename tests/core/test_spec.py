import hashlib
import json
from pathlib import Path

import pytest
import yaml

from diffquant.errors import ConfigError, SpecError
from diffquant.spec import CompressionSpec, apply_overrides, load_spec, spec_from_dict

ROOT = Path(__file__).resolve().parents[2]


def test_default_spec_is_the_w8a8_preset():
    assert load_spec() == load_spec(ROOT / "configs" / "digits-unet-w8a8.yaml") == CompressionSpec()
    # unset: the model family's full-precision defaults apply
    assert CompressionSpec().quantize.keep_full_precision is None


def test_presets_parse():
    w4 = load_spec(ROOT / "configs" / "digits-unet-w4a8.yaml")
    assert w4.quantize.weight.bits == 4 and "conv_out" in w4.quantize.keep_full_precision


def test_prefect_deployment_parameter_is_the_default_spec():
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    compress = next(d for d in deployments if d["entrypoint"].endswith("compress_flow"))
    assert compress["schedules"][0]["cron"]
    assert spec_from_dict(compress["parameters"]["spec"]) == CompressionSpec()


def test_yaml_round_trip(tmp_path):
    spec = load_spec(overrides=["quantize.weight.bits=4", "quantize.keep_full_precision=[conv_out]"])
    path = tmp_path / "s.yaml"
    path.write_text(spec.to_yaml())
    assert load_spec(path) == spec
    assert spec.spec_hash() != CompressionSpec().spec_hash()


def test_overrides_parse_yaml_values():
    spec = load_spec(overrides=["evaluate.samples=100", "calibration.observer=mse", "quantize.activation.bits=null"])
    assert spec.evaluate.samples == 100 and spec.calibration.observer == "mse"
    assert spec.quantize.activation.bits is None


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["quantize.weight.bitz=4"], "unknown spec key 'quantize.weight.bitz'"),
        (["colibration.size=4"], "unknown spec key 'colibration'"),
        (["quantize.weight.bits=9"], "'quantize.weight.bits'"),
        (["quantize.activation.bits=1"], "'quantize.activation.bits'"),
        (["calibration.size=100000"], "exceeds the candidate pool"),
        (["sampler.guidance=-1"], "sampler.guidance"),
        (["sampler.guidance=60"], "sampler.guidance"),
        (["sampler.name=heun"], "sampler.name"),
        (["finetune.timestep_groups=2"], "timestep_groups > 1 is not available"),
        (["allocation.budget=4"], "allocation.budget"),
        (["allocation.weight_bits=[1, 4]"], "candidate bits 1"),
        (["nonsense"], "section.key=value"),
        (["quantize.weight.granularity=per_group"], "group_size is required"),
        (["allocation.group_sizes=[1]"], "group sizes"),
    ],
)
def test_bad_values_name_the_key(overrides, fragment):
    with pytest.raises(SpecError) as info:
        load_spec(overrides=overrides)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="mapping"):
        load_spec(listy)


def test_model_path_replaces_default_name(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(f"model: {{path: {tmp_path}}}\n")
    spec = load_spec(f)
    assert spec.model.path == str(tmp_path) and spec.model.name is None
    with pytest.raises(SpecError, match="exactly one"):
        spec_from_dict({"model": {"name": "a", "path": "b"}})


def test_flat_params():
    params = CompressionSpec().flat_params()
    assert params["quantize.weight.bits"] == "8"
    assert params["model.name"] == "digits-unet"


def test_apply_overrides_rejects_scalar_section():
    with pytest.raises(SpecError, match="not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_model_path_override_replaces_name():
    spec = load_spec(overrides=["model.path=/some/dir"])
    assert spec.model.path == "/some/dir" and spec.model.name is None
    with pytest.raises(SpecError, match="exactly one"):
        load_spec(overrides=["model.path=/a", "model.name=digits-unet"])


def test_overrides_and_full_precision_resolve_into_the_plan():
    from diffquant.models.loading import load_model
    from diffquant.ptq import plan_from_spec

    spec = load_spec(
        overrides=[
            "quantize.weight.bits=4",
            "quantize.overrides=[{layers: [conv_in, conv_out, 'time_embedding.*'], weight_bits: 8}]",
            "quantize.keep_full_precision=[conv_out]",
        ]
    )
    plan = plan_from_spec(load_model("digits-unet"), spec.quantize)
    assert plan["conv_in"].weight.bits == 8 and plan["conv_in"].activation.bits == 8
    assert plan["time_embedding.linear_2"].weight.bits == 8
    assert plan["conv_out"].is_full_precision
    assert plan["mid_block.resnets.0.conv1"].weight.bits == 4
    bad = load_spec(overrides=["quantize.overrides=[{layers: [nope]}]"])
    # the core names the key relative to the config it was given; the pipeline adds the section
    with pytest.raises(ConfigError, match=r"^overrides.0.layers: pattern 'nope'") as raised:
        plan_from_spec(load_model("digits-unet"), bad.quantize)
    assert str(raised.value.in_section("quantize")).startswith("quantize.overrides.0.layers: pattern 'nope'")


def test_per_group_plan_falls_back_to_per_channel_where_groups_do_not_fit():
    from diffquant.models.loading import load_model
    from diffquant.ptq import plan_from_spec
    from diffquant.quant.modules import groups_allowed

    model = load_model("digits-unet")
    spec = load_spec(
        overrides=[
            "quantize.weight={bits: 4, granularity: per_group, group_size: 32}",
            "quantize.keep_full_precision=[]",
        ]
    )
    plan = plan_from_spec(model, spec.quantize)
    assert plan["conv_in"].weight.granularity == "per_channel"  # one input channel
    for name, cfg in plan.items():
        fits = groups_allowed(model.unet.get_submodule(name), 32)
        assert (cfg.weight.group_size == 32) == fits
    assert sum(cfg.weight.group_size == 32 for cfg in plan.values()) > len(plan) // 2


def test_outlier_tokens_setting():
    assert load_spec().quantize.outlier_tokens == "auto"
    assert load_spec(overrides=["quantize.outlier_tokens=off"]).quantize.outlier_tokens == "off"
    assert load_spec(overrides=["quantize.outlier_tokens=1"]).quantize.outlier_tokens == 1
    for bad in ("-1", "sometimes"):
        with pytest.raises(SpecError, match="outlier_tokens"):
            load_spec(overrides=[f"quantize.outlier_tokens={bad}"])


def test_model_prompts_and_feature_module_default_to_the_family():
    spec = load_spec(overrides=["model.prompts=prompts.txt"])
    assert spec.model.prompts == "prompts.txt" and spec.calibration.feature_module is None


def test_flat_params_keep_glob_keyed_mappings_as_one_param():
    spec = load_spec(
        overrides=["allocation={budget: {avg_weight_bits: 4.0}, pinned: {'time_embedding.*': w8a8, conv_out: w8a8}}"]
    )
    params = spec.flat_params()
    assert json.loads(params["allocation.pinned"]) == {"time_embedding.*": "w8a8", "conv_out": "w8a8"}
    assert params["allocation.budget.avg_weight_bits"] == "4.0"
    assert not any("*" in key for key in params)


def test_export_target_default_leaves_hash_and_params_unchanged(tmp_path):
    default = CompressionSpec()
    # at its default, export.target is not serialized: the hash and the MLflow params are what
    # they were before the field existed
    assert "target" not in default.to_dict()["export"]
    assert "export.target" not in default.flat_params()
    explicit = load_spec(overrides=["export.target=tensorrt"])
    assert explicit == default and explicit.spec_hash() == default.spec_hash()
    before = {k: v for k, v in default.to_dict().items() if k != "runtime"}
    before["export"] = {k: v for k, v in before["export"].items() if k != "target"}
    canonical = json.dumps(before, sort_keys=True, separators=(",", ":"))
    assert default.spec_hash() == hashlib.sha256(canonical.encode()).hexdigest()[:16]


def test_export_target_onnxruntime_round_trips_and_changes_hash(tmp_path):
    spec = load_spec(overrides=["export.target=onnxruntime"])
    assert spec.export.target == "onnxruntime"
    assert spec.flat_params()["export.target"] == "onnxruntime"
    assert spec.spec_hash() != CompressionSpec().spec_hash()
    path = tmp_path / "s.yaml"
    path.write_text(spec.to_yaml())
    assert load_spec(path) == spec
    with pytest.raises(SpecError, match=r"export\.target"):
        load_spec(overrides=["export.target=tflite"])
    with pytest.raises(SpecError, match=r"tensorrt 'on' needs export\.target 'tensorrt'"):
        load_spec(overrides=["export.target=onnxruntime", "export.tensorrt='on'"])


def test_evaluate_clip_model_is_left_out_unset_and_changes_the_hash_when_set(tmp_path):
    default = CompressionSpec()
    assert "clip_model" not in default.to_dict()["evaluate"] and "evaluate.clip_model" not in default.flat_params()
    spec = load_spec(overrides=["evaluate.clip_model=/models/clip-vit-large-patch14"])
    assert spec.evaluate.clip_model == "/models/clip-vit-large-patch14"
    assert spec.flat_params()["evaluate.clip_model"] == "/models/clip-vit-large-patch14"
    assert spec.spec_hash() != default.spec_hash()
    path = tmp_path / "s.yaml"
    path.write_text(spec.to_yaml())
    assert load_spec(path) == spec
    with pytest.raises(SpecError, match=r"evaluate\.clip_model"):
        load_spec(overrides=["evaluate.clip_model=''"])
