"""`diffquant train-reference` end to end on a tiny budget, and training determinism."""

import json

import torch
from typer.testing import CliRunner

from diffquant.data import load_digits_split
from diffquant.models.loading import load_local_model
from diffquant.training import UNetTrainConfig, train_digits_unet
from flows.cli import app


def test_train_reference_cli_writes_loadable_models_with_cards(isolated_home, tmp_path):
    result = CliRunner().invoke(
        app, ["train-reference", "--out", str(tmp_path / "ref"), "--steps", "3", "--eval-samples", "20"]
    )
    assert result.exit_code == 0, result.output
    model = load_local_model(tmp_path / "ref" / "digits-unet")
    assert model.digits_compatible
    card = (tmp_path / "ref" / "digits-unet" / "MODEL_CARD.md").read_text()
    assert "3 steps" in card and "diffquant train-reference" in card
    metrics = json.loads((tmp_path / "ref" / "digits-unet" / "metrics.json").read_text())
    assert metrics["classifier_accuracy"] >= 0.97
    assert (tmp_path / "ref" / "digits-classifier" / "model.safetensors").is_file()


def test_unet_training_is_deterministic():
    data = load_digits_split()
    config = UNetTrainConfig(steps=3, batch_size=16)
    a, losses_a = train_digits_unet(data, config)
    b, losses_b = train_digits_unet(data, config)
    assert losses_a == losses_b
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
