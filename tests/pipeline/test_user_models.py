"""The compress flow on users' own diffusers pipelines (tiny ones saved to tmp_path), through export.

No evaluation classifier fits these models (latents, free-form prompts), so quality falls back to
FD-free comparisons with the full-precision model, and the summary and report say so. Samples are
decoded by each pipeline's VAE: the grid shows images, and PSNR/SSIM compare them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffquant.decoding import decode_samples
from diffquant.models.loading import load_model
from diffquant.spec import load_spec
from diffquant.storage import load_safetensors
from tests.tiny_pipelines import save_tiny_clip, save_tiny_pixart, save_tiny_sd, write_prompts

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


def assert_fd_free(saved: dict, out: Path, family: str, clip: bool = False) -> None:
    fp, q = saved["metrics"]["fp"], saved["metrics"]["quantized"]
    assert {"psnr", "ssim", "psnr_latent", "ssim_latent", "sqnr_db"} <= q.keys()
    assert not {"accuracy", "fd_real", "fd_fp"} & (fp.keys() | q.keys())
    (note,) = saved["notes"]
    assert note.startswith(f"no evaluation classifier fits this model (family {family}, latents 4x8x8)")
    assert "PSNR/SSIM of the decoded images and of the latents" in note
    assert "accuracy and FD are not computed" in note
    report = (out / "report.md").read_text()
    assert f"Note: {note}." in report
    assert_decoded(saved, out, report, clip)


def assert_decoded(saved: dict, out: Path, report: str, clip: bool) -> None:
    """Samples are decoded by the VAE: stored images, a titled grid of them, and the metrics say which space is which."""
    from PIL import Image

    from diffquant.report import TITLE_HEIGHT, grid_layout

    evaluation = saved["evaluation"]
    assert evaluation["images"] == "decoded"
    assert "decoded by the VAE" in evaluation["metrics"]["psnr"] and "latents" in evaluation["metrics"]["psnr_latent"]
    assert set(evaluation["not_computed"]) == {"accuracy", "fd_real", "fd_fp"} | (set() if clip else {"clip_score"})
    stored = [load_safetensors(Path(saved["samples"][k])) for k in ("fp", "quantized")]
    for data in stored:
        n = data["samples"].shape[0]
        assert data["images"].dtype == torch.uint8 and data["images"].shape == (n, 3, 16, 16)
    per_row, rows, upscale = grid_layout(16, 16)
    width = 2 * (per_row * 17 + 1) * upscale + 3 * upscale
    height = (min(rows, -(-n // per_row)) * 17 + 1) * upscale + TITLE_HEIGHT
    grid = Image.open(saved["samples"]["grid"])
    assert grid.size == (width, height) and grid.mode == "RGB"
    assert "](samples/fp_vs_quantized.png)" in report and "decoded images from the same noise" in report
    assert "| psnr_latent | latents vs" in report
    if not clip:
        assert "clip_score (evaluate.clip_model is not set" in report
    export = saved["export"]
    assert export["status"] == "exported" and export["parity"]["passed"] is True, export["parity"]
    assert Path(export["onnx"]).is_file()


def assert_clip_scores(saved: dict, clip: Path, prompts: Path) -> None:
    """Each stage's clip_score is the CLIP score of its stored decoded images against the evaluation prompts."""
    from diffquant.clip_score import load_clip
    from diffquant.models.prompts import read_prompts_file

    scorer = load_clip(clip)
    texts = [p.text for p in read_prompts_file(prompts)]
    for stage in ("fp", "quantized"):
        images = load_safetensors(Path(saved["samples"][stage]))["images"]
        expected = scorer.score(images, [texts[i % len(texts)] for i in range(images.shape[0])], 4)
        assert saved["metrics"][stage]["clip_score"] == pytest.approx(expected, abs=1e-6) and expected > 1


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    return write_prompts(tmp_path / "prompts.txt")


def test_stable_diffusion_pipeline_compresses_and_exports(isolated_home, tmp_path, prompts):
    """In bfloat16 with classifier-free guidance 7.5 and DPM-Solver++, as SD is run (the export stays float32);
    samples decoded by the VAE and scored by a (tiny, local) CLIP."""
    clip = save_tiny_clip(tmp_path / "clip")
    guided = [
        "runtime.dtype=bfloat16",
        "sampler.guidance=7.5",
        "sampler.name=dpm_solver",
        f"evaluate.clip_model={clip}",
    ]
    sd = save_tiny_sd(tmp_path / "sd")
    saved = run(tmp_path / "out", sd, prompts, guided)
    assert saved["model"]["family"] == "text-unet" and saved["model"]["latent"] is True
    pool = load_safetensors(next((isolated_home / "cache" / "pools").glob("pool-*.safetensors")))
    assert pool["x"].dtype == torch.float32 and len(pool["t"]) == 2 * 6 * 5  # both halves of every step
    (parity,) = (tmp_path / "out").rglob("parity.json")
    sampling = json.loads(parity.read_text())["sampling"]
    assert (sampling["sampler"], sampling["guidance"]) == ("dpm_solver", 7.5)
    assert_fd_free(saved, tmp_path / "out", "text-unet", clip=True)
    assert saved["metrics"]["quantized"]["sqnr_db"] > 10  # W8A8 stays close to FP
    assert_clip_scores(saved, clip, prompts)
    # the stored images are the VAE's decoding of the stored latents (the run decoded in bfloat16)
    model = load_model(path=sd, prompts=prompts)
    for stage in ("fp", "quantized"):
        data = load_safetensors(Path(saved["samples"][stage]))
        difference = (data["images"].int() - decode_samples(model, data["samples"], 4).int()).abs()
        assert difference.max() <= 8 and difference.float().mean() < 1, (difference.max(), difference.float().mean())
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
