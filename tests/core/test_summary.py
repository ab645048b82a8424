"""summary.json is written from a typed RunSummary; summaries from before the schema version load too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from diffquant.summary import SCHEMA_VERSION, RunSummary

OLD = Path(__file__).resolve().parents[1] / "data" / "summary_v0.json"


def test_a_summary_written_before_the_schema_version_loads_with_every_key():
    summary = RunSummary.load(OLD)
    assert summary.schema_version == 0
    assert summary.model.name == "digits-unet" and summary.sizes.packed_bytes == 1_217_412
    old = json.loads(OLD.read_text())
    again = summary.to_dict()
    assert set(old) <= set(again)
    for key in old:
        assert again[key] == old[key], key


def test_the_current_schema_round_trips_and_a_missing_section_is_refused():
    data = json.loads(OLD.read_text()) | {"schema_version": SCHEMA_VERSION}
    assert RunSummary.model_validate(data).to_dict() == data
    del data["sizes"]
    with pytest.raises(ValidationError, match="sizes"):
        RunSummary.model_validate(data)


def test_the_evaluation_section_is_added_without_changing_older_summaries():
    from diffquant.report import evaluation_section, render_report

    old = json.loads(OLD.read_text())
    assert "evaluation" not in RunSummary.load(OLD).to_dict()  # an old summary stays as it was written
    model = {"latent": True, "decoded": True, "condition": "text"}
    metrics = {"fp": {"sampling_seconds": 1.0}, "quantized": {"psnr": 30.0, "psnr_latent": 25.0, "ssim": 0.9}}
    section = evaluation_section(model, metrics)
    assert section["images"] == "decoded"
    assert "decoded by the VAE" in section["metrics"]["psnr"] and "latents" in section["metrics"]["psnr_latent"]
    assert set(section["not_computed"]) == {"accuracy", "fd_real", "fd_fp", "clip_score"}
    data = old | {"schema_version": SCHEMA_VERSION, "evaluation": section}
    summary = RunSummary.model_validate(data)
    assert summary.to_dict() == data and summary.evaluation.images == "decoded"
    report = render_report(data)
    assert "Not computed: accuracy, fd_real, fd_fp (the digits classifier" in report
    assert "; clip_score (evaluate.clip_model is not set" in report
    assert "](samples/fp_vs_quantized.png)" in report and "decoded images from the same noise" in report
    # a pixel model judged by the classifier has nothing left out; a latent model without a VAE says why
    pixels = evaluation_section({"latent": False, "condition": "class"}, {"fp": {"accuracy": 0.9, "psnr": 40.0}})
    assert pixels["images"] == "pixels" and pixels["not_computed"] == {} and "data range 2" in pixels["metrics"]["psnr"]
    latents = evaluation_section({"latent": True, "condition": "class"}, {"fp": {"psnr_latent": 20.0}})
    assert latents["images"] == "latents" and "no vae/ folder" in latents["not_computed"]["psnr"]
