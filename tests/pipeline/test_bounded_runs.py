"""A compress run keeps every forward within the batch, measures peak memory, estimates its cost before the
stages run (and the counts are what the stages do), and a second run reuses the FP evaluation."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from diffquant.spec import load_spec
from tests.pipeline.conftest import SMALL, mlflow_runs

BATCH = 8


@pytest.fixture
def hooked(monkeypatch):
    """Record (stage, inputs) of every denoiser forward: PyTorch (hooked on every model copy) and onnxruntime."""
    import diffquant.models.cache as cache
    import diffquant.models.loading as loading
    from diffquant.export import parity
    from diffquant.flows import compress

    calls: dict[str, list[int]] = defaultdict(list)
    current = {"stage": ""}

    def record(inputs: int) -> None:
        if not torch.onnx.is_in_onnx_export():  # the export traces the model once; no pass of a stage
            calls[current["stage"]].append(inputs)

    load_model = loading.load_model

    def hooked_load(*args, **kwargs):
        model = load_model(*args, **kwargs)
        model.unet.register_forward_pre_hook(lambda _m, a: record(int(a[0].shape[0])))  # deep copies keep it
        return model

    forward = parity.OrtDenoiser.forward

    def ort_forward(self, sample, *args, **kwargs):
        record(int(sample.shape[0]))
        return forward(self, sample, *args, **kwargs)

    stage = compress._Run.stage

    def named_stage(self, name, fn, *args, **kwargs):
        current["stage"] = name
        return stage(self, name, fn, *args, **kwargs)

    monkeypatch.setattr(loading, "load_model", hooked_load)
    monkeypatch.setattr(parity.OrtDenoiser, "forward", ort_forward)
    monkeypatch.setattr(compress._Run, "stage", named_stage)
    cache.clear_model_cache()
    yield calls
    cache.clear_model_cache()


def _run(out: Path, extra: list[str]) -> dict:
    from diffquant.flows.compress import compress_flow

    return compress_flow(spec=load_spec(overrides=SMALL + extra).to_dict(), out_dir=str(out))


def _numbers(summary: dict) -> dict:
    return {stage: {k: v for k, v in m.items() if k != "sampling_seconds"} for stage, m in summary["metrics"].items()}


def test_runs_stay_within_the_batch_count_as_estimated_and_a_second_run_reuses_the_fp_evaluation(
    isolated_home, tmp_path, hooked
):
    capped = [f"runtime.batch_size={BATCH}"]
    first = _run(tmp_path / "a", capped)
    passes = {stage: sizes for stage, sizes in hooked.items() if stage != "estimate"}  # the estimate times forwards
    assert max(max(sizes) for sizes in passes.values()) == BATCH
    estimate = first["estimate"]["stages"]
    for stage, sizes in passes.items():
        assert (estimate[stage]["evaluations"], estimate[stage]["calls"]) == (sum(sizes), len(sizes)), stage
    assert {s for s, e in estimate.items() if e["evaluations"]} == set(passes)
    for stage in first["timings"]:
        assert first["memory"][stage]["peak_rss_bytes"] >= first["memory"][stage]["start_rss_bytes"] > 0
    assert first["export"]["parity"]["passed"] and first["evaluation"]["fp_cache_hit"] is False
    report = (tmp_path / "a" / "report.md").read_text()
    assert "| evaluate_quantized |" in report and "estimated s | measured s" in report
    parent = next(r for r in mlflow_runs(isolated_home) if r.info.run_id == first["run_id"])
    assert parent.data.metrics["memory.evaluate_quantized.peak_rss_mb"] > 0

    hooked.clear()
    second = _run(tmp_path / "b", capped)
    assert second["evaluation"]["fp_cache_hit"] is True and second["calibration"]["pool_cache_hit"] is True
    assert _numbers(second) == _numbers(first)  # the same FP and quantized metrics
    assert hooked["evaluate_fp"] == [BATCH, BATCH]  # the SQNR reference only: 16 held-out inputs
    assert second["estimate"]["stages"]["evaluate_fp"]["evaluations"] == 16
    fp = Path(second["samples"]["fp"])
    assert fp.parent == tmp_path / "b" / "samples" and fp.read_bytes() == Path(first["samples"]["fp"]).read_bytes()
    parity = json.loads(Path(second["export"]["parity_path"]).read_text())["sampling"]
    assert parity["torch_samples"] == "given" and parity["passed"]
    # outputs on the calibration set (PyTorch and onnxruntime), then onnxruntime's samples only: 40 x 10 steps
    assert sum(hooked["export"]) == 2 * 32 + 40 * 10


def test_dry_run_prints_each_stage_and_writes_no_run(isolated_home, tmp_path):
    from typer.testing import CliRunner

    from diffquant.flows.cli import app

    overrides = [arg for item in [*SMALL, "runtime.batch_size=16"] for arg in ("--set", item)]
    result = CliRunner().invoke(app, ["compress", *overrides, "--out", str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 0, result.output
    for stage in ("collect_trajectories", "select_calibration", "evaluate_quantized", "export", "total"):
        assert stage in result.output
    assert "fp forward:" in result.output and "onnx forward:" in result.output
    assert "no run was written" in result.output.replace("\n", " ")
    assert not (tmp_path / "out").exists() and not (isolated_home / "runs").exists()
    assert mlflow_runs(isolated_home) == [] and not (isolated_home / "cache").exists()
    bad = CliRunner().invoke(app, ["compress", "--set", "runtime.batch_size=0", "--dry-run"])
    assert bad.exit_code == 2 and "runtime.batch_size" in bad.output
