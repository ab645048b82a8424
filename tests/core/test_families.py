"""Users' own diffusers models: family detection, family defaults and wrappers that match diffusers' pipelines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from diffquant.errors import ModelLoadError
from diffquant.models.families import FAMILIES, family_for
from diffquant.models.loading import load_model
from diffquant.ptq import plan_from_spec
from diffquant.quant.plan import quantizable_layers
from diffquant.spec import QuantizeSpec
from tests.conftest import save_tiny_unet
from tests.tiny_pipelines import (
    LATENT_CHANNELS,
    LATENT_SIZE,
    PROMPTS,
    save_tiny_dit,
    save_tiny_pixart,
    save_tiny_sd,
    save_tiny_sdxl,
    write_prompts,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """The tiny pipelines and a prompts file, saved once for the module (tests copy before editing)."""
    root = tmp_path_factory.mktemp("pipelines")
    return {
        "sd": save_tiny_sd(root / "sd"),
        "pixart": save_tiny_pixart(root / "pixart"),
        "sdxl": save_tiny_sdxl(root / "sdxl"),
        "prompts": write_prompts(root / "prompts.txt"),
    }


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def _fp_layers(model) -> set[str]:
    plan = plan_from_spec(model, QuantizeSpec())
    return {name for name, cfg in plan.items() if cfg.is_full_precision}


# --- Stable Diffusion 1.x -------------------------------------------------------------------


def test_sd_pipeline_is_a_latent_text_unet_with_family_defaults(saved):
    model = load_model(path=saved["sd"], prompts=saved["prompts"])
    assert (model.family, model.condition, model.latent) == ("text-unet", "text", True)
    assert model.sample_shape == (LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE) and not model.digits_compatible
    assert model.scheduler_config["clip_sample"] is False  # SD's config says so; DDIM would clip otherwise
    names = quantizable_layers(model.unet)
    assert any(n.startswith("text_encoder.") for n in names) and any(n.startswith("unet.") for n in names)
    assert _fp_layers(model) == {
        "unet.conv_in",
        "unet.conv_out",
        "unet.time_embedding.linear_1",
        "unet.time_embedding.linear_2",
    }
    assert model.unet.get_submodule(model.family_info.feature_module) is model.unet.unet.mid_block.resnets[0]
    ids, labels = model.conditions(4, "evaluation")
    assert ids.shape == (4, 16) and labels is None
    assert model.unet(torch.randn(4, *model.sample_shape), torch.full((4,), 10), ids).sample.shape == (4, 4, 8, 8)


def test_sd_prompts_and_encoder_states_match_diffusers_pipeline(saved):
    from diffusers import StableDiffusionPipeline

    model = load_model(path=saved["sd"], prompts=saved["prompts"])
    pipe = StableDiffusionPipeline.from_pretrained(str(saved["sd"]), local_files_only=True)
    ids, _ = model.conditions(len(PROMPTS), "calibration")
    expected_ids = pipe.tokenizer(
        list(PROMPTS), padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True
    ).input_ids
    assert ids.tolist() == expected_ids
    embeds, _ = pipe.encode_prompt(list(PROMPTS), "cpu", 1, do_classifier_free_guidance=False)
    with torch.no_grad():
        torch.testing.assert_close(model.unet.encode(ids), embeds)


def test_sd_without_prompts_names_model_prompts(saved):
    with pytest.raises(ModelLoadError, match=r"model\.prompts"):
        load_model(path=saved["sd"])


def test_sd_pickle_weights_refused(saved, tmp_path):
    pipe = _copy(saved["sd"], tmp_path)
    (pipe / "text_encoder" / "model.safetensors").unlink()
    torch.save({"w": torch.ones(1)}, pipe / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(path=pipe, prompts=saved["prompts"])
    pipe = _copy(saved["sd"], tmp_path / "again")
    weights = pipe / "unet" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    torch.save({"w": torch.ones(1)}, weights.with_suffix(".bin"))
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(path=pipe, prompts=saved["prompts"])


def test_sd_missing_tokenizer_is_named(saved, tmp_path):
    pipe = _copy(saved["sd"], tmp_path)
    shutil.rmtree(pipe / "tokenizer")
    index = json.loads((pipe / "model_index.json").read_text())
    index["tokenizer"] = [None, None]
    (pipe / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_model(path=pipe, prompts=saved["prompts"])


# --- PixArt ---------------------------------------------------------------------------------


def test_pixart_pipeline_family_and_defaults(saved):
    model = load_model(path=saved["pixart"], prompts=saved["prompts"])
    assert (model.family, model.condition, model.latent) == ("pixart", "text", True)
    assert model.sample_shape == (LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)
    assert model.scheduler_config["clip_sample"] is False  # DPM-Solver's config does not set it
    names = quantizable_layers(model.unet)
    assert any(n.startswith("text_encoder.encoder.block.") for n in names)
    assert any(n.startswith("transformer.transformer_blocks.") for n in names)
    assert _fp_layers(model) == {
        "transformer.pos_embed.proj",
        "transformer.proj_out",
        "transformer.adaln_single.emb.timestep_embedder.linear_1",
        "transformer.adaln_single.emb.timestep_embedder.linear_2",
        "transformer.adaln_single.linear",
        "transformer.caption_projection.linear_1",
        "transformer.caption_projection.linear_2",
    }
    assert model.unet.get_submodule(model.family_info.feature_module) is model.unet.transformer.norm_out


def test_pixart_matches_diffusers_pipeline_and_halves_learned_sigma(saved):
    from diffusers import PixArtAlphaPipeline

    model = load_model(path=saved["pixart"], prompts=saved["prompts"])
    pipe = PixArtAlphaPipeline.from_pretrained(str(saved["pixart"]), local_files_only=True)
    prompts = [p.upper() for p in PROMPTS]  # the pipeline lower-cases prompts; so must diffquant
    ids = model.prompts.tokenize(prompts)
    assert (ids == 0).any() and (ids != 0).all(dim=1).any()  # some prompts padded, some truncated
    embeds, mask, _, _ = pipe.encode_prompt(
        prompts, do_classifier_free_guidance=False, device="cpu", clean_caption=False, max_sequence_length=16
    )
    wrapper = model.unet
    assert torch.equal(wrapper.attention_mask(ids), mask)
    sample, t = torch.randn(len(prompts), 4, 8, 8), torch.tensor([999, 700, 500, 300, 100, 1])
    with torch.no_grad():
        torch.testing.assert_close(wrapper.encode(ids), embeds)
        full = pipe.transformer(
            sample,
            encoder_hidden_states=embeds,
            encoder_attention_mask=mask,
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample
        out = wrapper(sample, t, ids).sample
    assert full.shape[1] == 2 * LATENT_CHANNELS and out.shape == sample.shape
    torch.testing.assert_close(out, full[:, :LATENT_CHANNELS])


def test_pixart_resolution_conditions_match_the_transformer_call():
    """PixArt-alpha 1024 px takes resolution and aspect ratio: H, W = 8 x the latent size."""
    from diffusers import PixArtTransformer2DModel

    from diffquant.models.denoisers import PixArtDenoiser
    from tests.tiny_pipelines import t5_tokenizer

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=24,  # the size embeddings take a third of the width each
        cross_attention_dim=48,
        caption_channels=32,
        use_additional_conditions=True,
    ).eval()
    from transformers import T5Config, T5EncoderModel

    encoder = T5EncoderModel(T5Config(vocab_size=90, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)).eval()
    wrapper = PixArtDenoiser(encoder, transformer, pad_token_id=0)
    ids = torch.tensor(t5_tokenizer()(["a cat", "rain at night"], padding="max_length", max_length=16).input_ids)
    sample, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    added = {"resolution": torch.tensor([[64.0, 64.0]] * 2), "aspect_ratio": torch.tensor([[1.0]] * 2)}
    with torch.no_grad():
        hidden = wrapper.encode(ids)
        expected = transformer(
            sample,
            encoder_hidden_states=hidden,
            encoder_attention_mask=wrapper.attention_mask(ids),
            timestep=t,
            added_cond_kwargs=added,
        ).sample
        torch.testing.assert_close(wrapper(sample, t, ids).sample, expected)
        plain = transformer(
            sample,
            encoder_hidden_states=hidden,
            encoder_attention_mask=wrapper.attention_mask(ids),
            timestep=t,
            added_cond_kwargs={"resolution": added["resolution"] * 2, "aspect_ratio": added["aspect_ratio"]},
        ).sample
    assert not torch.allclose(plain, expected)  # the resolution really enters the output


@pytest.mark.parametrize("feed_forward", ["relu", "gated-gelu"])
def test_t5_feed_forward_replacement_keeps_names_and_outputs(feed_forward):
    import copy

    from transformers import T5Config, T5EncoderModel

    from diffquant.models.denoisers import T5FeedForward, replace_t5_feed_forwards

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, feed_forward_proj=feed_forward
    )
    original = T5EncoderModel(config).eval()
    swapped = copy.deepcopy(original)
    assert replace_t5_feed_forwards(swapped) == 2
    assert quantizable_layers(swapped) == quantizable_layers(original)
    assert isinstance(swapped.get_submodule("encoder.block.1.layer.1.DenseReluDense"), T5FeedForward)
    ids = torch.randint(1, 50, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(swapped(ids).last_hidden_state, original(ids).last_hidden_state)


def test_pixart_w8a8_exports_and_matches_onnxruntime(saved, tmp_path):
    from diffquant.calibration.pool import collect_pool, subset
    from diffquant.calibration.selection import select
    from diffquant.export.onnx import export_onnx
    from diffquant.export.parity import ParityConfig, check_parity
    from diffquant.export.rules import check_rules
    from diffquant.spec import CalibrationSpec

    model = load_model(path=saved["pixart"], prompts=saved["prompts"])
    pool = collect_pool(model, trajectories=3, steps=4, seed=0)
    calib = subset(pool, select(pool, "random", 12, 0))
    plan = plan_from_spec(model, QuantizeSpec())
    from diffquant.ptq import quantize_model

    quantized = quantize_model(model, plan, calib, CalibrationSpec())
    info = export_onnx(quantized, plan, tmp_path / "pixart.onnx")
    assert info.quantized_layers == len(plan.quantized_layers()) > 30
    assert check_rules(info.path, plan) == []
    report = check_parity(info.path, quantized, calib, ParityConfig(samples=3, steps=4))
    assert report.passed, report.failures()
    assert report.outputs.mean_abs < 1e-4 and report.outputs.fraction_over == 0.0


# --- SDXL -----------------------------------------------------------------------------------


def test_sdxl_pipeline_matches_diffusers_encode_prompt_and_time_ids(saved):
    from diffusers import StableDiffusionXLPipeline

    model = load_model(path=saved["sdxl"], prompts=saved["prompts"])
    assert (model.family, model.condition, model.latent) == ("sdxl", "text", True)
    assert "unet.add_embedding.linear_1" in _fp_layers(model)
    names = quantizable_layers(model.unet)
    assert any(n.startswith("text_encoder_2.") for n in names)
    assert not any(n.startswith("text_encoder.encoder.layers.1.") for n in names)  # encoder 1's unused last layer
    pipe = StableDiffusionXLPipeline.from_pretrained(str(saved["sdxl"]), local_files_only=True)
    ids, _ = model.conditions(len(PROMPTS), "calibration")
    assert ids.shape == (len(PROMPTS), 32)
    embeds, _, pooled, _ = pipe.encode_prompt(list(PROMPTS), device="cpu", do_classifier_free_guidance=False)
    with torch.no_grad():
        hidden, mine = model.unet.encode_with_pooled(ids)
    torch.testing.assert_close(hidden, embeds)
    torch.testing.assert_close(mine, pooled)
    size = (8 * LATENT_SIZE, 8 * LATENT_SIZE)
    time_ids = pipe._get_add_time_ids(size, (0, 0), size, torch.float32, pipe.text_encoder_2.config.projection_dim)
    sample, t = torch.randn(len(PROMPTS), 4, 8, 8), torch.full((len(PROMPTS),), 400)
    with torch.no_grad():
        expected = pipe.unet(
            sample,
            t,
            encoder_hidden_states=embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.repeat(len(PROMPTS), 1)},
        ).sample
        torch.testing.assert_close(model.unet(sample, t, ids).sample, expected)


def test_sdxl_refusals_say_what_is_unsupported(saved, tmp_path):
    pipe = _copy(saved["sdxl"], tmp_path)
    config = json.loads((pipe / "tokenizer_2" / "tokenizer_config.json").read_text())
    (pipe / "tokenizer_2" / "tokenizer_config.json").write_text(json.dumps(config | {"model_max_length": 12}))
    with pytest.raises(ModelLoadError, match="same length"):
        load_model(path=pipe, prompts=saved["prompts"])
    with pytest.raises(ModelLoadError, match="refiner"):
        family_for("UNet2DConditionModel", ("scheduler", "text_encoder_2", "tokenizer_2", "unet", "vae"))
    with pytest.raises(ModelLoadError, match="text_time"):
        family_for("UNet2DConditionModel", (*FAMILIES["sdxl"].needs, "unet"), {"addition_embed_type": None})
    with pytest.raises(ModelLoadError, match="only in an SDXL pipeline"):
        family_for("UNet2DConditionModel", ("text_encoder", "tokenizer", "unet"), {"addition_embed_type": "text_time"})


# --- bare models ----------------------------------------------------------------------------


@pytest.mark.parametrize("classes", [None, 5])
def test_bare_unet2d_model(tmp_path, classes):
    model = load_model(path=save_tiny_unet(tmp_path / "unet", num_class_embeds=classes))
    assert model.family == "unet2d" and not model.latent
    assert model.condition == ("class" if classes else None) and model.num_classes == classes
    assert _fp_layers(model) == {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"}


def test_bare_dit_model(tmp_path):
    model = load_model(path=save_tiny_dit(tmp_path / "dit"))
    assert (model.family, model.condition, model.num_classes, model.latent) == ("dit", "class", 5, False)
    assert "pos_embed.proj" in _fp_layers(model) and "proj_out_2" in _fp_layers(model)
    assert model.unet.get_submodule(model.family_info.feature_module) is model.unet.norm_out


def test_dit_with_learned_variance_is_refused(tmp_path):
    folder = save_tiny_dit(tmp_path / "dit")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"out_channels": 2 * config["in_channels"]}))
    with pytest.raises(ModelLoadError, match="learned variance"):
        load_model(path=folder)


def test_pipeline_families_need_their_pipeline(saved, tmp_path):
    bare = Path(shutil.copytree(saved["pixart"] / "transformer", tmp_path / "bare"))
    shutil.copy(saved["pixart"] / "scheduler" / "scheduler_config.json", bare)
    with pytest.raises(ModelLoadError, match="needs its text encoder"):
        load_model(path=bare)
    pipe = _copy(saved["pixart"], tmp_path)
    shutil.rmtree(pipe / "text_encoder")
    index = json.loads((pipe / "model_index.json").read_text())
    del index["text_encoder"]
    (pipe / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="needs text_encoder"):
        load_model(path=pipe, prompts=saved["prompts"])


# --- report ---------------------------------------------------------------------------------


def _summary(metrics: dict, notes: list[str]) -> dict:
    return {
        "model": {"name": "m", "registered": None, "registered_reason": "off"},
        "run_id": "r",
        "spec_hash": "h",
        "plan": {"quantized_layers": 1, "layers": 2, "description": "W8A8"},
        "sizes": {"fp32_bytes": 4, "packed_bytes": 1, "ratio": 0.25},
        "metrics": metrics,
        "notes": notes,
        "timings": {},
        "export": {"status": "skipped", "reason": "off"},
    }


def test_fd_free_fallback_note_names_family_and_latent_shape():
    from diffquant.report import quality_notes, render_report

    info = {"family": "pixart", "sample_shape": [4, 8, 8], "latent": True, "condition": "text", "num_classes": None}
    metrics = {"fp": {"sampling_seconds": 1.0}, "quantized": {"psnr": 30.0, "ssim": 0.9, "sqnr_db": 20.0}}
    (note,) = quality_notes(info, metrics)
    assert note.startswith("no evaluation classifier fits this model (family pixart, latents 4x8x8)")
    assert "PSNR/SSIM" in note and "accuracy and FD are not computed" in note
    assert f"Note: {note}." in render_report(_summary(metrics, [note]))
    judged = {"fp": {"accuracy": 0.9, "fd_real": 1.0}, "quantized": {"accuracy": 0.9, "psnr": 30.0}}
    assert quality_notes({"family": "unet2d", "sample_shape": [1, 8, 8], "latent": False}, judged) == []
    digits_text = {"family": "text-unet", "sample_shape": [1, 8, 8], "latent": False, "condition": "text"}
    assert "name no digit class" in quality_notes(digits_text, metrics)[0]
    assert "Note:" not in render_report(_summary(judged, []))
