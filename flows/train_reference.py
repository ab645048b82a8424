"""The ``train-reference`` flow: retrain and re-package the bundled reference models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from diffquant.models.reference import weights_root
from diffquant.training import ClassifierTrainConfig, UNetTrainConfig, write_reference_models


@flow(name="train-reference")
def train_reference_flow(
    out_dir: str | None = None, steps: int | None = None, seed: int = 0, eval_samples: int = 2000
) -> dict[str, Any]:
    """Train digits-unet and the evaluation classifier, then write weights and model cards.

    Args:
        out_dir: Destination folder (default: the package's bundled weights folder).
        steps: digits-unet training steps (default: the shipped 4,000).
        seed: Seed of both trainings.
        eval_samples: Samples for the model-card metrics.

    Returns:
        The measured metrics and the output folder.
    """
    unet_cfg = UNetTrainConfig(seed=seed) if steps is None else UNetTrainConfig(steps=steps, seed=seed)
    target = Path(out_dir) if out_dir else weights_root()
    metrics = write_reference_models(target, unet_cfg, ClassifierTrainConfig(seed=seed), eval_samples=eval_samples)
    return {"out_dir": str(target), **metrics}
