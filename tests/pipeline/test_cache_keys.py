"""Cache keys come from the requests' fields: every result-affecting spec field changes the right key,
``runtime`` changes none but the FP evaluation's (its device type, dtype and batch change its numbers), and
fields a stage does not read leave its key alone (so caches are reused)."""

from __future__ import annotations

import fnmatch
from typing import Any

import pytest
import torch

from diffquant.spec import CompressionSpec, flatten, spec_from_dict
from diffquant.tasks.artifacts import (
    CalibrationArtifact,
    FileRef,
    FinetuneRequest,
    FpEvalRequest,
    ModelInfo,
    PoolArtifact,
    PoolRequest,
    QuantizeArtifact,
    SensitivityRequest,
)

# What each cached stage's result depends on, in spec keys (globs). Everything else must not move its key.
DEPENDS = {
    "pool": ["model.*", "sampler.*", "calibration.trajectories", "calibration.seed"],
    "sensitivity": [
        "sampler.*",
        "allocation.weight_bits",
        "allocation.activation_bits",
        "allocation.group_bits",
        "allocation.group_sizes",
        "allocation.quality_metric",
        "allocation.content_layers",
        "allocation.content_samples",
        "allocation.sensitivity_inputs",
        "quantize.weight.observer",
        "quantize.outlier_tokens",
        "calibration.observer",
        "evaluate.seed",
    ],
    "finetune": ["finetune.*"],
    "fp_evaluation": [
        "model.*",
        "sampler.*",
        "evaluate.samples",
        "evaluate.seed",
        "evaluate.batch_size",
        "evaluate.clip_model",  # the CLIP score is one of the FP evaluation's metrics
        "runtime.dtype",
        *(["runtime.device"] if torch.cuda.is_available() else []),  # auto is the CPU here, as cpu is
    ],
}
ALTERNATIVES: dict[str, list[Any]] = {
    "model.name": ["digits-dit"],
    "model.path": ["/some/model"],
    "model.prompts": ["/some/prompts.txt"],
    "sampler.name": ["euler"],
    "sampler.guidance": [3.0],
    "finetune.timestep_groups": [],  # only 1 is accepted (one engine per group otherwise)
    "quantize.weight.group_size": [],  # only together with granularity per_group (a two-field change)
    "calibration.strategy": ["random"],
    "calibration.observer": ["mse"],
    "calibration.labels_file": [],  # enters the pool key as the labels read from it (test below)
    "calibration.feature_module": ["down_blocks.1"],
    "calibration.radius": [0.5],
    "quantize.weight.granularity": ["per_tensor"],
    "quantize.weight.observer": ["mse"],
    "quantize.outlier_tokens": ["off"],
    "quantize.activation.shift": ["none"],  # the quantize stage reads it (not cached); the finetune key hashes its plan
    "quantize.smooth.layers": [["*"]],
    "quantize.low_rank.layers": [["*"]],
    "quantize.low_rank.dtype": ["float32"],
    "quantize.keep_full_precision": [["conv_out"]],
    "quantize.overrides": [[{"layers": ["conv_in"], "weight_bits": 4}]],
    "allocation.quality_metric": ["psnr"],
    "allocation.content_layers": [["*attn*"]],
    "allocation.latency_table": [],  # needs a budget.latency_ms too; tested by the allocation tests
    "allocation.pinned": [{"conv_in": "w8a8"}],
    "allocation.objective": [{"quality": 1.0, "content": 0.5}],
    "allocation.budget.bytes": [1e6],
    "allocation.budget.bitops": [1e9],
    "allocation.budget.latency_ms": [],
    "finetune.trainable.rule": ["attention"],
    "finetune.trainable.layers": [["conv_in"]],
    "finetune.alpha": [2.0],
    "export.target": ["onnxruntime"],
    "export.tensorrt": ["off"],
    "promote.registered_model": ["other-name"],
    "evaluate.clip_model": ["/other/clip"],
    "promote.gates.min_accuracy": [0.5],
    "promote.gates.max_size_ratio": [0.5],
    "runtime.runner": ["dask"],
    "runtime.device": ["cpu"],
    "runtime.dtype": ["bfloat16"],
}


def _full_spec() -> CompressionSpec:
    # evaluate.clip_model is left out of the spec at its default (None): set, it is a leaf to walk
    outliers = {"activation": {"shift": "channel"}, "smooth": {}, "low_rank": {}}
    return spec_from_dict(
        {"allocation": {}, "finetune": {}, "quantize": outliers, "evaluate": {"clip_model": "/some/clip"}}
    )


def _candidates(key: str, value: Any) -> list[Any]:
    if key in ALTERNATIVES:
        return ALTERNATIVES[key]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1, value * 2]
    if isinstance(value, float):
        return [value * 0.5, value * 1.5, value + 0.1]
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return [value[:-1], [*value, 5]]
    if isinstance(value, list):
        return [[*value, 64], value[:-1]]
    raise AssertionError(f"no alternative value for spec key {key} ({value!r}): add one to ALTERNATIVES")


def _set(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    import copy

    out = copy.deepcopy(data)
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value
    if parts[0] == "model" and parts[1] in ("name", "path"):
        node.pop("path" if parts[1] == "name" else "name", None)
    return out


def _keys(spec: CompressionSpec, weights: str = "w" * 64) -> dict[str, str]:
    info = ModelInfo(
        name="m",
        family="unet2d",
        condition="class",
        weights_sha256=weights,
        prompts_sha256=None,
        sample_shape=[1, 8, 8],
        num_classes=10,
        latent=False,
        layer_names=["conv_in"],
        source_dir="/m",
    )
    ref = FileRef(path="/x", sha256="c" * 64)
    calib = CalibrationArtifact(
        calibration=ref, sqnr=ref, selection=ref, histogram_png="h", pca_png="p", size=1, seconds=0.0
    )
    quant = QuantizeArtifact(plan=ref, scales=ref, layers=1, quantized_layers=1, fp32_bytes=4, packed_bytes=1)
    pool = PoolArtifact(pool=ref, size=1)
    return {
        "pool": PoolRequest.from_spec(spec, info, None).key(),
        "sensitivity": SensitivityRequest.from_spec(spec, info, calib).key(),
        "finetune": FinetuneRequest.from_spec(spec, info, quant, pool).key(),
        "fp_evaluation": FpEvalRequest.from_spec(spec, info).key(),
    }


def _leaves() -> list[tuple[str, Any]]:
    return sorted(flatten(_full_spec().to_dict()).items())


@pytest.mark.parametrize(("key", "value"), _leaves(), ids=[k for k, _ in _leaves()])
def test_each_spec_field_moves_exactly_the_keys_that_depend_on_it(key, value):
    base = _full_spec()
    before = _keys(base)
    tried = []
    for candidate in _candidates(key, value):
        try:
            changed = spec_from_dict(_set(base.to_dict(), key, candidate))
        except Exception as error:
            tried.append(f"{candidate!r}: {error}")
            continue
        if flatten(changed.to_dict()).get(key) == value:
            continue
        after = _keys(changed)
        for stage, patterns in DEPENDS.items():
            expected = any(fnmatch.fnmatchcase(key, p) for p in patterns)
            assert (after[stage] != before[stage]) == expected, f"{key}={candidate!r} and the {stage} key"
        return
    if key in ALTERNATIVES and not ALTERNATIVES[key]:
        pytest.skip(f"{key}: no other valid value here (see ALTERNATIVES)")
    raise AssertionError(f"no valid alternative for {key}: {tried}")


def test_runtime_changes_no_key_and_not_the_spec_hash():
    base = _full_spec()
    other = spec_from_dict(_set(base.to_dict(), "runtime.workers", 2))
    assert _keys(other) == _keys(base) and other.spec_hash() == base.spec_hash()


def test_runtime_batch_size_moves_only_the_fp_evaluation_key():
    """``runtime.batch_size`` (left out of the spec at its default) caps the sampling batch, which the FP samples' rounding depends on."""
    base = _full_spec()
    capped = spec_from_dict(_set(base.to_dict(), "runtime.batch_size", 8))
    keys, moved = _keys(base), _keys(capped)
    assert {stage for stage in keys if keys[stage] != moved[stage]} == {"fp_evaluation"}
    assert capped.spec_hash() == base.spec_hash()
    huge = spec_from_dict(_set(base.to_dict(), "runtime.batch_size", 65536))  # above every batch: nothing changes
    assert _keys(huge) == keys


def test_weights_and_labels_move_the_keys_that_read_them():
    spec = _full_spec()
    keys, changed = _keys(spec), _keys(spec, weights="v" * 64)
    assert all(keys[stage] != changed[stage] for stage in keys)
    info = ModelInfo(
        name="m",
        family="unet2d",
        condition="class",
        weights_sha256="w" * 64,
        prompts_sha256=None,
        sample_shape=[1, 8, 8],
        num_classes=10,
        latent=False,
        layer_names=[],
        source_dir="/m",
    )
    assert PoolRequest.from_spec(spec, info, [1, 2]).key() != PoolRequest.from_spec(spec, info, None).key()


def test_allocation_cost_moves_the_spec_hash_and_no_cached_key():
    """``allocation.cost`` is left out of the serialized spec at its default (so the walk above never sees it)."""
    base = _full_spec()
    data = base.to_dict()
    data["allocation"]["cost"] = "deployed"
    deployed = spec_from_dict(data)
    assert flatten(deployed.to_dict())["allocation.cost"] == "deployed" and "allocation.cost" not in dict(_leaves())
    assert deployed.spec_hash() != base.spec_hash() and _keys(deployed) == _keys(base)


@pytest.mark.parametrize(
    ("key", "value", "moves_sensitivity"),
    [
        ("quantize.weight.rounding", "gptq", True),
        ("allocation.content_metric", "ssim", True),
        ("allocation.quantize_family_fp_layers", True, False),
        ("allocation.noise_sum", "amplitude", False),
    ],
)
def test_fields_left_out_at_their_default_move_the_right_keys(key, value, moves_sensitivity):
    """Fields serialized only away from their default: absent from the default spec (its hash is unchanged)."""
    base = _full_spec()
    assert key not in flatten(base.to_dict())
    changed = spec_from_dict(_set(base.to_dict(), key, value))
    assert flatten(changed.to_dict())[key] == value and changed.spec_hash() != base.spec_hash()
    before, after = _keys(base), _keys(changed)
    assert (after["sensitivity"] != before["sensitivity"]) == moves_sensitivity
    assert after["pool"] == before["pool"] and after["finetune"] == before["finetune"]


@pytest.mark.parametrize(
    ("key", "value"),
    [("ranks", [0, 8]), ("weight_formats", ["fp8_e4m3"]), ("activation_formats", ["fp8_e4m3"])],
)
def test_allocation_option_kinds_move_the_spec_hash_and_only_the_sensitivity_key(key, value):
    """Branch and float-format options are left out at their defaults and measured, so they move sensitivity.

    The spec drops ``quantize.low_rank`` (one place sets the branches) and targets a device class with FP8.
    """
    data = _full_spec().to_dict()
    del data["quantize"]["low_rank"]
    data["export"]["device_class"] = "ada"
    base = spec_from_dict(data)
    assert f"allocation.{key}" not in flatten(base.to_dict())
    data["allocation"][key] = value
    ranked = spec_from_dict(data)
    assert flatten(ranked.to_dict())[f"allocation.{key}"] == value and ranked.spec_hash() != base.spec_hash()
    before, after = _keys(base), _keys(ranked)
    assert after["sensitivity"] != before["sensitivity"]
    assert {k: v for k, v in after.items() if k != "sensitivity"} == {
        k: v for k, v in before.items() if k != "sensitivity"
    }


@pytest.mark.parametrize(
    "formats",
    [
        {"weight": {"format": "fp8_e4m3"}, "activation": {"format": "fp8_e4m3"}},
        {"weight": {"bits": 6, "format": "fp6_e2m3"}},
        {"weight": {"bits": 4, "format": "fp4_e2m1", "granularity": "per_group", "group_size": 16}},
    ],
    ids=["fp8", "fp6", "nvfp4"],
)
def test_float_formats_change_the_spec_hash_and_no_cache_key(formats):
    """``quantize.*.format`` is left out at its default (so not a leaf above): the plan reads it, no cached stage does.

    Float formats refuse ``allocation`` (integer options only), so the spec here has no sensitivity stage.
    """
    data = _full_spec().to_dict()
    data["allocation"] = None
    data["export"]["device_class"] = "blackwell"
    data["finetune"]["learn_weight_scales"] = False
    base = spec_from_dict(data)
    changed = json_copy(data)
    for part, values in formats.items():
        changed["quantize"][part].update(values)
    spec = spec_from_dict(changed)
    assert spec.spec_hash() != base.spec_hash()
    before, after = _keys_without_sensitivity(base), _keys_without_sensitivity(spec)
    assert before == after


def json_copy(data: dict[str, Any]) -> dict[str, Any]:
    import copy

    return copy.deepcopy(data)


def _keys_without_sensitivity(spec: CompressionSpec) -> dict[str, str]:
    info = ModelInfo(
        name="m",
        family="unet2d",
        condition="class",
        weights_sha256="w" * 64,
        prompts_sha256=None,
        sample_shape=[1, 8, 8],
        num_classes=10,
        latent=False,
        layer_names=["conv_in"],
        source_dir="/m",
    )
    ref = FileRef(path="/x", sha256="c" * 64)
    quant = QuantizeArtifact(plan=ref, scales=ref, layers=1, quantized_layers=1, fp32_bytes=4, packed_bytes=1)
    pool = PoolArtifact(pool=ref, size=1)
    return {
        "pool": PoolRequest.from_spec(spec, info, None).key(),
        "finetune": FinetuneRequest.from_spec(spec, info, quant, pool).key(),
    }
