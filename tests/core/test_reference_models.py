"""The shipped reference models: present, safe, small, and good enough to judge others."""

import json

import pytest
import torch

from diffquant.data import HELD_OUT_SIZE, load_digits_split
from diffquant.models.loading import load_model
from diffquant.models.reference import (
    DIGITS_CLASSIFIER,
    DIGITS_DIT,
    DIGITS_T2I,
    DIGITS_UNET,
    load_classifier,
    reference_dir,
)
from diffquant.quant.plan import quantizable_layers
from diffquant.storage import check_safetensors


@pytest.mark.parametrize("name", [DIGITS_UNET, DIGITS_CLASSIFIER])
def test_bundled_weights_are_small_safetensors_with_card(name):
    folder = reference_dir(name)
    weights = list(folder.glob("*.safetensors"))
    assert len(weights) == 1
    check_safetensors(weights[0])
    assert weights[0].stat().st_size <= 6 * 1024 * 1024
    card = (folder / "MODEL_CARD.md").read_text()
    assert "diffquant train-reference" in card and "random_state=0" in card


def test_split_is_fixed_and_disjoint():
    a, b = load_digits_split(), load_digits_split()
    assert torch.equal(a.held_out_images, b.held_out_images)
    assert a.held_out_images.shape[0] == HELD_OUT_SIZE
    assert a.train_images.shape[0] + HELD_OUT_SIZE == 1797
    train = {tuple(x.flatten().tolist()) for x in a.train_images}
    held = [tuple(x.flatten().tolist()) for x in a.held_out_images]
    assert sum(h in train for h in held) < 10  # the digits set holds a few exact duplicates


def test_classifier_held_out_accuracy():
    data = load_digits_split()
    with torch.no_grad():
        predictions = load_classifier()(data.held_out_images).argmax(1)
    assert (predictions == data.held_out_labels).float().mean() >= 0.97


def test_digits_unet_loads_with_metadata():
    model = load_model(DIGITS_UNET)
    assert model.digits_compatible and model.num_classes == 10
    assert 1_000_000 < sum(p.numel() for p in model.unet.parameters()) < 1_300_000
    metrics = json.loads((reference_dir(DIGITS_UNET) / "metrics.json").read_text())
    assert metrics["accuracy"] >= 0.97


@pytest.mark.parametrize("name", [DIGITS_DIT, DIGITS_T2I])
def test_transformer_and_text_models_are_shipped_small_and_safe(name):
    folder = reference_dir(name)
    weights = sorted(folder.rglob("*.safetensors"))
    assert weights and not list(folder.rglob("*.bin"))
    for path in weights:
        check_safetensors(path)
    assert sum(p.stat().st_size for p in weights) <= 6 * 1024 * 1024
    card = (folder / "MODEL_CARD.md").read_text()
    assert f"diffquant train-reference --model {name}" in card and "random_state=0" in card
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["accuracy"] >= 0.85 and metrics["accuracy_2"] >= 0.85


def test_digits_dit_is_a_class_conditional_dit():
    model = load_model(DIGITS_DIT)
    assert model.family == "dit" and model.condition == "class" and model.digits_compatible
    names = quantizable_layers(model.unet)
    assert sum(name.endswith("attn1.to_q") for name in names) == 6
    out = model.unet(torch.zeros(2, 1, 8, 8), torch.tensor([10, 500]), torch.tensor([3, 7])).sample
    assert out.shape == (2, 1, 8, 8)


def test_digits_t2i_quantizes_its_text_encoder_and_evaluates_on_held_out_phrasings():
    model = load_model(DIGITS_T2I)
    assert model.family == "text-unet" and model.condition == "text" and model.digits_compatible
    names = quantizable_layers(model.unet)
    assert any(name.startswith("text_encoder.") for name in names)
    assert any(name.endswith("attn2.to_k") for name in names)
    evaluation = [p.text for p in model.prompts.evaluation]
    calibration = {p.text for p in model.prompts.calibration}
    assert evaluation and not calibration & set(evaluation)
    ids, labels = model.conditions(20, "evaluation")
    assert ids.shape[0] == 20 and labels.tolist() == [i % 10 for i in range(20)]
    metrics = json.loads((reference_dir(DIGITS_T2I) / "metrics.json").read_text())
    assert metrics["accuracy_train_phrasings"] >= 0.85
