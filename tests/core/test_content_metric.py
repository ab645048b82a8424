"""The content metric without a classifier (MixDQ's SSIM of final samples) and each family's content layers."""

import pytest
import torch

from diffquant.calibration.pool import collect_pool, subset
from diffquant.errors import ConfigError
from diffquant.metrics import ssim
from diffquant.mixed_precision.allocate import check_allocation, measure_allocation_sensitivity
from diffquant.mixed_precision.content import REFERENCE_CONTENT_METRIC, content_layers, content_metric
from diffquant.mixed_precision.sensitivity import quantize_only
from diffquant.models.families import FAMILIES, matching_layers
from diffquant.models.loading import load_local_model
from diffquant.quant.plan import quantizable_layers
from diffquant.sampling import initial_noise, run_sampler
from diffquant.spec import AllocationSpec

STEPS = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.conftest import tiny_calibrated

    return tiny_calibrated(tmp_path_factory.mktemp("m"), trajectories=2, steps=STEPS, inputs=8)


def test_ssim_content_rows_without_a_classifier_match_the_oracle(tiny):
    model, calib = tiny
    names = quantizable_layers(model.unet)
    scored = {n for n in names if n.endswith("time_emb_proj")}
    assert content_layers(model, AllocationSpec()) == scored  # unset: the unet2d family's layers
    layer, other = sorted(scored)[0], "down_blocks.0.resnets.0.conv1"
    config = AllocationSpec(weight_bits=[2, 8], group_sizes=[], content_samples=10)
    table = measure_allocation_sensitivity(model, calib, config, layers=[layer, other], steps=STEPS, seed=0)
    assert all(r["content"] is None for r in table.rows if r["layer"] == other)
    # oracle: 1 - SSIM of final samples with only that layer quantized, against FP, from the probe's noise (seed + 1)
    labels, _ = model.conditions(10, "calibration")
    noise = initial_noise(10, model.sample_shape, 1)

    def sample(unet):
        return run_sampler(unet, model.scheduler_config, noise, labels, STEPS, null=model.null_conditions(10))[0]

    fp = sample(model.unet)
    with torch.no_grad(), quantize_only(model.unet, layer, 2, None):
        expected = 1.0 - ssim(fp, sample(model.unet))
    assert table.content(layer, "weight", 2) == pytest.approx(expected, abs=1e-6)
    assert table.content(layer, "weight", 2) > table.content(layer, "weight", 8) >= 0.0


def test_content_metric_resolution_and_bad_input(tiny):
    model, _ = tiny
    assert content_metric(AllocationSpec(), model, classifier=False) == "ssim"
    assert content_metric(AllocationSpec(), model, classifier=True) == REFERENCE_CONTENT_METRIC  # a digits model
    with pytest.raises(ConfigError, match="content_metric: classifier_kl needs a model the evaluation classifier"):
        content_metric(AllocationSpec(content_metric="classifier_kl"), model, classifier=False)
    with pytest.raises(ConfigError, match=r"content_layers: pattern 'nope\.\*' matches no quantizable layer"):
        check_allocation(model, AllocationSpec(content_layers=["nope.*"]), classifier_fits=True)
    assert content_layers(model, AllocationSpec(content_layers=[])) == set()
    check_allocation(model, AllocationSpec(), classifier_fits=False)  # family defaults never fail


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("unet2d", {"down.resnets.0.time_emb_proj"}),
        ("dit", {"transformer_blocks.0.norm1.linear", "transformer_blocks.0.ff.net.0.proj"}),
        ("text-unet", {"unet.mid.attn2.to_k", "unet.mid.attn2.to_out.0", "unet.mid.ff.net.2"}),
        ("sdxl", {"unet.mid.attn2.to_k", "unet.mid.attn2.to_out.0", "unet.mid.ff.net.2"}),
        ("pixart", {"transformer.transformer_blocks.0.attn2.to_v", "transformer.transformer_blocks.0.ff.net.2"}),
    ],
)
def test_family_content_layers_are_mixdq_s_groups(family, expected):
    names = [
        "conv_in",
        "down.resnets.0.time_emb_proj",
        "transformer_blocks.0.norm1.linear",
        "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1",
        "transformer_blocks.0.attn1.to_q",
        "transformer_blocks.0.ff.net.0.proj",
        "unet.mid.attn1.to_k",
        "unet.mid.attn2.to_k",
        "unet.mid.attn2.to_out.0",
        "unet.mid.ff.net.2",
        "text_encoder.encoder.layers.0.mlp.fc1",
        "transformer.transformer_blocks.0.attn2.to_v",
        "transformer.transformer_blocks.0.ff.net.2",
    ]
    assert matching_layers(FAMILIES[family].content_layers, names) == expected


def test_latent_models_are_scored_on_latents(tmp_path):
    from tests.tiny_pipelines import save_tiny_sd, write_prompts

    model = load_local_model(save_tiny_sd(tmp_path / "sd"), prompts_file=write_prompts(tmp_path / "p.txt"))
    assert model.latent and not model.digits_compatible
    layer = sorted(content_layers(model, AllocationSpec()))[0]
    assert ".attn2." in layer or ".ff." in layer
    pool = collect_pool(model, trajectories=1, steps=2, seed=0)
    config = AllocationSpec(weight_bits=[2], group_sizes=[], content_samples=10)
    table = measure_allocation_sensitivity(model, subset(pool, torch.arange(2)), config, layers=[layer], steps=2)
    value = table.content(layer, "weight", 2)
    assert 0.0 < value < 2.0
