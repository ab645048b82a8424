"""bench/gpu_check.py end to end on the CPU at a tiny width, in a process where prefect and mlflow cannot be imported."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"

BLOCKED_RUN = """
import importlib.abc, runpy, sys

class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("prefect", "mlflow"):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, _Blocked())
sys.path.insert(0, sys.argv[1])
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
"""Runs ``argv[2]`` as ``__main__`` with ``argv[1]`` on the path and a finder that refuses prefect and mlflow."""


def _blocked(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", BLOCKED_RUN, str(script.parent), str(script), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd)


def test_the_blocker_refuses_prefect_and_mlflow(tmp_path):
    script = tmp_path / "imports.py"
    for name in ("prefect", "mlflow"):
        script.write_text(f"import {name}\n")
        result = _blocked(script, cwd=tmp_path)
        assert result.returncode != 0 and f"{name} is blocked" in result.stderr


def _cpu_dtype() -> str:
    """bfloat16 where this CPU's torch computes it (the GPU run's dtype), else float32."""
    from diffquant.errors import ConfigError
    from diffquant.placement import resolve

    try:
        resolve("cpu", "bfloat16")
    except ConfigError:
        return "float32"
    return "bfloat16"


def _check_tiny_run(tmp_path: Path, export: bool) -> dict:
    """Run the script at 1/32 width on 16x16 latents, prefect and mlflow blocked; check and return its JSON."""
    dtype = _cpu_dtype()
    out = tmp_path / "gpu_check.json"
    args = ["--device", "cpu", "--dtype", dtype, "--width", "0.03125", "--sample-size", "16", "--steps", "2"]
    args += ["--trajectories", "4", "--size", "8", "--sqnr-inputs", "4", "--samples", "2", "--batch", "8"]
    args += ["--export", "--parity-inputs", "4"] if export else []
    result = _blocked(BENCH / "gpu_check.py", *args, "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["forbidden_modules_loaded"] == []
    assert (record["device_type"], record["dtype"]) == ("cpu", dtype)
    expected = ["write_model", "load", "collect_pool", "select_calibration", "evaluate_fp", "quantize"]
    expected += ["evaluate_quantized", "agreement", *(["export"] if export else [])]
    assert list(record["stages"]) == expected
    for stage in record["stages"].values():
        assert stage["seconds"] > 0 and stage["peak_rss_mb"] > 0 and stage["peak_cuda_mb"] is None
    assert record["pool"] == 4 * 2 * 2  # trajectories x steps x guidance halves
    assert record["quantized_layers"] > 0
    quantized = record["metrics"]["quantized"]
    assert math.isfinite(quantized["sqnr_db"]) and quantized["sqnr_db"] > 10
    assert {"psnr", "psnr_latent"} <= set(quantized)  # the VAE decodes the samples
    agreement = record["agreement"][f"cpu_{dtype}_vs_cpu_float32"]
    assert agreement["reference_max_abs"] > 0
    if dtype == "bfloat16":  # the same quantized module in bfloat16: close to float32, not equal
        assert 0 < agreement["relative_l2"] < 0.1
    else:
        assert agreement["max_abs"] == 0
    assert "| agreement |" in result.stdout
    return record


def test_gpu_check_runs_on_the_cpu_through_the_library_api_alone(tmp_path):
    record = _check_tiny_run(tmp_path, export=False)
    assert record["parity"] is None


@pytest.mark.slow
def test_gpu_check_exports_and_checks_parity_on_the_cpu(tmp_path):
    record = _check_tiny_run(tmp_path, export=True)
    assert record["parity"]["passed"] and record["parity"]["inputs"] == 4
