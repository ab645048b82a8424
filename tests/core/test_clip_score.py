"""CLIP score from a local CLIP folder (a tiny random CLIP saved here), against a direct computation."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from diffquant.clip_score import check_clip_model, load_clip
from diffquant.errors import ConfigError
from diffquant.evaluation import clip_score_of
from tests.text_models import tiny_text_model
from tests.tiny_pipelines import MAX_TOKENS, PROMPTS, clip_tokenizer, save_tiny_clip, save_tiny_sd

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def direct_similarities(folder: Path, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """CLIPModel's own forward on hand-normalized pixels (16x16 images need no resize or crop)."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(str(folder)).eval()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    pixels = (images.float() / 255 - mean) / std
    tokens = clip_tokenizer()(
        prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    return (out.image_embeds.double() * out.text_embeds.double()).sum(-1)  # both are unit vectors


def test_clip_score_matches_a_direct_computation(clip_dir):
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    prompts = list(PROMPTS[:5])
    scorer = load_clip(clip_dir)
    ours = scorer.similarities(images, prompts, batch_size=2)
    expected = direct_similarities(clip_dir, images, prompts)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    assert ours.std() > 1e-3 and ours.mean() > 0.1  # the pairs really differ, and the score is not floored to 0
    score = scorer.score(images, prompts, batch_size=5)
    assert score == pytest.approx(max(100 * float(expected.mean()), 0.0), abs=1e-3)
    # image i is scored with prompt i: another pairing gives other similarities
    shifted = scorer.similarities(images, prompts[1:] + prompts[:1], batch_size=5)
    assert not torch.allclose(shifted, ours, atol=1e-4)
    # grey images are scored as RGB with the grey value in every channel
    grey = images[:, :1]
    torch.testing.assert_close(
        scorer.similarities(grey, prompts, 5), scorer.similarities(grey.expand(-1, 3, -1, -1), prompts, 5)
    )


def test_a_text_models_images_are_scored_against_their_evaluation_prompts(clip_dir):
    model = tiny_text_model()
    scorer = load_clip(clip_dir)
    samples = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    texts = model.prompts.texts(4, "evaluation")
    assert texts == [p.text for p in model.prompts.evaluation[:4]]
    pictures = ((samples + 1) * 127.5).round().to(torch.uint8)
    assert clip_score_of(model, scorer, samples, 2) == pytest.approx(scorer.score(pictures, texts, 4))
    model.prompts = None
    with pytest.raises(ConfigError, match="clip_model: tiny-t2i is not text-conditioned"):
        clip_score_of(model, scorer, samples, 2)


def _refused(folder: Path, fragment: str, text_model: bool = True) -> None:
    with pytest.raises(ConfigError) as caught:
        check_clip_model(folder, text_model=text_model)
    message = str(caught.value)
    assert message.startswith("clip_model: ") and fragment in message and "\n" not in message, message


def test_folders_that_are_not_a_clip_model_are_refused_in_one_line(tmp_path, clip_dir):
    check_clip_model(clip_dir)
    _refused(tmp_path / "missing", "does not exist")
    (tmp_path / "file").write_text("x")
    _refused(tmp_path / "file", "is not a folder")
    _refused(clip_dir, "not text-conditioned", text_model=False)
    sd = save_tiny_sd(tmp_path / "sd")
    _refused(sd / "text_encoder", "model_type 'clip_text_model', not 'clip'")
    _refused(sd / "unet", "model_type None, not 'clip'")
    broken = tmp_path / "broken"
    shutil.copytree(clip_dir, broken)
    (broken / "preprocessor_config.json").unlink()
    _refused(broken, "no preprocessor_config.json")
    shutil.copy2(clip_dir / "preprocessor_config.json", broken)
    (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
    _refused(broken, "pickle checkpoint")
    (broken / "pytorch_model.bin").unlink()
    _refused(broken, "has no model.safetensors")
