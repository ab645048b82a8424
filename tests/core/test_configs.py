"""Every shipped preset in configs/ parses and validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffquant.spec import load_spec

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_there_are_presets():
    assert len(CONFIGS) >= 5
    assert {"sd15-w8a8.yaml", "sdxl-turbo-mixed-w4a8.yaml", "pixart-w8a8.yaml"} <= {c.name for c in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_round_trips(path, tmp_path):
    spec = load_spec(path)
    assert spec.model.name or spec.model.path
    (tmp_path / "again.yaml").write_text(spec.to_yaml())
    assert load_spec(tmp_path / "again.yaml") == spec


@pytest.mark.parametrize("name", ["sd15-w8a8.yaml", "sdxl-turbo-mixed-w4a8.yaml", "pixart-w8a8.yaml"])
def test_user_model_presets_point_at_a_local_pipeline_with_prompts(name):
    spec = load_spec(next(c for c in CONFIGS if c.name == name))
    assert spec.model.path and spec.model.prompts and spec.sampler.guidance == 1.0
    assert spec.export.onnx and spec.promote.gates.max_fd_ratio is None  # FD is not measured for these models
