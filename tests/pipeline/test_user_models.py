"""The compress flow on users' own diffusers pipelines (tiny ones saved to tmp_path), through export.

No evaluation classifier fits these models (latents, free-form prompts), so quality falls back to
FD-free comparisons with the full-precision model, and the summary and report say so.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffquant.spec import load_spec
from diffquant.storage import load_safetensors
from tests.tiny_pipelines import save_tiny_pixart, save_tiny_sd, write_prompts

TINY = [
    "sampler.steps=5",
    "calibration.trajectories=6",
    "calibration.size=16",
    "evaluate.samples=12",
    "evaluate.sqnr_inputs=12",
    "export.parity_samples=4",
]


def run(out: Path, model: Path, prompts: Path, extra: list[str] | None = None) -> dict:
    from diffquant.flows.compress import compress_flow

    spec = load_spec(overrides=[f"model.path={model}", f"model.prompts={prompts}", *TINY, *(extra or [])])
    summary = compress_flow(spec=spec.to_dict(), out_dir=str(out))
    return json.loads(Path(summary["summary_path"]).read_text())


def assert_fd_free(saved: dict, out: Path, family: str) -> None:
    fp, q = saved["metrics"]["fp"], saved["metrics"]["quantized"]
    assert {"psnr", "ssim", "sqnr_db"} <= q.keys()
    assert not {"accuracy", "fd_real", "fd_fp"} & (fp.keys() | q.keys())
    (note,) = saved["notes"]
    assert note.startswith(f"no evaluation classifier fits this model (family {family}, latents 4x8x8)")
    assert "accuracy and FD are not computed" in note
    assert f"Note: {note}." in (out / "report.md").read_text()
    export = saved["export"]
    assert export["status"] == "exported" and export["parity"]["passed"] is True, export["parity"]
    assert Path(export["onnx"]).is_file()


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    return write_prompts(tmp_path / "prompts.txt")


def test_stable_diffusion_pipeline_compresses_and_exports(isolated_home, tmp_path, prompts):
    """In bfloat16 with classifier-free guidance 7.5 and DPM-Solver++, as SD is run (the export stays float32)."""
    guided = ["runtime.dtype=bfloat16", "sampler.guidance=7.5", "sampler.name=dpm_solver"]
    saved = run(tmp_path / "out", save_tiny_sd(tmp_path / "sd"), prompts, guided)
    assert saved["model"]["family"] == "text-unet" and saved["model"]["latent"] is True
    pool = load_safetensors(next((isolated_home / "cache" / "pools").glob("pool-*.safetensors")))
    assert pool["x"].dtype == torch.float32 and len(pool["t"]) == 2 * 6 * 5  # both halves of every step
    (parity,) = (tmp_path / "out").rglob("parity.json")
    sampling = json.loads(parity.read_text())["sampling"]
    assert (sampling["sampler"], sampling["guidance"]) == ("dpm_solver", 7.5)
    assert_fd_free(saved, tmp_path / "out", "text-unet")
    assert saved["metrics"]["quantized"]["sqnr_db"] > 10  # W8A8 stays close to FP
    plan = json.loads(Path(saved["plan"]["path"]).read_text())["layers"]
    kept = {name for name, cfg in plan.items() if cfg["weight"] is None and cfg["activation"] is None}
    assert kept == {"unet.conv_in", "unet.conv_out", "unet.time_embedding.linear_1", "unet.time_embedding.linear_2"}
    assert plan["text_encoder.encoder.layers.0.self_attn.q_proj"]["weight"]["bits"] == 8
    # registered, but the default FD gate cannot pass without FD: challenger, with the reason given
    assert saved["model"]["registered"] == "1" and saved["model"]["alias"] == "challenger"
    assert any("FD to real was not measured" in reason for reason in saved["model"]["promotion"]["reasons"])


def test_pixart_pipeline_compresses_and_exports(isolated_home, tmp_path, prompts):
    # outlier_tokens off: T5 is not causal, so no leading token state is the same for every prompt
    # (MixDQ's BOS outlier is a CLIP trait); "auto" also reads denoiser.unet, which PixArt's wrapper lacks
    extra = ["promote.register_model=false", "quantize.outlier_tokens=off"]
    saved = run(tmp_path / "out", save_tiny_pixart(tmp_path / "pixart"), prompts, extra)
    assert saved["model"]["family"] == "pixart" and saved["model"]["latent"] is True
    assert_fd_free(saved, tmp_path / "out", "pixart")
    plan = json.loads(Path(saved["plan"]["path"]).read_text())["layers"]
    assert (
        plan["transformer.proj_out"]["weight"] is None
        and plan["transformer.caption_projection.linear_1"]["weight"] is None
    )
    assert plan["text_encoder.encoder.block.0.layer.1.DenseReluDense.wo"]["weight"]["bits"] == 8
    assert plan["transformer.transformer_blocks.0.attn2.to_k"]["activation"]["bits"] == 8


def test_sdxl_mixed_precision_preset_runs_on_a_tiny_sdxl(isolated_home, tmp_path, prompts):
    """configs/sdxl-turbo-mixed-w4a8.yaml as shipped, pointed at a tiny SDXL and shrunk."""
    from diffquant.flows.compress import compress_flow
    from tests.tiny_pipelines import save_tiny_sdxl

    config = Path(__file__).resolve().parents[2] / "configs" / "sdxl-turbo-mixed-w4a8.yaml"
    spec = load_spec(
        config,
        [
            f"model.path={save_tiny_sdxl(tmp_path / 'sdxl')}",
            f"model.prompts={prompts}",
            "calibration.trajectories=3",
            "calibration.size=6",
            "evaluate.samples=10",
            "evaluate.sqnr_inputs=6",
            "export.parity_samples=2",
            "quantize.weight.observer=minmax",
            "allocation.weight_bits=[4, 8]",
            "allocation.group_sizes=[]",
            "allocation.sensitivity_inputs=2",
            "runtime.layers_per_task=256",
            "promote.register_model=false",
        ],
    )
    summary = compress_flow(spec=spec.to_dict(), out_dir=str(tmp_path / "out"))
    saved = json.loads(Path(summary["summary_path"]).read_text())
    assert saved["model"]["family"] == "sdxl"
    assert_fd_free(saved, tmp_path / "out", "sdxl")
    assert saved["allocation"]["usage"]["avg_weight_bits"] <= 4.5
    plan = json.loads(Path(saved["plan"]["path"]).read_text())["layers"]
    for name in ("unet.conv_in", "unet.add_embedding.linear_1", "unet.time_embedding.linear_2"):
        assert plan[name]["weight"]["bits"] == 8 and plan[name]["activation"]["bits"] == 8  # pinned
    assert any(cfg["weight"]["bits"] == 4 for name, cfg in plan.items() if name.startswith("text_encoder_2."))
