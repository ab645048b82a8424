"""Classifier-free guidance and the schedulers, against diffusers' own pipeline loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffquant.calibration.pool import collect_pool
from diffquant.errors import ConfigError
from diffquant.models.loading import load_model
from diffquant.sampling import SCHEDULERS, initial_noise, run_sampler
from diffquant.spec import SamplerSpec
from tests.conftest import save_tiny_unet
from tests.tiny_pipelines import PROMPTS, save_tiny_sd, write_prompts

STEPS = 4


@pytest.fixture(scope="module")
def digits():
    return load_model("digits-unet")


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sd")
    return save_tiny_sd(root / "sd"), write_prompts(root / "prompts.txt")


def _pipeline_latents(folder: Path, name: str, noise: torch.Tensor, guidance: float) -> torch.Tensor:
    """What ``StableDiffusionPipeline`` returns (``output_type="latent"``) with diffquant's scheduler choice."""
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True, safety_checker=None)
    if name != "from_model":
        pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        list(PROMPTS[: noise.shape[0]]),
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        latents=noise.clone(),
        output_type="latent",
    ).images


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm_solver", "from_model"])
def test_guided_sampling_matches_the_diffusers_pipeline(sd, name):
    folder, prompts = sd
    model = load_model(path=folder, prompts=prompts)
    n = 3
    ids = model.prompts.tokenize(list(PROMPTS[:n]))
    noise = initial_noise(n, model.sample_shape, 0)
    sampler = SamplerSpec(name=name, steps=STEPS, guidance=7.5)
    ours, _ = run_sampler(
        model.unet, model.scheduler_config, noise, ids, sampler, clamp=False, null=model.null_conditions(n)
    )
    theirs = _pipeline_latents(folder, name, noise, 7.5)
    # diffquant encodes the conditional and unconditional prompts in one batch, diffusers encodes them
    # apart: float32 rounding of the two text-encoder batches differs by ~1e-7, and guidance 7.5 scales
    # the conditional branch by 8.5, which gave 1.6-1.7e-5 on 2 of 768 elements on some CPUs (DDIM and
    # DPM-Solver++); unguided sampling is checked at 1e-5 below
    torch.testing.assert_close(ours, theirs, atol=5e-5, rtol=1e-5)
    plain, _ = run_sampler(model.unet, model.scheduler_config, noise, ids, SamplerSpec(name=name, steps=STEPS))
    assert (plain - ours).abs().max() > 1e-3  # guidance changed the samples


def test_unguided_sampling_matches_the_pipeline_at_guidance_one(sd):
    folder, prompts = sd
    model = load_model(path=folder, prompts=prompts)
    noise = initial_noise(2, model.sample_shape, 1)
    ids = model.prompts.tokenize(list(PROMPTS[:2]))
    sampler = SamplerSpec(name="euler", steps=STEPS)
    ours, _ = run_sampler(model.unet, model.scheduler_config, noise, ids, sampler, clamp=False)
    torch.testing.assert_close(ours, _pipeline_latents(folder, "euler", noise, 1.0), atol=1e-5, rtol=1e-5)


def test_a_step_count_is_unguided_ddim(digits):
    noise = initial_noise(4, digits.sample_shape, 0)
    labels, _ = digits.conditions(4)
    a, _ = run_sampler(digits.unet, digits.scheduler_config, noise, labels, 3)
    b, _ = run_sampler(digits.unet, digits.scheduler_config, noise, labels, SamplerSpec(name="ddim", steps=3))
    assert torch.equal(a, b)


def test_guided_pool_holds_both_halves_and_batches_stay_within_the_batch_size(digits):
    calls: list[int] = []

    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, t, y):
            calls.append(x.shape[0])
            return self.inner(x, t, y)

    labels, _ = digits.conditions(5)
    sampler = SamplerSpec(steps=2, guidance=3.0)
    _, traj = run_sampler(
        Counting(digits.unet),
        digits.scheduler_config,
        initial_noise(5, digits.sample_shape, 0),
        labels,
        sampler,
        batch_size=4,
        record=True,
        null=digits.null_conditions(5),
    )
    assert max(calls) <= 4 and sum(calls) == 2 * 5 * 2
    assert len(traj) == 2 * 5 * 2
    first = traj.labels[:4]  # the first forward: 2 samples, unconditional half first
    assert first[:2].tolist() == [digits.null_class] * 2 and first[2:].tolist() == labels[:2].tolist()
    assert digits.null_class == 10
    pool = collect_pool(digits, trajectories=2, steps=sampler, seed=0)
    assert len(pool) == 2 * 2 * 2 and (pool.labels == digits.null_class).sum() == 4


def test_guidance_without_a_null_condition_is_refused(tmp_path):
    folder = save_tiny_unet(tmp_path / "unet", num_class_embeds=10)  # 10 classes, no spare embedding
    (folder / "diffquant.json").write_text('{"num_classes": 10}')
    model = load_model(path=folder)
    assert model.null_class is None and model.null_conditions(2) is None
    labels, _ = model.conditions(2)
    with pytest.raises(ConfigError, match="guidance: 3 needs a model with a null condition"):
        run_sampler(
            model.unet, model.scheduler_config, torch.zeros(2, *model.sample_shape), labels, SamplerSpec(guidance=3)
        )


def test_spare_class_embedding_is_the_null_class(tmp_path):
    folder = save_tiny_unet(tmp_path / "unet", num_class_embeds=11)
    (folder / "diffquant.json").write_text('{"num_classes": 10}')
    assert load_model(path=folder).null_class == 10


def test_from_model_needs_a_diffusers_scheduler(digits):
    config = dict(digits.scheduler_config, _class_name="NotAScheduler")
    with pytest.raises(ConfigError, match="name: from_model: the model's scheduler config names 'NotAScheduler'"):
        run_sampler(digits.unet, config, torch.zeros(1, *digits.sample_shape), None, SamplerSpec(name="from_model"))


def test_clip_sample_auto_turns_ddim_clipping_off_only_when_guided(digits):
    """Auto keeps the model's clipping unguided and drops it guided; true/false force it; auto is not serialized."""
    import dataclasses

    from diffquant.sampling import sampling_scheduler_config

    clipping = {**digits.scheduler_config, "clip_sample": True}
    assert sampling_scheduler_config(SamplerSpec(), clipping)["clip_sample"] is True
    assert sampling_scheduler_config(SamplerSpec(guidance=2.0), clipping)["clip_sample"] is False
    assert sampling_scheduler_config(SamplerSpec(guidance=2.0, clip_sample=True), clipping)["clip_sample"] is True
    assert sampling_scheduler_config(SamplerSpec(clip_sample=False), clipping)["clip_sample"] is False
    assert (
        "clip_sample" not in SamplerSpec().model_dump()
        and SamplerSpec(clip_sample=False).model_dump()["clip_sample"] is False
    )

    model = dataclasses.replace(digits, scheduler_config=clipping)
    noise = initial_noise(4, model.sample_shape, 0)
    labels, null = torch.arange(4), model.null_conditions(4)

    def sample(**kw):
        return run_sampler(
            model.unet, model.scheduler_config, noise, labels, SamplerSpec(steps=STEPS, guidance=4.0, **kw), null=null
        )[0]

    auto = sample()
    assert torch.equal(auto, sample(clip_sample=False))
    assert not torch.allclose(auto, sample(clip_sample=True), atol=1e-3)  # clipping changes guided samples
