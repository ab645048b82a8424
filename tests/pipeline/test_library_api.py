"""The library API and ``diffquant compress`` give byte-identical plans and scales for the same spec."""

from __future__ import annotations

from pathlib import Path

import pytest

import diffquant
from diffquant.models.reference import load_classifier
from diffquant.spec import CompressionSpec, load_spec
from tests.pipeline.conftest import SMALL

ROOT = Path(__file__).resolve().parents[2]
FAST = [*SMALL, "export.onnx=false", "promote.register_model=false", "evaluate.samples=10"]


def _library(spec: CompressionSpec, folder: Path) -> tuple[Path, Path]:
    """What a Python user writes: load, pool, select, (auto_)quantize, save."""
    model = diffquant.load_model(spec.model.name)
    cal = spec.calibration
    pool = diffquant.collect_pool(model, cal.trajectories, spec.sampler.steps, cal.seed)
    chosen = diffquant.select_calibration(pool, model, cal, sqnr_inputs=spec.evaluate.sqnr_inputs)
    if spec.allocation is not None:
        result = diffquant.auto_quantize(
            model,
            spec.allocation,
            chosen.calibration,
            quantize_config=spec.quantize,
            calibration=cal,
            steps=spec.sampler.steps,
            seed=spec.evaluate.seed,
            classifier=load_classifier() if model.digits_compatible else None,
            target=spec.export.target,
        )
    else:
        result = diffquant.quantize(
            model, spec.quantize, chosen.calibration, calibration=cal, target=spec.export.target
        )
    return diffquant.save_quantized(model, result.plan, folder)


@pytest.mark.parametrize(
    ("config", "extra"),
    [
        ("digits-unet-w8a8.yaml", []),
        pytest.param(
            "digits-unet-mixed-w4a8.yaml",
            [
                "allocation.weight_bits=[4, 8]",
                "allocation.group_sizes=[32]",
                "allocation.sensitivity_inputs=16",
                "allocation.content_samples=10",
            ],
            marks=pytest.mark.slow,  # a sensitivity sweep twice (minutes); run with -m slow
        ),
        ("digits-t2i-w8a8.yaml", ["quantize.outlier_tokens=1"]),
    ],
    ids=["default", "mixed-preset", "text-outlier-tokens"],
)
def test_library_path_matches_compress_byte_for_byte(isolated_home, tmp_path, config, extra):
    from diffquant.flows.compress import compress_flow

    spec = load_spec(ROOT / "configs" / config, [*FAST, *extra])
    summary = compress_flow(spec=spec.to_dict(), out_dir=str(tmp_path / "run"))
    plan_path, scales_path = _library(spec, tmp_path / "library")
    assert Path(summary["plan"]["path"]).read_bytes() == plan_path.read_bytes()
    assert Path(summary["plan"]["scales_path"]).read_bytes() == scales_path.read_bytes()
    if "outlier_tokens=1" in " ".join(extra):
        assert summary["plan"]["outlier_tokens"]["count"] == 1
        assert '"fp_tokens": 1' in plan_path.read_text()
    if spec.allocation is not None:
        assert summary["allocation"]["usage"]["avg_weight_bits"] <= 4.0 + 1e-9
