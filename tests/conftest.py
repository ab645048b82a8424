"""Shared fixtures: small diffusers models saved locally (no downloads)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def save_tiny_unet(folder: Path, num_class_embeds: int | None = 11) -> Path:
    """Save a small random UNet2DModel with a scheduler config, as a user would."""
    import torch
    from diffusers import UNet2DModel

    from diffquant.models.reference import SCHEDULER_CONFIG

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=num_class_embeds,
        attention_head_dim=8,
    )
    unet.save_pretrained(str(folder), safe_serialization=True)
    (folder / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG))
    return folder


def tiny_calibrated(folder: Path, trajectories: int = 2, steps: int = 3, inputs: int = 4):
    """A tiny class-conditional U-Net saved under ``folder`` and loaded, with ``inputs`` random calibration inputs."""
    from diffquant.calibration.pool import collect_pool, subset
    from diffquant.calibration.selection import select
    from diffquant.models.loading import load_local_model

    model = load_local_model(save_tiny_unet(folder / "u"))
    model.num_classes = 10
    pool = collect_pool(model, trajectories=trajectories, steps=steps, seed=0)
    return model, subset(pool, select(pool, "random", inputs, 0))


@pytest.fixture
def tiny_unet_dir(tmp_path: Path) -> Path:
    return save_tiny_unet(tmp_path / "tiny-unet")
