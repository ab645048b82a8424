"""Decoded images of latent models: the pipeline's own VAE decoding, grids of them, image-space metrics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffquant.decoding import decode_latents, decode_samples, from_8bit, to_8bit, unscale_latents
from diffquant.errors import ModelLoadError
from diffquant.evaluation import EvalResult, evaluate_model, paired_metrics
from diffquant.metrics import image_psnr_ssim, ssim_window
from diffquant.models.loading import load_model
from diffquant.models.vae import load_vae
from diffquant.report import comparison_grid, grid_layout
from diffquant.sampling import initial_noise, run_sampler
from diffquant.spec import SamplerSpec
from tests.tiny_pipelines import PROMPTS, save_tiny_sd, write_prompts

STEPS = 2


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sd")
    return save_tiny_sd(root / "sd"), write_prompts(root / "prompts.txt")


@pytest.fixture(scope="module")
def model(sd):
    folder, prompts = sd
    return load_model(path=folder, prompts=prompts)


def test_samples_decode_to_the_images_the_diffusers_pipeline_returns(sd, model):
    """Sampling and decoding from the same latents give StableDiffusionPipeline's own output images."""
    import diffusers

    folder, _ = sd
    assert model.vae_dir == folder / "vae"
    n = 2
    noise = initial_noise(n, model.sample_shape, 0)
    sampler = SamplerSpec(name="ddim", steps=STEPS, guidance=7.5)
    ids = model.prompts.tokenize(list(PROMPTS[:n]))
    latents, _ = run_sampler(
        model.unet, model.scheduler_config, noise, ids, sampler, clamp=False, null=model.null_conditions(n)
    )
    ours = decode_samples(model, latents, batch_size=1)  # one by one: the batching must not matter
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True, safety_checker=None)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        list(PROMPTS[:n]), num_inference_steps=STEPS, guidance_scale=7.5, latents=noise.clone(), output_type="pil"
    ).images
    theirs = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2)
    assert ours.dtype == torch.uint8 and ours.shape == theirs.shape == (n, 3, 16, 16)
    # (x / 2 + 0.5) * 255 and (x + 1) * 127.5 may round a half level apart
    assert (ours.int() - theirs.int()).abs().max() <= 1
    assert (ours != theirs).float().mean() < 0.01
    assert ours.float().std() > 1  # not a constant image


def test_decoding_is_vae_decode_of_the_unscaled_latents(model):
    vae = load_vae(model.vae_dir)
    latents = torch.randn((5, *model.sample_shape), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(decode_latents(vae, latents, batch_size=2), expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(decode_samples(model, latents, 5), to_8bit(expected))
    assert torch.equal(to_8bit(from_8bit(to_8bit(expected))), to_8bit(expected))


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"scaling_factor": 0.5}, lambda z: z / 0.5),
        ({"scaling_factor": 1.5305, "shift_factor": 0.0609}, lambda z: z / 1.5305 + 0.0609),  # SD3's VAE
        (
            {"scaling_factor": 0.5, "latents_mean": [0.1, -0.2], "latents_std": [2.0, 3.0]},
            lambda z: z * torch.tensor([2.0, 3.0]).view(1, 2, 1, 1) / 0.5 + torch.tensor([0.1, -0.2]).view(1, 2, 1, 1),
        ),
    ],
)
def test_latent_scaling_is_inverted_as_the_pipelines_do(config, expected):
    z = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    namespace = SimpleNamespace(**{"shift_factor": None, "latents_mean": None, "latents_std": None, **config})
    torch.testing.assert_close(unscale_latents(z, namespace), expected(z))


def test_evaluation_compares_decoded_images_and_keeps_latent_metrics(model):
    sampler = SamplerSpec(steps=2)
    fp = evaluate_model(model, 4, sampler, seed=0, batch_size=4, classifier=None, real_images=None)
    other = evaluate_model(model, 4, sampler, seed=1, batch_size=4, classifier=None, real_images=None, fp=fp)
    assert fp.images is not None and fp.images.shape == (4, 3, 16, 16)
    vae = load_vae(model.vae_dir)
    with torch.no_grad():
        ref = to_8bit(vae.decode(fp.samples / vae.config.scaling_factor).sample)
        img = to_8bit(vae.decode(other.samples / vae.config.scaling_factor).sample)
    assert torch.equal(fp.images, ref) and torch.equal(other.images, img)
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    kernel, sigma = ssim_window(16, 16)
    metrics = other.metrics
    assert metrics["psnr"] == pytest.approx(float(peak_signal_noise_ratio(img.float(), ref.float(), data_range=255.0)))
    expected_ssim = structural_similarity_index_measure(
        img.float(), ref.float(), data_range=255.0, kernel_size=kernel, sigma=sigma
    )
    assert metrics["ssim"] == pytest.approx(float(expected_ssim), abs=1e-5)
    latent_range = float(fp.samples.max() - fp.samples.min())
    expected_latent = peak_signal_noise_ratio(other.samples, fp.samples, data_range=latent_range)
    assert metrics["psnr_latent"] == pytest.approx(float(expected_latent))
    assert {"ssim_latent", "decoding_seconds"} <= metrics.keys()
    # an FP result without stored images (an older run's) is decoded on the fly to the same numbers
    again = paired_metrics(model, EvalResult(fp.samples, None), other.samples, other.images, batch_size=3)
    assert again == pytest.approx({k: metrics[k] for k in ("psnr", "ssim", "psnr_latent", "ssim_latent")})


def test_image_psnr_ssim_batches_agree_with_the_whole_set():
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (7, 3, 40, 40), dtype=torch.uint8, generator=generator)
    b = (a.int() + torch.randint(-9, 10, a.shape, generator=generator)).clamp(0, 255).to(torch.uint8)
    whole = image_psnr_ssim(a, b, 7)
    assert image_psnr_ssim(a, b, 2) == pytest.approx(whole)
    assert ssim_window(40, 40) == (11, 1.5) and ssim_window(16, 16) == (5, 1.0)
    assert image_psnr_ssim(a, a, 3)[0] == float("inf")
    with pytest.raises(ValueError, match="shapes differ"):
        image_psnr_ssim(a, b[:, :, :20], 3)


def test_the_grid_shows_both_image_sets_at_their_pixels_with_titles(tmp_path, model):
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    left = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8, generator=generator)
    right = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8, generator=generator)
    path = comparison_grid(left, right, tmp_path / "grid.png", ("full precision", "quantized: W8A8"))
    grid = np.asarray(Image.open(path))
    per_row, rows, upscale = grid_layout(16, 16)
    assert (per_row, rows, upscale) == (10, 4, 3)
    title = 16
    half = (per_row * 17 + 1) * upscale
    for i in (0, 11):
        r, c = divmod(i, per_row)
        y, x = title + (1 + r * 17) * upscale, (1 + c * 17) * upscale
        shown = grid[y : y + 16 * upscale : upscale, x : x + 16 * upscale : upscale]
        assert np.array_equal(shown, left[i].permute(1, 2, 0).numpy())
        x += half + 3 * upscale
        shown = grid[y : y + 16 * upscale : upscale, x : x + 16 * upscale : upscale]
        assert np.array_equal(shown, right[i].permute(1, 2, 0).numpy())
    assert (grid[:title] < 128).any(), "no title drawn"
    assert grid_layout(512, 512) == (2, 2, 1) and grid_layout(8, 8) == (10, 4, 6)


def test_a_broken_vae_folder_is_refused_when_the_pipeline_is_opened(tmp_path, sd):
    from diffusers import AutoencoderKL

    folder, prompts = sd
    broken = tmp_path / "sd"
    shutil.copytree(folder, broken)
    config = json.loads((broken / "vae" / "config.json").read_text())
    other = AutoencoderKL.from_config({**config, "latent_channels": 8})
    other.save_pretrained(str(broken / "vae"), safe_serialization=True)  # consistent, but for 8-channel latents
    with pytest.raises(ModelLoadError, match="latent_channels is 8, but the denoiser's samples have 4"):
        load_model(path=broken, prompts=prompts)
    shutil.copytree(folder / "vae", broken / "vae", dirs_exist_ok=True)
    (broken / "vae" / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
    with pytest.raises(ModelLoadError, match="not a diffusers autoencoder"):
        load_model(path=broken, prompts=prompts)
    (broken / "vae" / "config.json").write_text(json.dumps(config))
    weights = broken / "vae" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_name("diffusion_pytorch_model.bin"))
    with pytest.raises(ModelLoadError, match="pickle checkpoint"):
        load_model(path=broken, prompts=prompts)
    shutil.rmtree(broken / "vae")
    undecoded = load_model(path=broken, prompts=prompts)
    assert undecoded.latent and undecoded.vae_dir is None
    result = evaluate_model(undecoded, 2, SamplerSpec(steps=2), 0, 2, None, None)
    result = evaluate_model(undecoded, 2, SamplerSpec(steps=2), 1, 2, None, None, fp=result)
    assert result.images is None and {"psnr_latent", "ssim_latent"} <= result.metrics.keys()
    assert not {"psnr", "ssim", "decoding_seconds"} & result.metrics.keys()


@pytest.mark.gpu
def test_on_a_gpu_in_float16_a_force_upcast_vae_decodes_in_float32_to_the_cpu_images(sd, model):
    from diffquant.decoding import load_decoder
    from diffquant.placement import module_placement

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    folder, prompts = sd
    on_gpu = load_model(path=folder, prompts=prompts, device="cuda", dtype="float16")
    vae = load_decoder(on_gpu)
    assert vae.config.force_upcast and module_placement(vae) == (torch.device("cuda", 0), torch.float32)
    latents = torch.randn((6, *model.sample_shape), generator=torch.Generator().manual_seed(5))
    difference = (decode_samples(on_gpu, latents, 4, vae).int() - decode_samples(model, latents, 4).int()).abs()
    assert difference.max() <= 1
