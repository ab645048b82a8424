"""`diffquant train-reference` end to end on a tiny budget, and training determinism."""

import json

import torch
from typer.testing import CliRunner

from diffquant.data import load_digits_split
from diffquant.flows.cli import app
from diffquant.models.loading import load_local_model
from diffquant.training.reference import (
    ClassifierTrainConfig,
    UNetTrainConfig,
    train_digits_unet,
    write_reference_models,
)
from diffquant.training.zoo import train_digits_dit, train_digits_t2i


def test_train_reference_cli_writes_loadable_models_with_cards(isolated_home, tmp_path):
    """digits-dit and digits-t2i through the CLI, judged by the bundled classifier (no classifier training)."""
    result = CliRunner().invoke(
        app,
        [
            "train-reference",
            *("--out", str(tmp_path / "ref"), "--steps", "3", "--eval-samples", "20"),
            *("--model", "digits-dit", "--model", "digits-t2i"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "ref" / "digits-unet").exists()
    dit = load_local_model(tmp_path / "ref" / "digits-dit")
    assert dit.family == "dit" and dit.digits_compatible
    t2i = load_local_model(tmp_path / "ref" / "digits-t2i")
    assert t2i.family == "text-unet" and t2i.condition == "text" and t2i.digits_compatible
    for name in ("digits-dit", "digits-t2i"):
        card = (tmp_path / "ref" / name / "MODEL_CARD.md").read_text()
        assert "3 steps" in card and f"--model {name}" in card
        assert "accuracy" in json.loads((tmp_path / "ref" / name / "metrics.json").read_text())


def test_digits_unet_is_written_with_its_classifier_and_card(tmp_path):
    """The classifier's shipped 30 epochs reach >= 0.97 (tests/core/test_reference_models.py); 2 epochs here."""
    metrics = write_reference_models(
        tmp_path, UNetTrainConfig(steps=3), ClassifierTrainConfig(epochs=2), eval_samples=20
    )
    model = load_local_model(tmp_path / "digits-unet")
    assert model.digits_compatible
    card = (tmp_path / "digits-unet" / "MODEL_CARD.md").read_text()
    assert "3 steps" in card and "diffquant train-reference" in card
    stored = json.loads((tmp_path / "digits-unet" / "metrics.json").read_text())
    assert stored["classifier_accuracy"] == metrics["classifier_accuracy"] > 0.5  # 2 epochs learn, 10 classes
    assert (tmp_path / "digits-classifier" / "model.safetensors").is_file()


def test_train_reference_refuses_an_unknown_model(isolated_home, tmp_path):
    result = CliRunner().invoke(app, ["train-reference", "--out", str(tmp_path), "--model", "digits-gan"])
    assert result.exit_code == 2 and "unknown reference model 'digits-gan'" in result.output


def test_unet_training_is_deterministic():
    data = load_digits_split()
    config = UNetTrainConfig(steps=3, batch_size=16)
    a, losses_a = train_digits_unet(data, config)
    b, losses_b = train_digits_unet(data, config)
    assert losses_a == losses_b
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_dit_and_t2i_training_are_deterministic():
    data = load_digits_split()
    config = UNetTrainConfig(steps=3, batch_size=16)
    a, losses_a = train_digits_dit(data, config)
    b, losses_b = train_digits_dit(data, config)
    assert losses_a == losses_b and all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    _, c, losses_c = train_digits_t2i(data, config)
    _, d, losses_d = train_digits_t2i(data, config)
    assert losses_c == losses_d and all(torch.equal(x, y) for x, y in zip(c.parameters(), d.parameters(), strict=True))
