"""Bad spec input (YAML files, ``--set`` overrides, CONFIG/--out paths) -> one line, exit 2, nothing written.

Each test is one distinct case. CLI cases go through ``diffquant compress`` (in process) and fail in
spec loading or pre-flight, before any model work, MLflow run or summary.json.
"""

from __future__ import annotations

import os
import time
import tracemalloc
from pathlib import Path

import pytest

from diffquant.errors import SpecError
from diffquant.spec import MAX_YAML_NODES, CompressionSpec, check_memory, load_spec, memory_needs
from tests.pipeline.conftest import isolated_home, mlflow_runs  # noqa: F401  (fixture reused)
from tests.pipeline.test_cli import assert_clean_failure, invoke

ROOT = Path(__file__).resolve().parents[2]


def assert_nothing_written(home: Path, *paths: Path) -> None:
    assert mlflow_runs(home) == []
    assert not home.exists() or not list(home.rglob("summary.json"))
    for path in paths:
        assert not path.exists(), path


def fails(path: Path | None = None, overrides: list[str] | None = None) -> str:
    """The one-line SpecError message load_spec raises."""
    with pytest.raises(SpecError) as info:
        load_spec(path, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# 1. duplicate keys


def test_duplicate_section_in_config_is_refused(isolated_home, tmp_path):  # noqa: F811
    config = tmp_path / "dup.yaml"
    config.write_text("sampler:\n  steps: 4\nevaluate:\n  samples: 10\nsampler:\n  steps: 8\n")
    result = invoke(str(config))
    assert_clean_failure(result, "key 'sampler' appears twice (lines 1 and 5)", isolated_home)
    assert_nothing_written(isolated_home)


def test_duplicate_key_inside_a_section_is_refused(tmp_path):
    config = tmp_path / "dup.yaml"
    config.write_text("calibration: {size: 32, trajectories: 8}\nevaluate:\n  samples: 10\n  seed: 1\n  samples: 20\n")
    assert "key 'samples' appears twice (lines 3 and 5)" in fails(config)
    # flow mappings on one line too, and inside --set values
    assert "key 'size' appears twice" in fails(overrides=["calibration={size: 4, size: 8}"])


# 2. alias bombs


def _billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_before_expansion(isolated_home, tmp_path):  # noqa: F811
    config = tmp_path / "bomb.yaml"
    config.write_text(_billion_laughs())
    assert config.stat().st_size < 500  # 9**9 strings once expanded
    tracemalloc.start()
    start = time.perf_counter()
    try:
        message = fails(config)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 5
    assert peak < 50 * 2**20, f"{peak / 2**20:.0f} MiB"
    assert f"more than {MAX_YAML_NODES:,} values through aliases" in message
    assert_clean_failure(invoke(str(config)), "aliases", isolated_home)
    assert_nothing_written(isolated_home)


def test_alias_bomb_in_a_set_value_is_refused():
    ones = ",".join(["1"] * 50)
    bomb = f"{{a: &a [{ones}], b: &b [{','.join(['*a'] * 50)}], c: [{','.join(['*b'] * 50)}]}}"  # 125,000 values
    assert len(bomb) < 600
    message = fails(overrides=[f"quantize.overrides={bomb}"])
    assert message.startswith("override 'quantize.overrides=") and "through aliases" in message


def test_recursive_alias_is_refused(tmp_path):
    config = tmp_path / "cycle.yaml"
    config.write_text("sampler: &s {steps: 4, again: *s}\n")
    assert "refers to a mapping or list that contains it" in fails(config)


# 3. YAML 1.1 booleans in on/off fields


@pytest.mark.parametrize(("written", "expected"), [("off", "off"), ("on", "on"), ("no", "off"), ("yes", "on")])
def test_export_tensorrt_unquoted_on_off(tmp_path, written, expected):
    config = tmp_path / "trt.yaml"
    config.write_text(f"export: {{tensorrt: {written}}}\n")
    assert load_spec(config).export.tensorrt == expected
    assert load_spec(overrides=[f"export.tensorrt={written}"]).export.tensorrt == expected
    # the spec round-trips through YAML with the string form
    assert load_spec(config).to_dict()["export"]["tensorrt"] == expected


def test_every_literal_with_on_off_values_takes_yaml_booleans():
    """Every Literal field offering on/off also accepts the booleans YAML makes of them."""
    from typing import Literal, get_args, get_origin

    from pydantic import BaseModel

    def literal_fields(model: type[BaseModel], prefix: str = ""):
        for name, field in model.model_fields.items():
            for arg in (field.annotation, *get_args(field.annotation)):
                if get_origin(arg) is Literal and {"on", "off"} & set(get_args(arg)):
                    yield f"{prefix}{name}"
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    yield from literal_fields(arg, f"{prefix}{name}.")

    keys = sorted(set(literal_fields(CompressionSpec)))
    assert "export.tensorrt" in keys and "quantize.outlier_tokens" in keys
    for key in keys:
        section, name = key.split(".")
        spec = load_spec(overrides=[f"{key}=off"])
        assert getattr(getattr(spec, section), name) == "off", key


# 4. counts that would crash later


@pytest.mark.parametrize(
    "key",
    [
        "evaluate.samples",
        "evaluate.batch_size",
        "evaluate.sqnr_inputs",
        "calibration.size",
        "calibration.trajectories",
        "calibration.batch_size",
        "finetune.steps",
        "finetune.batch_size",
        "export.parity_samples",
        "export.max_batch",
        "allocation.content_samples",
        "allocation.sensitivity_inputs",
        "sampler.steps",
    ],
)
def test_counts_have_maxima(key):
    section = key.split(".")[0]
    extra = [f"{section}={{}}"] if section in {"finetune", "allocation"} else []
    message = fails(overrides=[*extra, f"{key}={10**12}"])
    assert f"'{key}'" in message and "less than or equal to" in message


def test_huge_evaluate_samples_fails_in_seconds(isolated_home):  # noqa: F811
    start = time.perf_counter()
    result = invoke("--set", f"evaluate.samples={10**12}")
    assert time.perf_counter() - start < 15
    assert_clean_failure(result, "'evaluate.samples'", isolated_home)
    assert_nothing_written(isolated_home)


def test_memory_estimate_names_key_and_limit():
    spec = load_spec(overrides=["evaluate.samples=100000"])
    need = memory_needs(spec, (4, 128, 128))["evaluate.samples"]
    assert need == 3 * 100000 * 4 * 4 * 128 * 128
    with pytest.raises(SpecError) as info:
        check_memory(spec, (4, 128, 128), available=8 * 2**30)
    message = str(info.value)
    assert message.startswith("evaluate.samples 100000 needs about 73.2 GiB")
    assert "8.0 GiB of memory available; lower evaluate.samples" in message
    check_memory(spec, (1, 8, 8), available=8 * 2**30)  # 77 MB: fits


def test_memory_check_runs_in_cli_preflight(isolated_home, tmp_path, monkeypatch):  # noqa: F811
    import diffquant.spec as spec_module

    assert (spec_module.available_memory() or 1) > 0
    monkeypatch.setattr(spec_module, "available_memory", lambda: 64 * 2**20)
    out = tmp_path / "out"
    result = invoke("--set", "calibration.trajectories=100000", "--set", "calibration.size=16", "--out", str(out))
    assert_clean_failure(result, "calibration.trajectories 100000 needs about", isolated_home)
    assert "0.1 GiB of memory available" in result.output
    assert_nothing_written(isolated_home, out)


# 5. misleading messages


def test_config_directory_says_directory(isolated_home, tmp_path):  # noqa: F811
    result = invoke(str(tmp_path))
    assert_clean_failure(result, f"config file {tmp_path} is a directory; give a YAML spec file", isolated_home)
    assert "does not exist" not in result.output


@pytest.mark.parametrize("under", [False, True])
def test_out_pointing_at_a_file(isolated_home, tmp_path, under):  # noqa: F811
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "run" if under else blocker
    start = time.perf_counter()
    result = invoke("--out", str(out))
    assert time.perf_counter() - start < 15
    assert_clean_failure(result, f"--out {out} is not a folder", isolated_home)
    assert "DIFFQUANT_HOME" not in result.output
    assert blocker.read_text() == "x"
    assert_nothing_written(isolated_home)


@pytest.mark.parametrize("name", ["digits-classifier", "digits-unte"])
def test_unknown_reference_model_lists_bundled(isolated_home, name):  # noqa: F811
    result = invoke("--set", f"model.name={name}")
    assert_clean_failure(result, f"{name!r}: it is not a bundled reference model", isolated_home)
    assert "digits-unet, digits-dit, digits-t2i" in result.output
    assert "scheduler" not in result.output


# 6. more spec-level bad input


def test_empty_config_file_is_refused(isolated_home, tmp_path):  # noqa: F811
    config = tmp_path / "empty.yaml"
    config.write_text("# nothing here yet\n")
    assert_clean_failure(invoke(str(config)), "is empty", isolated_home)
    assert_nothing_written(isolated_home)


def test_config_not_utf8(tmp_path):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("model: {name: digits-unet}  # caf\xe9\n".encode("latin-1"))
    assert "is not UTF-8 text (byte 0xe9 at offset 33)" in fails(config)


def test_tab_indented_yaml_says_tab(tmp_path):
    config = tmp_path / "tabs.yaml"
    config.write_text("sampler:\n\tsteps: 4\n")
    message = fails(config)
    assert "line 2, column 1" in message and "indent with spaces" in message


def test_huge_config_file_is_not_read(tmp_path):
    config = tmp_path / "huge.yaml"
    with config.open("wb") as handle:
        handle.truncate(2 * 2**30)  # sparse: a weights file given by mistake
    start = time.perf_counter()
    assert "larger than 1,000,000 bytes" in fails(config)
    assert time.perf_counter() - start < 2


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a FIFO")
def test_special_file_config_does_not_hang(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert "is not a regular file" in fails(fifo)


def test_deeply_nested_yaml(tmp_path):
    config = tmp_path / "deep.yaml"
    config.write_text("quantize: " + "[" * 20000 + "]" * 20000 + "\n")
    assert "nested too deeply" in fails(config)


@pytest.mark.parametrize(
    "override", ["calibration.normal_std=.inf", "allocation.budget.avg_weight_bits=.nan", "sampler.guidance=.nan"]
)
def test_non_finite_floats(override):
    extra = ["allocation={}"] if override.startswith("allocation") else []
    message = fails(overrides=[*extra, override])
    assert "finite number" in message and override.split("=")[0] in message


@pytest.mark.parametrize(
    ("override", "fragment"),
    [("calibration.seed=99999999999999999999999", "less than or equal to 4294967295"), ("evaluate.seed=-1", ">= 0")],
)
def test_seeds_out_of_range(override, fragment):
    message = fails(overrides=[override])
    assert override.split("=")[0] in message
    assert fragment.replace(">= 0", "greater than or equal to 0") in message


@pytest.mark.parametrize("override", ["calibration.size=yes", "evaluate.samples=on", "promote.gates.min_accuracy=true"])
def test_booleans_are_not_counts(override):
    message = fails(overrides=[override])
    assert "takes a number, not the boolean true" in message and override.split("=")[0] in message


def test_scalar_for_a_section(isolated_home, tmp_path):  # noqa: F811
    result = invoke("--set", "sampler=3")
    assert_clean_failure(result, "'sampler': it is a section", isolated_home)
    assert "SamplerSpec" not in result.output
    config = tmp_path / "scalar.yaml"
    config.write_text("evaluate: 100\n")
    assert "'evaluate': it is a section" in fails(config)


def test_top_level_scalar_names_its_type(tmp_path):
    config = tmp_path / "text.yaml"
    config.write_text("just some text\n")
    assert "must hold a mapping of sections (model, sampler, ...), not a str" in fails(config)


@pytest.mark.parametrize("override", [".steps=3", "sampler..steps=3", "sampler.=3"])
def test_empty_key_part(override):
    message = fails(overrides=[override])
    assert "empty key part" in message and "<spec>" not in message


def test_missing_latency_table_fails_in_preflight(isolated_home, tmp_path):  # noqa: F811
    missing = tmp_path / "latency.json"
    result = invoke(
        str(ROOT / "configs" / "digits-unet-mixed-w4a8.yaml"),
        "--set",
        f"allocation.latency_table={missing}",
        "--set",
        "allocation.budget.latency_ms=3",
        "--out",
        str(tmp_path / "out"),
    )
    assert_clean_failure(result, "allocation.latency_table", isolated_home)
    assert_nothing_written(isolated_home, tmp_path / "out")


def test_valid_presets_still_load():
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        load_spec(config)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("evaluate: {seed: 2024-01-01}\n", "'evaluate.seed' is a YAML date"),
        ("model: {name: !!binary aGVsbG8=}\n", "'model.name' is a YAML bytes"),
        (
            "quantize: {keep_full_precision: !!set {conv_in, conv_out}}\n",
            "'quantize.keep_full_precision' is a YAML set",
        ),
    ],
)
def test_yaml_values_json_cannot_hold(tmp_path, text, fragment):
    config = tmp_path / "typed.yaml"
    config.write_text(text)
    message = fails(config)  # was a TypeError traceback from the override round trip
    assert fragment in message and "which a spec cannot hold" in message


def test_sweep_preflight_refuses_bad_input_too(isolated_home, tmp_path):  # noqa: F811
    from typer.testing import CliRunner

    from diffquant.flows.cli import app

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    config = ROOT / "configs" / "digits-unet-mixed-w4a8.yaml"
    result = CliRunner().invoke(app, ["sweep", str(config), "--out", str(blocker)])
    assert_clean_failure(result, f"--out {blocker} is not a folder", isolated_home)
    duplicated = tmp_path / "dup.yaml"
    duplicated.write_text(config.read_text() + "\nallocation: {budget: {avg_weight_bits: 3}}\n")
    result = CliRunner().invoke(app, ["sweep", str(duplicated)])
    assert_clean_failure(result, "key 'allocation' appears twice", isolated_home)
    assert_nothing_written(isolated_home)


@pytest.mark.parametrize("budgets", ["3,inf", "nan", "4,-1"])
def test_sweep_budgets_must_be_finite(isolated_home, budgets):  # noqa: F811
    from typer.testing import CliRunner

    from diffquant.flows.cli import app

    config = ROOT / "configs" / "digits-unet-mixed-w4a8.yaml"
    result = CliRunner().invoke(app, ["sweep", str(config), "--budgets", budgets])
    assert_clean_failure(result, "--budgets takes numbers like 3,3.5,4", isolated_home)
    assert_nothing_written(isolated_home)
