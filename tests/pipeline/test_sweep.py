"""`diffquant sweep`: one compress run per budget, cached sensitivity, Pareto plot and record."""

import json
from pathlib import Path

from typer.testing import CliRunner

from diffquant.flows.cli import app
from tests.pipeline.conftest import SMALL, mlflow_runs

ROOT = Path(__file__).resolve().parents[2]


def test_sweep_small(isolated_home, tmp_path):
    args = [
        "sweep",
        str(ROOT / "configs" / "digits-unet-mixed-w4a8.yaml"),
        "--budgets",
        "5,6",
        "--baselines",
        "8",
        "--out",
        str(tmp_path / "sweep"),
    ]
    small = ["allocation.weight_bits=[4, 8]", "allocation.sensitivity_inputs=16", "allocation.content_samples=10"]
    for item in [*SMALL, *small, "export.onnx=false"]:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    points = sweep["points"]
    assert [p["label"] for p in points] == ["mixed <= 5 bits", "mixed <= 6 bits", "uniform W8A8"]
    assert [p["sensitivity_cache_hit"] for p in points[:2]] == [False, True]
    assert points[0]["avg_weight_bits"] <= 5 + 1e-6 and points[1]["avg_weight_bits"] <= 6 + 1e-6
    assert points[0]["packed_bytes"] <= points[1]["packed_bytes"] <= points[2]["packed_bytes"]
    assert (tmp_path / "sweep" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    runs = [r for r in mlflow_runs(isolated_home) if "mlflow.parentRunId" not in r.data.tags]
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)


def test_sweep_needs_allocation(isolated_home):
    result = CliRunner().invoke(app, ["sweep", str(ROOT / "configs" / "digits-unet-w8a8.yaml")])
    assert result.exit_code == 2
    assert "allocation" in result.output.strip().splitlines()[-1]


def test_a_baseline_that_is_no_valid_spec_fails_before_any_work(isolated_home, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", str(ROOT / "configs" / "digits-unet-mixed-w4a8.yaml"), "--baselines", "8,1", "--out", str(out)]
    for item in SMALL:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert "--baselines 1" in last and "quantize.weight.bits" in last, last  # not after the mixed runs
    assert not out.exists() and mlflow_runs(isolated_home) == []
